"""Elastic resume: a checkpoint written by 2 processes continues on 1, and 1 -> 2, with the data
position carried over (litdata's elastic resume): no sample repeated, none skipped."""

import json

import pytest

from data.loader import make_dataset
from orchestrator.training.monitor import batch_fingerprint
from tests.conftest import prepare_sample_corpus
from tests.training import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """~250 blocks of 65 tokens: one epoch is ~15 steps of 16 sequences."""
    return prepare_sample_corpus(
        tmp_path_factory.mktemp("elastic"), train_docs=60, val_docs=20, docs_per_shard=30
    )


def sequence_hashes(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "batch_hashes" in r]
    return steps, [h for r in steps for h in r["batch_hashes"]]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_elastic_resume_carries_the_data_position(small_data, tmp_path, before, after):
    tokens, _ = small_data
    dataset = make_dataset(tokens / "train", 64, shuffle=False, seed=0)
    blocks = {f"{batch_fingerprint(dataset[i].long()):016x}" for i in range(len(dataset))}
    assert len(blocks) == len(dataset)
    common = [
        "--schedule.decay_steps",
        "17",
        "--logging.batch_hashes",
        "sequence",
        "--eval.interval",
        "0",
    ]
    train(
        tmp_path, small_data, *common, "--train.max_steps", "5", "--strategy.devices", str(before)
    )
    proc = train(
        tmp_path, small_data, *common, "--train.max_steps", "17", "--strategy.devices", str(after)
    )
    assert "Resumed from" in proc.stdout and f"{after} process(es)" in proc.stdout

    steps, hashes = sequence_hashes(tmp_path)
    assert [r["step"] for r in steps] == list(range(1, 18))
    assert all(
        len(r["batch_hashes"]) == 16 for r in steps
    )  # the global batch is the same on 1 or 2
    # Sequence fingerprints are "<epoch>:<hash>" (each rank's own epoch). Within epoch 0 no
    # sequence repeats and all are real blocks; 2 -> 1 misses only the drop_last remainder,
    # 1 -> 2 (litdata's elastic split of the rest) may miss a few more: either way the trainer
    # reports the exact number.
    first_epoch = [h.split(":")[1] for h in hashes if h.startswith("0:")]
    assert len(set(first_epoch)) == len(first_epoch), "a sample was repeated within the epoch"
    assert set(first_epoch) <= blocks
    unseen = len(blocks - set(first_epoch))
    if (before, after) == (2, 1):
        assert unseen == len(blocks) % 2
    (report,) = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if "epoch_end" in line
    ]
    assert report["epoch_sequences"] == len(first_epoch)
    assert report["epoch_unseen_blocks"] == unseen
    assert report["epoch_blocks"] == len(blocks)
    # Training went on from the checkpoint's weights, not from scratch.
    # (from scratch, steps 6-10 would look like steps 1-5 again).
    before_mean = sum(r["loss"] for r in steps[:5]) / 5
    after_mean = sum(r["loss"] for r in steps[5:10]) / 5
    assert after_mean < before_mean - 0.2, (before_mean, after_mean)
