"""Data pipeline: sample corpus -> shards reader -> tokenizer -> litdata prepare -> loader.

Real libraries throughout (zstandard, sentencepiece, litdata), small sizes, CPU only.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard
from litdata import StreamingDataLoader

from data.loader import (
    dataset_num_tokens,
    make_dataloader,
    read_documents,
    read_token_ids,
)
from data.prepare import COMPLETE_MARKER, STATS_FILE, PrepareOptions, is_prepared, prepare_dataset
from data.sample_corpus import SET_NAMES, write_sample_corpus
from data.shards import (
    SKIP_REASONS,
    RecordFilter,
    ShardReader,
    SkipStats,
    find_shards,
    iter_documents,
    iter_records,
)
from data.tokenizer import Tokenizer, install_tokenizer, train_tokenizer

torch.set_num_threads(1)

TRAIN_DOCS, VAL_DOCS, VOCAB = 300, 50, 512


# ------------------------------------------------------------------------------------------
# Shared fixtures (module scope: built once, the tests only read them).
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_corpus(
        tmp_path_factory.mktemp("corpus"),
        seed=0,
        train_docs=TRAIN_DOCS,
        val_docs=VAL_DOCS,
        docs_per_shard=100,
    )


@pytest.fixture(scope="module")
def tokenizer_path(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def prepared(corpus: Path, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset(PrepareOptions(corpus, out, tokenizer_path, num_workers=1))
    return out


def _texts(directory: Path) -> list[str]:
    return [t for shard in find_shards(directory) for t in iter_documents(shard)]


def _read_jsonl_zst(path: Path) -> list[dict]:
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


# ------------------------------------------------------------------------------------------
# Sample corpus
# ------------------------------------------------------------------------------------------


def test_sample_corpus_layout_and_format(corpus: Path) -> None:
    train = sorted((corpus / "train" / "chunk1").iterdir())
    val = sorted((corpus / "validation" / "chunk1").iterdir())
    assert [p.name for p in train] == [f"example_train_{i}.jsonl.zst" for i in range(3)]
    assert [p.name for p in val] == ["example_holdout_0.jsonl.zst"]

    records = [r for p in train for r in _read_jsonl_zst(p)]
    assert len(records) == TRAIN_DOCS
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in records)
    sets = Counter(r["meta"]["redpajama_set_name"] for r in records)
    assert set(sets) == set(SET_NAMES)  # every kind occurs, so mixture weights make sense
    assert len(_read_jsonl_zst(val[0])) == VAL_DOCS

    # Validation: same distribution, different draws.
    train_texts = {r["text"] for r in records}
    assert not train_texts & set(_texts(corpus / "validation"))

    # Real structure: facts are repeated inside a document, arithmetic is correct.
    wiki = next(r["text"] for r in records if " is a town in " in r["text"])
    town = wiki.split("\n")[0]
    assert wiki.count(town) >= 5
    for r in records:
        if r["meta"]["redpajama_set_name"] == "RedPajamaArXiv":
            for line in r["text"].splitlines():
                if " + " in line and line.count("=") == 1 and "n" not in line:
                    lhs, rhs = line.split(" = ")
                    a, b = lhs.split(" + ")
                    assert int(a) + int(b) == int(rhs)


def test_sample_corpus_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    kwargs = dict(seed=3, train_docs=120, val_docs=10, docs_per_shard=50)
    a = write_sample_corpus(tmp_path / "a", **kwargs)
    b = write_sample_corpus(tmp_path / "b", **kwargs)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.zst"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.zst"))
    assert len(files_a) == 3 + 1
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()

    c = write_sample_corpus(tmp_path / "c", **{**kwargs, "seed": 4})
    assert (c / files_a[0]).read_bytes() != (a / files_a[0]).read_bytes()

    # Complete corpus with the same parameters: nothing is rewritten.
    mtimes = {rel: (a / rel).stat().st_mtime_ns for rel in files_a}
    write_sample_corpus(tmp_path / "a", **kwargs)
    assert {rel: (a / rel).stat().st_mtime_ns for rel in files_a} == mtimes

    # Different parameters: regenerated, stale shards of ours removed.
    write_sample_corpus(tmp_path / "a", **{**kwargs, "train_docs": 40})
    assert sorted(p.name for p in (a / "train" / "chunk1").iterdir()) == [
        "example_train_0.jsonl.zst"
    ]

    with pytest.raises(ValueError, match="train_docs=0"):
        write_sample_corpus(tmp_path / "d", train_docs=0)


# ------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------

_BAD_LINES = [
    json.dumps({"text": "good one", "meta": {"redpajama_set_name": "RedPajamaBook"}}),
    '{"text": "broken json',  # invalid_json
    json.dumps({"meta": {}}),  # missing_text
    json.dumps({"text": 42}),  # missing_text (not a string)
    json.dumps(["text"]),  # missing_text (not an object)
    json.dumps({"text": ""}),  # empty_text
    json.dumps({"text": "  \n "}),  # empty_text
    "",  # blank_line
    json.dumps({"text": "good two"}),
]
_EXPECTED_SKIPS = {
    "blank_line": 1,
    "invalid_utf8": 1,
    "invalid_json": 1,
    "missing_text": 3,
    "empty_text": 2,
}
_NO_SKIPS = dict.fromkeys(SKIP_REASONS, 0)


def _bad_payload() -> bytes:
    return ("\n".join(_BAD_LINES) + "\n").encode() + b'{"text": "\xff\xfe"}\n'  # invalid_utf8


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_skipped_records_are_counted_by_reason(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"shard{suffix}"
    payload = _bad_payload()
    if suffix.endswith("zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    elif suffix.endswith("gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    stats = SkipStats()
    assert list(iter_documents(path, stats)) == ["good one", "good two"]
    assert stats.docs == 2
    assert stats.to_dict()["skipped"] == {**_NO_SKIPS, **_EXPECTED_SKIPS}
    assert stats.total_skipped == sum(_EXPECTED_SKIPS.values())
    assert stats.sets == {"RedPajamaBook": 1, "unknown": 1}
    # Every skip says where it is: file and (1-based) line.
    locations = stats.to_dict()["skip_locations"]
    assert locations["invalid_json"] == [f"{path}:2"]
    assert locations["missing_text"] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert locations["blank_line"] == [f"{path}:8"] and locations["invalid_utf8"] == [f"{path}:10"]


def test_filters_text_field_excluded_sets_and_min_length(tmp_path: Path) -> None:
    lines = [
        {"content": "def f(): pass", "meta": {"redpajama_set_name": "RedPajamaGithub"}},
        {"content": "short", "meta": {"redpajama_set_name": "RedPajamaBook"}},
        {"content": "a long enough book text", "meta": {"redpajama_set_name": "RedPajamaBook"}},
        {"text": "no content field here"},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    stats = SkipStats()
    flt = RecordFilter(
        text_field="content", exclude_sets=frozenset({"RedPajamaGithub"}), min_chars=10
    )
    assert list(iter_documents(path, stats, flt)) == ["a long enough book text"]
    assert {k: v for k, v in stats.skipped.items() if v} == {
        "excluded_set": 1,
        "too_short": 1,
        "missing_text": 1,
    }
    nested = tmp_path / "n.jsonl"
    nested.write_text(json.dumps({"doc": {"body": "nested text"}}) + "\n")
    assert list(iter_documents(nested, filter=RecordFilter(text_field="doc.body"))) == [
        "nested text"
    ]


def test_damaged_files_keep_what_came_before_and_count_the_rest(tmp_path: Path) -> None:
    multi = tmp_path / "multi.jsonl.zst"
    cctx = zstandard.ZstdCompressor()
    multi.write_bytes(
        cctx.compress(b'{"text": "a"}\n{"text": "b') + cctx.compress(b'"}\n{"text": "c"}')
    )
    assert [t for t, _ in iter_records(multi)] == ["a", "b", "c"]

    docs = [json.dumps({"text": f"document {i} " * 20}) for i in range(3000)]
    big = "\n".join(docs).encode()
    for name, data in [
        ("truncated.jsonl.zst", cctx.compress(big)[:5000]),
        ("truncated.jsonl.gz", gzip.compress(big)[:5000]),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        stats = SkipStats()
        kept = list(iter_documents(path, stats))
        # The records before the damage are kept, in order; the rest is one counted skip.
        assert 0 < len(kept) < 3000 and kept == [json.loads(d)["text"] for d in docs[: len(kept)]]
        assert {k: v for k, v in stats.skipped.items() if v} == {"truncated_file": 1}, name
        assert stats.locations["truncated_file"] == [f"{path}:{len(kept) + 1}"]

    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd")
    stats = SkipStats()
    assert list(iter_documents(garbage, stats)) == []
    assert {k: v for k, v in stats.skipped.items() if v} == {"corrupt_file": 1}

    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really parquet")
    stats = SkipStats()
    assert list(iter_documents(bad_parquet, stats)) == []
    assert {k: v for k, v in stats.skipped.items() if v} == {"corrupt_file": 1}


def test_parquet_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "code.parquet"
    table = pa.table({"id": [1, 2, 3, 4], "content": ["print(1)\n", None, "   ", "x = 2\n"]})
    pq.write_table(table, path, row_group_size=2)
    stats = SkipStats()
    recs = list(ShardReader(path, stats, RecordFilter(text_field="content")))
    assert [(r.text, r.line) for r in recs] == [("print(1)\n", 1), ("x = 2\n", 4)]
    assert {k: v for k, v in stats.skipped.items() if v} == {"missing_text": 1, "empty_text": 1}
    # A wrong text field: every row is counted as missing_text (nothing silently empty).
    stats = SkipStats()
    assert list(iter_documents(path, stats)) == []
    assert stats.skipped["missing_text"] == 4


def test_find_shards(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"Input directory {missing} does not exist"):
        find_shards(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError,
        match=rf"No \.jsonl, \.jsonl\.zst, \.jsonl\.gz or \.parquet files found under {empty}",
    ):
        find_shards(empty)
    for rel in [
        "b/2.jsonl.zst",
        "a/1.jsonl",
        "a/z/0.jsonl.zst",
        "a/skip.json",
        "c/3.parquet",
        "c/4.jsonl.gz",
    ]:
        (empty / rel).parent.mkdir(parents=True, exist_ok=True)
        (empty / rel).write_bytes(b"")
    assert [p.relative_to(empty).as_posix() for p in find_shards(empty)] == [
        "a/1.jsonl",
        "a/z/0.jsonl.zst",
        "b/2.jsonl.zst",
        "c/3.parquet",
        "c/4.jsonl.gz",
    ]
    assert find_shards(empty / "a" / "1.jsonl") == [empty / "a" / "1.jsonl"]  # a single file


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_tokenizer_conventions_and_round_trip(corpus: Path, tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer._sp.unk_id() == 0

    samples = _texts(corpus / "validation")[:20] + [
        "  leading spaces",
        "trailing  ",
        "\n\nnewlines\n",
        "tabs\tand  double  spaces",
        "digits 1234567",
        "unicode: é ü 你好 🙂",
        "def f(x):\n    return x + 1\n",
    ]
    for text in samples:
        ids = tokenizer.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tokenizer.encode("hello")
    assert tokenizer.decode(ids) == "hello"
    assert tokenizer.decode(torch.tensor(ids)) == "hello"
    # split_digits: every digit is its own piece.
    assert len(tokenizer.encode("1234567")) >= 7


def test_tokenizer_training_is_deterministic(
    corpus: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    again = train_tokenizer(corpus, tmp_path / "again", vocab_size=VOCAB)
    assert again == tmp_path / "again.model"
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_tokenizer_options_and_existing_model(
    corpus: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    no_bytes = Tokenizer(
        train_tokenizer(corpus, tmp_path / "nb", vocab_size=300, byte_fallback=False)
    )
    assert no_bytes.vocab_size == 300 and (no_bytes.bos_id, no_bytes.eos_id, no_bytes.unk_id) == (
        1,
        2,
        0,
    )
    assert no_bytes.unk_id in no_bytes.encode("🙂")  # no byte pieces: unknown characters become unk
    # An existing model (e.g. Llama 2's) is checked and copied.
    installed = install_tokenizer(tokenizer_path, tmp_path / "llama")
    assert installed.read_bytes() == tokenizer_path.read_bytes()
    assert Tokenizer(installed).separator_ids("bos+eos") == ([1], [2])
    assert Tokenizer(installed).separator_ids("eos") == ([], [2])
    assert Tokenizer(installed).separator_ids("bos") == ([1], [])


def test_tokenizer_errors(tmp_path: Path, corpus: Path) -> None:
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match=rf"{missing} not found.*orchestrator tokenizer"):
        Tokenizer(missing)
    with pytest.raises(
        FileNotFoundError, match=rf"Input directory {tmp_path / 'nope'} does not exist"
    ):
        train_tokenizer(tmp_path / "nope", tmp_path / "tok")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=100)
    with pytest.raises(
        ValueError, match=rf"on {corpus} \(vocab_size=60000\) failed.*Vocabulary size too high"
    ):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=60_000)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"{junk} is not a valid SentencePiece model"):
        Tokenizer(junk)


# ------------------------------------------------------------------------------------------
# Prepare + loader
# ------------------------------------------------------------------------------------------


def test_prepare_writes_token_datasets_matching_the_tokenizer(
    prepared: Path, corpus: Path, tokenizer: Tokenizer
) -> None:
    assert is_prepared(prepared)
    assert (prepared / COMPLETE_MARKER).is_file()
    assert not (prepared / ".prepare_work").exists()  # scratch space cleaned up
    stats = json.loads((prepared / STATS_FILE).read_text())
    assert stats["dtype"] == "uint16" and stats["vocab_size"] == VOCAB
    assert stats["layout"] == "slimpajama"

    for split, src, n_docs in [("train", "train", TRAIN_DOCS), ("val", "validation", VAL_DOCS)]:
        texts = _texts(corpus / src)
        expected = [tokenizer.encode(t, bos=True, eos=True) for t in texts]
        # One worker, shards in sorted order: stored documents equal the encodings, in order.
        docs = read_documents(prepared / split)
        assert [d.tolist() for d in docs] == expected
        stream = read_token_ids(prepared / split)
        n_tokens = sum(len(e) for e in expected)
        assert len(stream) == n_tokens == dataset_num_tokens(prepared / split)
        # bos/eos separate documents: one of each per document, eos immediately before bos.
        assert int((stream == 1).sum()) == int((stream == 2).sum()) == n_docs
        assert stream[0] == 1 and stream[-1] == 2
        assert torch.all(stream[1:][stream[:-1] == 2] == 1)

        s = stats["splits"][split]
        assert s["docs"] == n_docs and s["tokens"] == n_tokens
        assert s["skipped_total"] == 0 and set(s["skipped"]) == set(SKIP_REASONS)
        assert sum(s["sets"].values()) == n_docs

        # make_dataloader (no shuffle) yields the token stream cut into seq_len + 1 blocks.
        seq_len, batch = 31, 4
        loader = make_dataloader(
            prepared / split, seq_len=seq_len, batch_size=batch, shuffle=False, seed=0
        )
        batches = list(loader)
        assert all(b.dtype == torch.int64 and b.shape == (batch, seq_len + 1) for b in batches)
        flat = torch.cat([b.reshape(-1) for b in batches])
        assert len(batches) == n_tokens // (seq_len + 1) // batch
        assert torch.equal(flat, stream[: len(flat)])
        # First document: inputs/targets are the shifted encoding.
        first = batches[0][0]
        assert first[:-1].tolist() == expected[0][:seq_len]
        assert first[1:].tolist() == expected[0][1 : seq_len + 1]


def test_prepare_is_idempotent_and_detects_unfinished_runs(
    corpus: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prep"
    env_before = {
        k: os.environ.get(k)
        for k in ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    }
    sigint_before = signal.getsignal(signal.SIGINT)
    first = prepare_dataset(PrepareOptions(corpus, out, tokenizer_path))
    # litdata's cache env vars and SIGINT handler are restored after the call.
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert signal.getsignal(signal.SIGINT) == sigint_before

    chunk = next((out / "train").glob("chunk-*.bin"))
    mtime = chunk.stat().st_mtime_ns
    assert (
        prepare_dataset(PrepareOptions(corpus, out, tokenizer_path)) == first
    )  # finished: no work redone
    assert chunk.stat().st_mtime_ns == mtime

    # A prepare that died before the marker is not taken for a finished one, and is redone.
    (out / COMPLETE_MARKER).unlink()
    assert not is_prepared(out)
    assert prepare_dataset(PrepareOptions(corpus, out, tokenizer_path)) == first
    assert is_prepared(out)

    assert prepare_dataset(PrepareOptions(corpus, out, tokenizer_path, overwrite=True)) == first

    # Reusing a finished prepare with another tokenizer would mix vocabularies: refused.
    other_tok = train_tokenizer(corpus, tmp_path / "other", vocab_size=400)
    with pytest.raises(
        ValueError, match=rf"{out} was already prepared from a different tokenizer.*overwrite"
    ):
        prepare_dataset(PrepareOptions(corpus, out, other_tok))
    other = prepare_dataset(PrepareOptions(corpus, out, other_tok, overwrite=True))
    assert other["vocab_size"] == 400 and other["tokenizer_path"] == str(other_tok.resolve())


def test_prepare_counts_skips_across_workers_and_holds_out_validation(
    tmp_path: Path, tokenizer: Tokenizer, tokenizer_path: Path
) -> None:
    # Flat folder (no train/validation split) of 4 shards, each with the same bad lines.
    src = tmp_path / "flat"
    src.mkdir()
    all_texts: list[str] = []
    for s in range(4):
        good = [f"Document {s}-{i}: the number {i} plus {s} is {i + s}." for i in range(60)]
        all_texts += good
        payload = "\n".join(json.dumps({"text": t}) for t in good).encode() + b"\n" + _bad_payload()
        (src / f"part_{s}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))

    out = tmp_path / "out"
    # group_bytes=1: every file is a part of its own, so the 2 workers share the files.
    stats = prepare_dataset(
        PrepareOptions(src, out, tokenizer_path, num_workers=2, val_every=5, group_bytes=1)
    )
    assert (
        stats["layout"] == "flat_hash_holdout" and stats["val_every"] == 5 and stats["parts"] == 4
    )
    train, val = stats["splits"]["train"], stats["splits"]["val"]
    # Skips are summed over all files/workers and counted once (with train, for a holdout).
    assert train["skipped"] == {**_NO_SKIPS, **{k: 4 * v for k, v in _EXPECTED_SKIPS.items()}}
    assert [f["file"] for f in stats["files"]] == [f"part_{s}.jsonl.zst" for s in range(4)]
    assert all(f["skipped"] == _EXPECTED_SKIPS for f in stats["files"])
    assert val["skipped_total"] == 0
    # "good one"/"good two" from the bad payload are real documents too.
    n_all = len(all_texts) + 8
    assert train["docs"] + val["docs"] == n_all
    assert 0 < val["docs"] < n_all // 2
    assert json.loads((out / STATS_FILE).read_text())["splits"] == stats["splits"]

    # Every document lands in exactly one split (order across 2 workers is not fixed).
    def decoded(split: str) -> Counter[str]:
        return Counter(tokenizer.decode(d.tolist()) for d in read_documents(out / split))

    combined = decoded("train") + decoded("val")
    assert combined == Counter(all_texts + ["good one", "good two"] * 4)
    assert sum(decoded("val").values()) == val["docs"]


def test_prepare_errors_before_doing_work(
    corpus: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    missing_in = tmp_path / "no_corpus"
    with pytest.raises(FileNotFoundError, match=rf"Input directory {missing_in} does not exist"):
        prepare_dataset(PrepareOptions(missing_in, out, tokenizer_path))
    empty_in = tmp_path / "empty_corpus"
    (empty_in / "train").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=rf"No \.jsonl.*files found under {empty_in / 'train'}"
    ):
        prepare_dataset(PrepareOptions(empty_in, out, tokenizer_path))
    missing_tok = tmp_path / "tok.model"
    with pytest.raises(
        FileNotFoundError, match=rf"Tokenizer model {missing_tok} not found.*orchestrator tokenizer"
    ):
        prepare_dataset(PrepareOptions(corpus, out, missing_tok))
    only_val = tmp_path / "only_val"
    (only_val / "validation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"validation/ folder but no train/ folder"):
        prepare_dataset(PrepareOptions(only_val, out, tokenizer_path))
    with pytest.raises(ValueError, match=r"separator must be one of"):
        prepare_dataset(PrepareOptions(corpus, out, tokenizer_path, separator="pad"))
    assert not out.exists()  # nothing was created before the inputs were validated

    # An unwritable output fails at once, saying so.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root may write anywhere: then see the next test)
            with pytest.raises(
                PermissionError, match=rf"Cannot write to the output {locked / 'out'}"
            ):
                prepare_dataset(PrepareOptions(corpus, locked / "out", tokenizer_path))
    finally:
        locked.chmod(0o700)


def test_unwritable_output_is_reported(corpus: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    # A file where the output directory should be (permission checks do not apply to root).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=rf"Cannot write to the output {blocker / 'out'}"):
        prepare_dataset(PrepareOptions(corpus, blocker / "out", tokenizer_path))


def test_a_damaged_shard_is_skipped_and_the_run_finishes(
    corpus: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    (broken / "validation").mkdir(parents=True)
    (broken / "train").mkdir()
    for p in (corpus / "validation" / "chunk1").iterdir():
        (broken / "validation" / p.name).write_bytes(p.read_bytes())
    good = next((corpus / "train" / "chunk1").iterdir())
    (broken / "train" / "a_good.jsonl.zst").write_bytes(good.read_bytes())
    (broken / "train" / "b_bad.jsonl.zst").write_bytes(b"garbage")
    stats = prepare_dataset(PrepareOptions(broken, tmp_path / "out", tokenizer_path))
    assert is_prepared(tmp_path / "out")
    assert stats["splits"]["train"]["docs"] == 100
    assert stats["skipped"]["corrupt_file"] == 1
    assert stats["skip_locations"]["corrupt_file"] == ["train/b_bad.jsonl.zst:1"]
    bad = next(f for f in stats["files"] if f["file"] == "train/b_bad.jsonl.zst")
    assert bad["skipped"] == {"corrupt_file": 1} and "zstd" in bad["error"]


def test_make_dataloader_errors(prepared: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=rf"{missing} does not exist.*orchestrator prepare"):
        make_dataloader(missing, seq_len=8, batch_size=2, shuffle=False, seed=0)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(
        ValueError, match=rf"{plain} is not a prepared litdata dataset.*orchestrator prepare"
    ):
        make_dataloader(plain, seq_len=8, batch_size=2, shuffle=False, seed=0)
    # The prepare root instead of a split: say which folder to use.
    with pytest.raises(ValueError, match=rf"use {prepared / 'train'}"):
        make_dataloader(prepared, seq_len=8, batch_size=2, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="fewer than one block"):
        make_dataloader(prepared / "val", seq_len=10**7, batch_size=2, shuffle=False, seed=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_dict_resumes_exactly(prepared: Path, num_workers: int) -> None:
    def loader() -> StreamingDataLoader:
        return make_dataloader(
            prepared / "train",
            seq_len=63,
            batch_size=4,
            shuffle=True,
            seed=1234,
            num_workers=num_workers,
        )

    reference = list(loader())
    assert len(reference) > 10
    # Shuffled: differs from the stored order, and the same seed gives the same order.
    assert not torch.equal(reference[0].reshape(-1), read_token_ids(prepared / "train")[: 4 * 64])
    assert all(torch.equal(a, b) for a, b in zip(reference, loader(), strict=True))

    k = 7
    first = loader()
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == k:
            break
    state = first.state_dict()

    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(reference)
    for got, want in zip(seen + rest, reference, strict=True):
        assert torch.equal(got, want)


def test_loader_epochs_reshuffle_and_resume_inside_a_later_epoch(prepared: Path) -> None:
    """Multi-epoch: every epoch is a full, reshuffled pass; a resume inside epoch 2 gives the rest of
    epoch 2 and then a full epoch 3 (not only the tail of the data, as after a fast-forward)."""

    def loader() -> StreamingDataLoader:
        return make_dataloader(prepared / "train", seq_len=63, batch_size=4, shuffle=True, seed=5)

    reference = loader()
    epochs = [list(reference) for _ in range(3)]
    blocks = [sorted(tuple(s.tolist()) for b in e for s in b) for e in epochs]
    assert blocks[0] == blocks[1] == blocks[2]  # each epoch: the same blocks...
    assert not all(
        torch.equal(a, b) for a, b in zip(epochs[0], epochs[1], strict=True)
    )  # ...in a new order

    k = len(epochs[1]) // 2
    first = loader()
    assert len(list(first)) == len(epochs[0])
    it = iter(first)
    seen = [next(it) for _ in range(k)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, epochs[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(list(resumed), epochs[2], strict=True))
