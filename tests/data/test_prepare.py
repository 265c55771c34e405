"""`prepare` on generated SlimPajama-format and StarCoder-format corpora, bad records included:
counts by reason (with file and line), subset exclusion, the document separator, the token
stream decoding back to exactly the kept documents, parallel = serial, and an interrupted
prepare (cleanly stopped, or SIGKILLed) resumed into exactly the chunks of an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard

from data.loader import read_documents, read_token_ids
from data.prepare import COMPLETE_MARKER, PrepareOptions, is_prepared, prepare_dataset
from data.sample_corpus import generate_document
from data.shards import SKIP_REASONS
from data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import REPO_ROOT

torch.set_num_threads(1)

VOCAB = 512

# Bad records, each with the reason it must be counted under.
BAD_LINES = [
    (b'{"text": "broken json', "invalid_json"),
    (b'{"text": "\xff\xfe bad bytes"}', "invalid_utf8"),
    (json.dumps({"meta": {"redpajama_set_name": "RedPajamaBook"}}).encode(), "missing_text"),
    (json.dumps({"text": None}).encode(), "missing_text"),
    (json.dumps({"text": " \n\t "}).encode(), "empty_text"),
    (b"", "blank_line"),
]


def _zst(lines: list[bytes]) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines) + b"\n")


def _complete_lines_of_truncated(data: bytes) -> list[bytes]:
    """What a truncated .zst still holds, decoded independently of the reader under test."""
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return raw.split(b"\n")[:-1]  # the piece after the last newline is incomplete


def write_slimpajama(root: Path, seed: int = 0) -> dict:
    """SlimPajama layout: train/chunk{1,2}/*.jsonl.zst, validation/chunk1/, test/chunk1/ (ignored).

    Returns what a prepare excluding RedPajamaGithub must keep, per split, in file order, and the
    expected skip counts."""
    expected: dict = {"train": [], "val": [], "skips": Counter(), "excluded": 0}
    n = 0

    def docs(split: str, count: int) -> list[dict]:
        nonlocal n
        out = [generate_document(seed, split, n + i) for i in range(count)]
        n += count
        return out

    def add(split: str, records: list[dict]) -> list[bytes]:
        for r in records:
            if r["meta"]["redpajama_set_name"] == "RedPajamaGithub":
                expected["excluded"] += 1
                expected["skips"]["excluded_set"] += 1
            else:
                expected[split].append(r["text"])
        return [json.dumps(r).encode() for r in records]

    files = {}
    # Sorted file order = the order documents are stored in.
    files["train/chunk1/example_train_0.jsonl.zst"] = ("train", docs("train", 40), True)
    files["train/chunk1/example_train_1.jsonl.zst"] = ("train", docs("train", 40), False)
    files["train/chunk2/example_train_2.jsonl.zst"] = ("train", docs("train", 40), False)
    files["validation/chunk1/example_holdout_0.jsonl.zst"] = ("val", docs("validation", 30), True)
    for rel, (split, records, with_bad) in files.items():
        lines = add(split, records[:20])
        if with_bad:  # bad records in the middle of the shard
            lines += [b for b, _ in BAD_LINES]
            expected["skips"].update(reason for _, reason in BAD_LINES)
        lines += add(split, records[20:])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_zst(lines))
    # A truncated shard (last in train/): its complete leading records are kept, the rest is one skip.
    records = docs("train", 200)
    cobj = zstandard.ZstdCompressor(level=3).compressobj()  # one frame, flushed block by block
    data = (
        b"".join(
            cobj.compress(json.dumps(r).encode() + b"\n")
            + (cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) if i % 10 == 9 else b"")
            for i, r in enumerate(records)
        )
        + cobj.flush()
    )
    data = data[: len(data) // 3]
    complete = _complete_lines_of_truncated(data)
    assert 0 < len(complete) < 200
    add("train", [json.loads(line) for line in complete])
    expected["skips"]["truncated_file"] += 1
    (root / "train/chunk2/example_train_3.jsonl.zst").write_bytes(data)
    expected["truncated_line"] = len(complete) + 1
    # test/ is not a split of ours: never read.
    (root / "test/chunk1").mkdir(parents=True)
    (root / "test/chunk1/example_test_0.jsonl.zst").write_bytes(b"not even zstd")
    return expected


def write_starcoder(root: Path) -> list[str]:
    """StarCoder-like: per-language folders of Parquet (`content` column), plus a .jsonl.gz,
    a corrupt Parquet file, null and empty cells. Returns every valid document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    valid: list[str] = []
    for lang, n_files in [("python", 2), ("rust", 1)]:
        (root / lang).mkdir(parents=True)
        for f in range(n_files):
            contents = [
                f"# {lang} file {f} snippet {i}\ndef f_{i}(x):\n    return x * {i}\n"
                for i in range(60)
            ]
            valid += contents
            cells = contents[:30] + [None, ""] + contents[30:]
            pq.write_table(
                pa.table(
                    {
                        "max_stars_repo_path": [f"repo/{lang}/{i}.src" for i in range(len(cells))],
                        "content": cells,
                        "id": list(range(len(cells))),
                    }
                ),
                root / lang / f"train-{f:05d}-of-{n_files:05d}.parquet",
                row_group_size=16,
            )
    (root / "jsonl").mkdir()
    extra = [f'fn main() {{ println!("{i}"); }}\n' for i in range(25)]
    valid += extra
    (root / "jsonl" / "extra.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"content": c}) + "\n" for c in extra).encode())
    )
    (root / "rust" / "train-broken.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    return valid


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("slimpajama")
    return root, write_slimpajama(root)


@pytest.fixture(scope="module")
def tokenizer_path(slimpajama: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(slimpajama[0], tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB)


def _decoded(tok: Tokenizer, split_dir: Path, before: int, after: int) -> list[str]:
    return [tok.decode(d[before : len(d) - after].tolist()) for d in read_documents(split_dir)]


def test_slimpajama_counts_exclusion_separator_and_round_trip(
    slimpajama, tokenizer_path, tmp_path
) -> None:
    root, expected = slimpajama
    tok = Tokenizer(tokenizer_path)
    out = tmp_path / "out"
    stats = prepare_dataset(
        PrepareOptions(
            root,
            out,
            tokenizer_path,
            num_workers=2,
            group_bytes=1,
            separator="eos",
            exclude_sets=["RedPajamaGithub"],
        )
    )
    assert is_prepared(out) and stats["layout"] == "slimpajama" and stats["separator"] == "eos"
    # Counts by reason, for the whole input and per split.
    assert stats["skipped"] == {r: expected["skips"].get(r, 0) for r in SKIP_REASONS}
    assert stats["splits"]["train"]["docs"] == len(expected["train"])
    assert stats["splits"]["val"]["docs"] == len(expected["val"])
    assert "RedPajamaGithub" not in stats["splits"]["train"]["sets"]
    # With file and line.
    locs = stats["skip_locations"]
    assert locs["invalid_json"] == [
        "train/chunk1/example_train_0.jsonl.zst:21",
        "validation/chunk1/example_holdout_0.jsonl.zst:21",
    ]
    assert locs["blank_line"][0] == "train/chunk1/example_train_0.jsonl.zst:26"
    assert locs["truncated_file"] == [
        f"train/chunk2/example_train_3.jsonl.zst:{expected['truncated_line']}"
    ]
    per_file = {f["file"]: f for f in stats["files"]}
    assert set(per_file) == {
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk2/example_train_2.jsonl.zst",
        "train/chunk2/example_train_3.jsonl.zst",
        "validation/chunk1/example_holdout_0.jsonl.zst",
    }  # test/ never read
    assert per_file["train/chunk2/example_train_3.jsonl.zst"]["skipped"]["truncated_file"] == 1
    assert sum(sum(f["docs"].values()) for f in stats["files"]) == stats["docs"]
    assert sum(sum(f["tokens"].values()) for f in stats["files"]) == stats["tokens"]

    for split in ("train", "val"):
        docs = read_documents(out / split)
        # Separator "eos": every document ends with EOS, no BOS anywhere, nothing padded.
        assert all(int(d[-1]) == tok.eos_id for d in docs)
        stream = read_token_ids(out / split)
        assert int((stream == tok.bos_id).sum()) == 0
        assert int((stream == tok.eos_id).sum()) == len(docs) == stats["splits"][split]["docs"]
        assert len(stream) == stats["splits"][split]["tokens"]
        # The token stream decodes back to exactly the kept documents, in input order.
        assert _decoded(tok, out / split, 0, 1) == expected[split]


def test_separators_and_min_length(slimpajama, tokenizer_path, tmp_path) -> None:
    root, expected = slimpajama
    tok = Tokenizer(tokenizer_path)
    kept = expected["train"]
    cut = sorted(len(t.strip()) for t in kept)[len(kept) // 3]
    stats = prepare_dataset(
        PrepareOptions(
            root,
            tmp_path / "bos",
            tokenizer_path,
            separator="bos",
            exclude_sets=["RedPajamaGithub"],
            min_chars=cut,
        )
    )
    longer = [t for t in kept if len(t.strip()) >= cut]
    assert stats["splits"]["train"]["docs"] == len(longer)
    assert stats["skipped"]["too_short"] == len(kept) - len(longer) + sum(
        len(t.strip()) < cut for t in expected["val"]
    )
    assert all(
        int(d[0]) == tok.bos_id and tok.eos_id not in d.tolist()
        for d in read_documents(tmp_path / "bos" / "train")
    )
    assert _decoded(tok, tmp_path / "bos" / "train", 1, 0) == longer
    # Default bos+eos, and a minimum in tokens.
    stats = prepare_dataset(PrepareOptions(root, tmp_path / "both", tokenizer_path, min_tokens=200))
    docs = read_documents(tmp_path / "both" / "train")
    assert all(
        int(d[0]) == tok.bos_id and int(d[-1]) == tok.eos_id and len(d) - 2 >= 200 for d in docs
    )
    assert stats["skipped"]["too_short"] > 0 and stats["skipped"]["excluded_set"] == 0


def test_starcoder_parquet_content_field_and_hash_holdout(tmp_path, tokenizer_path) -> None:
    root = tmp_path / "starcoder"
    valid = write_starcoder(root)
    tok = Tokenizer(tokenizer_path)
    out = tmp_path / "out"
    stats = prepare_dataset(
        PrepareOptions(
            root,
            out,
            tokenizer_path,
            text_field="content",
            val_every=4,
            num_workers=2,
            group_bytes=1,
        )
    )
    assert stats["layout"] == "flat_hash_holdout"
    assert {k: v for k, v in stats["skipped"].items() if v} == {
        "missing_text": 3,
        "empty_text": 3,
        "corrupt_file": 1,
    }
    assert stats["skip_locations"]["corrupt_file"] == ["rust/train-broken.parquet:0"]
    assert "python/train-00000-of-00002.parquet:31" in stats["skip_locations"]["missing_text"]
    train = _decoded(tok, out / "train", 1, 1)
    val = _decoded(tok, out / "val", 1, 1)
    assert Counter(train + val) == Counter(valid)  # every valid document once, in one split
    assert 0 < len(val) < len(train)
    assert stats["splits"]["val"]["docs"] == len(val)


def _chunk_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/chunk-*.bin"))}


def _indexes(out: Path) -> dict[str, list]:
    return {s: json.loads((out / s / "index.json").read_text())["chunks"] for s in ("train", "val")}


@pytest.fixture(scope="module")
def uninterrupted(slimpajama, tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    # One worker, small chunks: several chunks per part, several parts.
    prepare_dataset(
        PrepareOptions(
            slimpajama[0], out, tokenizer_path, num_workers=1, group_bytes=1, chunk_bytes="4KB"
        )
    )
    return out


def test_interrupted_prepare_resumes_to_identical_chunks(
    slimpajama, tokenizer_path, uninterrupted, tmp_path
) -> None:
    root = slimpajama[0]
    out = tmp_path / "out"
    kwargs = dict(group_bytes=1, chunk_bytes="4KB")
    # Stopped after 2 of the 5 parts (with 2 workers): unfinished, and never taken for finished.
    first = prepare_dataset(
        PrepareOptions(root, out, tokenizer_path, num_workers=2, max_parts=2, **kwargs)
    )
    assert first == {"finished": False, "parts_done": 2, "parts": 5}
    assert not is_prepared(out) and not (out / COMPLETE_MARKER).exists()
    work = out / ".prepare_work" / "parts"
    done = sorted(work.glob("*.json"))
    assert len(done) == 2
    kept = {p: p.stat().st_mtime_ns for d in done for p in (work / d.stem).rglob("chunk-*.bin")}
    # A worker killed in the middle of a part leaves chunks without a record: redone, not duplicated.
    pending = next(i for i in range(5) if not (work / f"{i:07d}.json").exists())
    (work / f"{pending:07d}" / "train").mkdir(parents=True)
    (work / f"{pending:07d}" / "train" / f"chunk-{pending}-0.bin").write_bytes(b"half written")
    stats = prepare_dataset(PrepareOptions(root, out, tokenizer_path, num_workers=2, **kwargs))
    assert is_prepared(out)
    assert _chunk_bytes(out) == _chunk_bytes(uninterrupted)
    assert _indexes(out) == _indexes(uninterrupted)
    assert stats == json.loads((uninterrupted / "prepare_stats.json").read_text())
    # The parts finished before the interruption were not redone: their chunk files were moved, not rewritten.
    assert kept
    for p, mtime in kept.items():
        assert (out / p.parent.name / p.name).stat().st_mtime_ns == mtime
    assert not (out / ".prepare_work").exists()


def test_killed_prepare_resumes_to_identical_chunks(
    slimpajama, tokenizer_path, uninterrupted, tmp_path
) -> None:
    root, out = slimpajama[0], tmp_path / "out"
    code = (
        f"from data.prepare import PrepareOptions, prepare_dataset; import time, data.prepare as p\n"
        f"orig = p._process_part\n"
        f"def slow(*a, **k):\n    r = orig(*a, **k); time.sleep(0.3); return r\n"
        f"p._process_part = slow\n"
        f"prepare_dataset(PrepareOptions({str(root)!r}, {str(out)!r}, {str(tokenizer_path)!r}, "
        f"num_workers=2, group_bytes=1, chunk_bytes='4KB'))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    work = out / ".prepare_work" / "parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its workers, mid-run
    proc.wait()
    assert not is_prepared(out), "the prepare finished before it could be killed"
    assert 2 <= len(list(work.glob("*.json"))) < 5
    prepare_dataset(
        PrepareOptions(root, out, tokenizer_path, num_workers=1, group_bytes=1, chunk_bytes="4KB")
    )
    assert _chunk_bytes(out) == _chunk_bytes(uninterrupted)
    assert _indexes(out) == _indexes(uninterrupted)


def test_a_finished_prepare_is_kept_until_its_replacement_is_complete(
    slimpajama, tokenizer_path, tmp_path
) -> None:
    root, out = slimpajama[0], tmp_path / "out"
    prepare_dataset(PrepareOptions(root, out, tokenizer_path))
    before = _chunk_bytes(out)
    # An overwrite that is interrupted leaves the old dataset finished and intact.
    assert (
        prepare_dataset(
            PrepareOptions(
                root,
                out,
                tokenizer_path,
                overwrite=True,
                separator="eos",
                group_bytes=1,
                max_parts=1,
            )
        )["finished"]
        is False
    )
    assert is_prepared(out) and _chunk_bytes(out) == before
    stats = prepare_dataset(
        PrepareOptions(root, out, tokenizer_path, overwrite=True, separator="eos", group_bytes=1)
    )
    assert stats["separator"] == "eos" and _chunk_bytes(out) != before and is_prepared(out)
    # Other settings on a finished output are refused without --overwrite.
    with pytest.raises(
        ValueError,
        match=r"already prepared from other settings \(.*separator='eos', now 'bos\+eos'",
    ):
        prepare_dataset(PrepareOptions(root, out, tokenizer_path, group_bytes=1))


def test_prepare_to_an_object_store(slimpajama, tokenizer_path, tmp_path, s3) -> None:
    """s3:// output to a real S3-compatible server on loopback (tests/s3_server.py), 2 workers."""
    root = slimpajama[0]
    local = tmp_path / "local"
    prepare_dataset(PrepareOptions(root, local, tokenizer_path, group_bytes=1))
    s3.create_bucket("corpus")
    client = s3.client()
    url = "s3://corpus/slimpajama/tokens"
    first = prepare_dataset(
        PrepareOptions(
            root,
            url,
            tokenizer_path,
            num_workers=2,
            group_bytes=1,
            max_parts=2,
            work_dir=tmp_path / "work",
        )
    )
    assert first["finished"] is False and not is_prepared(url)
    stats = prepare_dataset(
        PrepareOptions(
            root, url, tokenizer_path, num_workers=2, group_bytes=1, work_dir=tmp_path / "work"
        )
    )
    assert is_prepared(url) and not (tmp_path / "work").exists()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="corpus")["Contents"])
    assert "slimpajama/tokens/_COMPLETE" in keys and "slimpajama/tokens/train/index.json" in keys
    fetched = tmp_path / "fetched"
    for key in keys:
        dest = fetched / key.removeprefix("slimpajama/tokens/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("corpus", key, str(dest))
    with pytest.raises(PermissionError, match="Cannot write to the output s3://missing-bucket/x"):
        prepare_dataset(
            PrepareOptions(root, "s3://missing-bucket/x", tokenizer_path, num_workers=1)
        )
    assert _chunk_bytes(fetched) == _chunk_bytes(local)
    assert _indexes(fetched) == _indexes(local)
    assert stats["splits"] == json.loads((local / "prepare_stats.json").read_text())["splits"]
