"""Fault injection: kills, damaged checkpoints, bad steps, unsafe pickles, a full disk."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.layout import (
    MANIFEST_NAME,
    STATE_NAME,
    latest_checkpoint,
    list_checkpoints,
)
from orchestrator.checkpoint.manifest import read_manifest, verify, write_manifest
from tests.training import REPO_ROOT, TINY, data_args, step_records, train

pytestmark = pytest.mark.slow


def last_record_per_step(run_dir):
    by_step = {}
    for r in step_records(run_dir):
        by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def final_weights(run_dir):
    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    return torch.load(latest / STATE_NAME, weights_only=True)["model"]


KILL_ARGS = ["--train.max_steps", "12", "--eval.interval", "0", "--checkpoint.interval", "1",
             "--checkpoint.keep_last", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(sample_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir, sample_data, *KILL_ARGS)
    return run_dir


def kill_repeatedly(cmd, run_dir, want_kills, want_mid_save, seed=0):
    """SIGKILL the job (every rank) again and again, then let the last restart finish. Kills the
    moment a checkpoint is being written alternate with kills at random moments, until there were
    `want_kills`, `want_mid_save` of them mid-save; a run that finishes first is wiped and started
    again. Returns the log of what happened."""
    rng = random.Random(seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    root = run_dir / "checkpoints"
    kills, mid_save, log = 0, 0, []
    for attempt in range(30):
        kind = "mid-save" if attempt % 2 == 0 else "random"
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + (120 if kind == "mid-save" else rng.uniform(3.0, 9.0))
        while proc.poll() is None and time.monotonic() < deadline:
            if (
                kind == "mid-save"
                and root.is_dir()
                and any(p.name.endswith(".partial") for p in root.iterdir())
            ):
                break
            time.sleep(0.0005 if kind == "mid-save" else 0.05)
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            if kills >= want_kills and mid_save >= want_mid_save:
                break
            log.append("finished early: starting over")
            shutil.rmtree(run_dir)
            run_dir.mkdir()
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += kind == "mid-save"
        log.append(
            f"killed ({kind}); checkpoints: {[p.name for p in root.iterdir()] if root.is_dir() else []}"
        )
        if kills >= want_kills and mid_save >= want_mid_save:
            # The last restart runs to the end.
            subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600
            )
            break
    assert kills >= want_kills and mid_save >= want_mid_save, log
    return log


def assert_same_run(got_dir, want_dir, steps, log):
    got, want = last_record_per_step(got_dir), last_record_per_step(want_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1)), log
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["batch_hashes"] for r in got] == [r["batch_hashes"] for r in want]
    a, b = final_weights(got_dir), final_weights(want_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_random_moments_then_identical_result(sample_data, uninterrupted, tmp_path):
    """SIGKILL the whole job (both ranks) again and again, some kills mid-checkpoint; every
    restart resumes, and the end result equals the uninterrupted run bitwise."""
    cmd = [sys.executable, "-m", "orchestrator", "train", *TINY, *data_args(sample_data),
           "--run.dir", str(tmp_path), *KILL_ARGS]  # fmt: skip
    log = kill_repeatedly(cmd, tmp_path, want_kills=4, want_mid_save=2)
    assert_same_run(tmp_path, uninterrupted, 12, log)


def test_encoder_decoder_survives_sigkill_bitwise(sample_data, tmp_path):
    """The same guarantee for the encoder-decoder (RedLLM; the decoder's test above covers kills at
    random moments): killed while a checkpoint is being written, it resumes and ends with the
    losses, data order and weights of an uninterrupted run."""
    encdec = ["--model.arch", "encoder_decoder", "--model.tie_embeddings", "true", *KILL_ARGS,
              "--train.max_steps", "8"]  # fmt: skip
    straight = tmp_path / "uninterrupted"
    train(straight, sample_data, *encdec)
    killed = tmp_path / "killed"
    killed.mkdir()
    cmd = [sys.executable, "-m", "orchestrator", "train", *TINY, *data_args(sample_data),
           "--run.dir", str(killed), *encdec]  # fmt: skip
    log = kill_repeatedly(cmd, killed, want_kills=1, want_mid_save=1, seed=1)
    assert_same_run(killed, straight, 8, log)


def damage(path: Path, how: str) -> None:
    state = path / STATE_NAME
    if how == "truncated":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif how == "no manifest":
        (path / MANIFEST_NAME).unlink()
    elif how == "bad checksum":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes
        state.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "no manifest", "bad checksum"])
def test_damaged_newest_checkpoint_falls_back(sample_data, uninterrupted, tmp_path, how):

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    older, newest = list_checkpoints(tmp_path / "checkpoints")[-2:]
    damage(newest, how)
    proc = train(tmp_path, sample_data, *KILL_ARGS)
    if how == "no manifest":  # not even listed as a checkpoint: an interrupted save
        assert f"Resumed from {older}" in proc.stdout
    else:
        assert f"Skipping damaged checkpoint {newest}" in proc.stdout
        assert f"Resumed from {older} at step 11" in proc.stdout
    # The re-trained last step equals the original one.
    assert (
        last_record_per_step(tmp_path)[-1]["loss"]
        == last_record_per_step(uninterrupted)[-1]["loss"]
    )


def test_retention_keeps_last_and_every(sample_data, tmp_path):
    train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "7",
        "--eval.interval",
        "0",
        "--checkpoint.interval",
        "1",
        "--checkpoint.keep_last",
        "2",
        "--checkpoint.keep_every",
        "3",
    )
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000003", "step-00000006", "step-00000007"]
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "checkpoints").iterdir())
    manifest = read_manifest(tmp_path / "checkpoints" / "step-00000007")
    assert (
        manifest["step"] == 7
        and manifest["tokens_seen"] == 7 * 16 * 64
        and manifest["world_size"] == 2
    )
    assert verify(tmp_path / "checkpoints" / "step-00000007") is None


def test_async_save_matches_sync(sample_data, uninterrupted, tmp_path):
    proc = train(tmp_path, sample_data, *KILL_ARGS, "--checkpoint.async_save", "true")
    assert "in the background" in proc.stdout
    assert [r["loss"] for r in last_record_per_step(tmp_path)] == [
        r["loss"] for r in last_record_per_step(uninterrupted)
    ]
    a, b = final_weights(tmp_path), final_weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stalls = [r["stall_seconds"] for r in records if "stall_seconds" in r]
    assert stalls and all(s >= 0 for s in stalls)


def test_nan_step_is_skipped_and_counted(sample_data, tmp_path):
    proc = train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "5",
        "--eval.interval",
        "0",
        "--faults.nan_loss_at_steps",
        "[3]",
    )
    assert "skipped update: non-finite loss (1 bad step(s) so far)" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "bad_step" in r] == [3]
    weights = final_weights(tmp_path)
    assert all(
        torch.isfinite(w).all() for w in weights.values()
    )  # the NaN never reached the weights
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints") / STATE_NAME, weights_only=True)
    assert state["guard"]["bad_steps"] == 1


def test_repeated_bad_steps_roll_back(sample_data, tmp_path):
    proc = train(
        tmp_path,
        sample_data,
        "--train.max_steps",
        "8",
        "--eval.interval",
        "0",
        "--checkpoint.interval",
        "2",
        "--guard.rollback_after",
        "2",
        "--faults.nan_loss_at_steps",
        "[5, 6]",
    )
    assert "rolled back to" in proc.stdout and "step-00000004" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if "rollback_to" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 6
    # Steps 5 and 6 are trained again (on the batches after the offending ones) and the run ends at 8.
    assert last_record_per_step(tmp_path)[-1]["step"] == 8
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())


def test_malicious_checkpoint_is_refused(sample_data, uninterrupted, tmp_path, capsys):

    target = tmp_path / "checkpoints" / "step-00000001"
    shutil.copytree(uninterrupted / "checkpoints" / "step-00000012", target)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Exploit()}, target / STATE_NAME)
    write_manifest(target, read_manifest(target))  # a manifest that matches the crafted file
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", *TINY, *data_args(sample_data), "--run.dir", str(tmp_path),
         "--strategy.devices", "1", "--train.max_steps", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "arbitrary code" in proc.stderr
    assert not marker.exists()


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}); needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_keeps_previous_checkpoint(sample_data, small_filesystem):
    run_dir = small_filesystem / "run"
    # Each checkpoint of this model is ~1.2 MB: the third one cannot fit next to two others.
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", *TINY, *data_args(sample_data), "--run.dir", str(run_dir),
         "--train.max_steps", "6", "--eval.interval", "0", "--checkpoint.interval", "1",
         "--checkpoint.keep_last", "0", "--logging.tensorboard", "false", "--strategy.devices", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr and "checkpoint" in proc.stderr
    published = list_checkpoints(run_dir / "checkpoints")
    assert published, "earlier checkpoints must survive"
    assert all(verify(p) is None for p in published)
    assert not any(p.name.endswith(".partial") for p in (run_dir / "checkpoints").iterdir())
