"""End-to-end training on the real stack: Fabric (2 gloo processes), litdata, sentencepiece, TensorBoard."""

import json
import sys
from pathlib import Path

import pytest

from orchestrator.checkpoint.layout import (
    MANIFEST_NAME,
    STATE_NAME,
    latest_checkpoint,
    list_checkpoints,
)
from orchestrator.train import main as train_main
from tests.training import TINY, data_args, step_records, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def straight_run(sample_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    proc = train(
        run_dir,
        sample_data,
        "--train.max_steps",
        "6",
        "--eval.interval",
        "3",
        "--checkpoint.interval",
        "3",
    )
    return run_dir, proc


def test_resume_is_bitwise_identical(sample_data, straight_run, tmp_path):
    straight_dir, _ = straight_run
    # First half: same schedule (decay over 6 steps), stop after 3 with a checkpoint.
    train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "3",
        "--schedule.decay_steps",
        "6",
        "--eval.interval",
        "3",
    )
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
    proc = train(tmp_path, sample_data, "--train.max_steps", "6", "--eval.interval", "3")
    assert "Resumed from" in proc.stdout and "step 3" in proc.stdout

    straight = step_records(straight_dir)
    resumed = step_records(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [
        r["loss"] for r in straight
    ]  # bitwise: exact float equality
    assert [r["batch_hashes"] for r in resumed] == [r["batch_hashes"] for r in straight]
    # Each step saw 16 distinct sequences (4 per micro-batch, 2 micro-batches, 2 ranks)...
    assert all(len(r["batch_hashes"]) == 4 for r in straight)
    # ...and no batch repeats across the run (the loader state really moved on after resume).
    all_hashes = [h for r in resumed for h in r["batch_hashes"]]
    assert len(set(all_hashes)) == len(all_hashes)


def test_learning_and_run_directory(straight_run):
    run_dir, proc = straight_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["tokens_seen"] == 6 * 16 * 64
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert (run_dir / "config.yaml").is_file()
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "step-00000003",
        "step-00000006",
    ]
    # The printed end of the run says where everything is.
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in proc.stdout
    assert "ETA" in proc.stdout and "tok/s" in proc.stdout


def test_tensorboard_holds_the_scalars(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = straight_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "train/tokens_per_sec",
        "val/loss", "val/perplexity",
    }  # fmt: skip
    assert expected <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3, 6]
    assert acc.Scalars("train/tokens_seen")[-1].value == 6 * 16 * 64


def test_checkpoint_holds_everything_to_resume(straight_run):
    import torch

    run_dir, _ = straight_run
    latest = latest_checkpoint(run_dir / "checkpoints")
    state = torch.load(latest / STATE_NAME, weights_only=True)
    assert {"model", "optimizer", "scheduler", "train_loader", "progress", "rng"} <= set(state)
    assert state["progress"]["step"] == 6
    assert (
        state["scheduler"]["last_epoch"] == 6
    )  # stepped once per optimizer step, not per micro-batch
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert (latest / "config.yaml").is_file()


def test_incomplete_checkpoints_are_never_resumed(sample_data, straight_run, tmp_path):
    import shutil

    straight_dir, _ = straight_run
    shutil.copytree(
        straight_dir / "checkpoints" / "step-00000003", tmp_path / "checkpoints" / "step-00000003"
    )
    # A save interrupted after writing state but before meta.json, and a leftover .partial dir.
    broken = tmp_path / "checkpoints" / "step-00000006"
    shutil.copytree(straight_dir / "checkpoints" / "step-00000006", broken)
    (broken / MANIFEST_NAME).unlink()
    (tmp_path / "checkpoints" / "step-00000009.partial").mkdir()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"

    proc = train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "4",
        "--schedule.decay_steps",
        "6",
        "--eval.interval",
        "0",
        "--checkpoint.interval",
        "100",
    )
    assert "Resumed from" in proc.stdout and "step-00000003" in proc.stdout
    assert "Removed incomplete checkpoint" in proc.stdout
    assert not (tmp_path / "checkpoints" / "step-00000009.partial").exists()
    assert step_records(tmp_path)[0]["loss"] == step_records(straight_dir)[3]["loss"]


def test_script_and_fabric_run_entry_points(sample_data, tmp_path):
    train(
        tmp_path / "script",
        sample_data,
        "--train.max_steps",
        "2",
        "--eval.interval",
        "0",
        entry=[sys.executable, "orchestrator/train.py"],
    )
    fabric = Path(sys.executable).parent / "fabric"
    train(
        tmp_path / "fabric",
        sample_data,
        "--train.max_steps",
        "2",
        "--eval.interval",
        "0",
        entry=[
            str(fabric),
            "run",
            "--accelerator=cpu",
            "--devices=2",
            "orchestrator/train.py",
            "--",
        ],
    )
    a, b = step_records(tmp_path / "script"), step_records(tmp_path / "fabric")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_bad_inputs_stop_before_training(sample_data, tmp_path, capsys):
    tokens, tokenizer = sample_data
    base = [*TINY, "--run.dir", str(tmp_path / "run")]
    cases = [
        (["--data.dir", str(tmp_path / "missing"), "--data.tokenizer", str(tokenizer)],
         f"data.dir={tmp_path / 'missing'} does not exist"),
        (["--data.dir", str(tokens), "--data.tokenizer", str(tmp_path / "nope.model")],
         f"data.tokenizer={tmp_path / 'nope.model'} does not exist"),
        (["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer), "--model.vocab_size", "256"],
         "has 512 tokens but model.vocab_size=256"),
        (["--data.dir", str(tokenizer.parent / "raw"), "--data.tokenizer", str(tokenizer)],
         "has no prepared 'train' split"),
        (["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer), "--model.n_heads", "5"],
         "model.n_heads=5 does not divide model.d_model=64"),
        (["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer), "--train.max_stepz", "5"],
         "unknown config key 'train.max_stepz'"),
    ]  # fmt: skip
    for extra, message in cases:
        assert train_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err, (message, err)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_init_from_starts_a_new_run_from_weights(sample_data, straight_run, tmp_path):
    straight_dir, _ = straight_run
    source = latest_checkpoint(straight_dir / "checkpoints")
    proc = train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "1",
        "--eval.interval",
        "0",
        "--checkpoint.init_from",
        str(source),
    )
    assert "Initialised model weights from" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    straight = json.loads((straight_dir / "summary.json").read_text())
    # Same weights, same validation batches: the new run's first validation equals the source's last.
    assert summary["initial_val_loss"] == straight["final_val_loss"]


def test_resume_refuses_a_different_model(sample_data, straight_run, capsys):
    straight_dir, _ = straight_run
    code = train_main(
        [*TINY, *data_args(sample_data), "--run.dir", str(straight_dir), "--model.n_layers", "3"]
    )
    assert code == 2
    assert "model.n_layers=2 there but 3 here" in capsys.readouterr().err
