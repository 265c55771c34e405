"""Damaged token data never trains silently (data/integrity.py): the sample corpus prepared for
real, then a copy of it damaged as disks and object stores damage data -- a truncated chunk, bytes
changed so that every id stays in the vocabulary, an id beyond it -- and each damage is one error
naming the chunk: before launch (sizes), at the first read (checksums, ids; locally and after a
download from a real S3-compatible server), and in `orchestrator prepare --verify`, which
`--repair` makes pass again."""

import json
import shutil
from pathlib import Path

import pytest

from data.integrity import CHECKSUM_KEY, DamagedChunk
from data.loader import StreamOptions, make_dataloader
from orchestrator.cli import main as cli
from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.data import build_train_loader
from orchestrator.training.preflight import check_inputs
from tests.training import TINY

VOCAB = 512  # the sample tokenizer's, and TINY's model.vocab_size


@pytest.fixture
def tokens(sample_data, tmp_path):
    """A copy of the prepared sample data, to damage."""
    src, _ = sample_data
    shutil.copytree(src, tmp_path / "tokens")
    return tmp_path / "tokens"


def first_chunk(tokens: Path) -> Path:
    index = json.loads((tokens / "train" / "index.json").read_text())
    return tokens / "train" / index["chunks"][0]["filename"]


def set_token(chunk: Path, value: int | None = None) -> None:
    """Change one uint16 token near the end of the chunk (to the next id in the vocabulary, or
    to `value`)."""
    data = bytearray(chunk.read_bytes())
    at = len(data) - 1000
    old = int.from_bytes(data[at : at + 2], "little")
    data[at : at + 2] = ((old + 1) % VOCAB if value is None else value).to_bytes(2, "little")
    chunk.write_bytes(bytes(data))


def drop_checksums(split: Path) -> None:
    """The index as prepared before checksums were recorded."""
    index = json.loads((split / "index.json").read_text())
    for c in index["chunks"]:
        c.pop(CHECKSUM_KEY)
    (split / "index.json").write_text(json.dumps(index))


def run_config(tokens: Path, sample_data, tmp_path):
    return load_config([*TINY, "--data.dir", str(tokens), "--data.tokenizer",
                        str(sample_data[1]), "--run.dir", str(tmp_path / "run")])  # fmt: skip


def read_all(split, **kwargs) -> int:
    loader = make_dataloader(split, 31, 4, shuffle=False, seed=0, **kwargs)
    return sum(batch.numel() for batch in loader)


def test_truncated_chunk_is_an_error_naming_it_before_launch(tokens, sample_data, tmp_path):
    cfg = run_config(tokens, sample_data, tmp_path)
    check_inputs(cfg)  # intact
    chunk = first_chunk(tokens)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    msg = str(e.value)
    assert f"data.dir={tokens}: Damaged token chunk {chunk}: " in msg
    assert "bytes but index.json records" in msg and "(truncated)" in msg
    assert "Re-run prepare for that part (part 0 of the prepare, from train/" in msg
    assert "--repair" in msg
    # ... and at the first read, when a run skips preflight: the same error, not a timeout
    with pytest.raises(DamagedChunk, match="truncated"):
        read_all(tokens / "train")


def test_bytes_changed_within_the_vocabulary_fail_at_first_read(tokens, sample_data, tmp_path):
    cfg = run_config(tokens, sample_data, tmp_path)
    chunk = first_chunk(tokens)
    set_token(chunk)
    check_inputs(cfg)  # its size is right: preflight cannot tell
    with pytest.raises(DamagedChunk) as e:
        next(iter(build_train_loader(cfg)))  # the run's own loader
    assert f"Damaged token chunk {tokens / 'train' / chunk.name}: its crc32 is " in str(e.value)
    assert "recorded when it was prepared (its bytes changed)" in str(e.value)


def test_out_of_vocabulary_id_is_an_error_naming_the_chunk(tokens, sample_data, tmp_path, capsys):
    """Data prepared before checksums were recorded still trains (preflight says so once), and an
    id >= model.vocab_size in it is caught before the model."""
    cfg = run_config(tokens, sample_data, tmp_path)
    drop_checksums(tokens / "train")
    check_inputs(cfg)
    err = capsys.readouterr().err
    assert err.count("prepared without chunk checksums") == 1
    assert f"data.dir={tokens} was prepared without chunk checksums" in err
    assert "orchestrator prepare --verify DIR" in err
    assert read_all(tokens / "train", vocab_size=VOCAB) > 0  # legacy data reads as before
    chunk = first_chunk(tokens)
    set_token(chunk, 600)
    with pytest.raises(DamagedChunk) as e:
        next(iter(build_train_loader(cfg)))
    msg = str(e.value)
    assert f"Damaged token chunk {tokens / 'train' / chunk.name}: token id 600 at token " in msg
    assert "is outside model.vocab_size=512 (ids 0..511)" in msg
    assert read_all(tokens / "train") > 0  # without a vocab_size nothing is claimed


def test_prepare_verify_reports_and_repair_fixes(tokens, sample_data, capsys):
    _, tokenizer = sample_data
    assert cli(["prepare", "--verify", str(tokens), "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 chunks, " in out and ": OK (sizes, crc32 of 1/1 chunks, ids < 512)" in out
    assert f"Verified {tokens}: OK" in out

    chunk = first_chunk(tokens)
    good = chunk.read_bytes()
    set_token(chunk)  # in the vocabulary: only the checksum tells
    assert cli(["prepare", "--verify", str(tokens), "--num-workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "train: 1 chunks, " in out and ": DAMAGED (1 chunks)" in out
    assert f"  damaged {tokens / 'train' / chunk.name}: its crc32 is " in out
    assert "Re-run prepare for that part (part 0 of the prepare" in out
    assert f"Verified {tokens}: DAMAGED" in out

    raw = Path(json.loads((tokens / "prepare_stats.json").read_text())["input_dir"])
    args = ["prepare", "--input", str(raw), "--output", str(tokens), "--tokenizer",
            str(tokenizer), "--num-workers", "1", "--no-progress", "--repair"]  # fmt: skip
    assert cli(args) == 0
    assert f"Repaired 1 damaged chunks: train/{chunk.name}" in capsys.readouterr().out
    assert chunk.read_bytes() == good
    assert cli(["prepare", "--verify", str(tokens), "--tokenizer", str(tokenizer)]) == 0


def test_damaged_chunks_streamed_from_s3_fail_after_download(s3, tokens, tmp_path):
    """Checked after litdata's download (bytes changed), and a truncated object is the same clear
    error both before launch (the store's listing) and at the first read -- not litdata's wait
    for the rest of a download that never comes."""
    from data.integrity import check_sizes
    from data.loader import read_index

    s3.create_bucket("damaged")
    client = s3.client()
    chunk = first_chunk(tokens)
    set_token(chunk)
    for f in (tokens / "train").iterdir():
        client.upload_file(str(f), "damaged", f"flip/train/{f.name}")
        data = f.read_bytes()
        if f == chunk:
            data = data[: len(data) // 2]
        client.put_object(Bucket="damaged", Key=f"cut/train/{f.name}", Body=data)
    client.upload_file(str(tokens / "prepare_stats.json"), "damaged", "flip/prepare_stats.json")

    url = "s3://damaged/flip/train"
    with pytest.raises(DamagedChunk) as e:
        read_all(url, stream=StreamOptions(cache_dir=str(tmp_path / "cache")))
    assert f"Damaged token chunk {url}/{chunk.name}: its crc32 is " in str(e.value)
    assert "Re-run prepare for that part (part 0 of the prepare, from train/" in str(e.value)

    url = "s3://damaged/cut/train"
    with pytest.raises(
        DamagedChunk, match=rf"Damaged token chunk {url}/{chunk.name}: .*\(truncated\)"
    ):
        check_sizes(url, read_index(url))
    with pytest.raises(
        DamagedChunk, match=rf"Damaged token chunk {url}/{chunk.name}: .*\(truncated\)"
    ):
        read_all(url, stream=StreamOptions(cache_dir=str(tmp_path / "cache2")))
