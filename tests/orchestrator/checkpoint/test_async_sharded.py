"""checkpoint.async_save with FSDP2 shards (strategy.name fsdp, sharded_checkpoint=true), on CPU
with 2 processes (gloo).

1. Unit level, the Checkpointer itself (this file run as a script by Fabric's launcher, one
   process per rank): an async save writes the same files as a synchronous one (shards byte for
   byte), holds the state of the moment it was called while training goes on, and a write that
   fails on one rank surfaces at the next `wait()` on every rank, with nothing published.
2. The trainer (tests/strategy_worker.py): a run with async saves has the losses of a run with
   synchronous ones, resumes bitwise from its checkpoint, and consolidates into the same weights.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


# -- 1. the Checkpointer, one process per rank ---------------------------------------------------


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "state").iterdir())}


def checkpointer_checks(root: Path) -> dict:
    """Run on every rank (launched by Fabric); returns what this rank saw."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.checkpoint.consolidate import load_model_state
    from orchestrator.checkpoint.layout import CheckpointError
    from orchestrator.checkpoint.manifest import verify
    from tests.orchestrator.checkpoint.helpers import fsdp2_config, fsdp2_trained

    def config(name: str, async_save: bool):
        return fsdp2_config(root, name, async_save)

    cfg = config("async", True)
    fabric, model, optimizer, train_step = fsdp2_trained(cfg)  # the optimizer has state
    state = {"model": model, "optimizer": optimizer, "progress": {"step": 1, "tokens_seen": 16}}
    out: dict = {"rank": fabric.global_rank}

    sync = Checkpointer(fabric, config("sync", False)).save(state, 1, tokens_seen=16)
    background = Checkpointer(fabric, cfg)
    report = background.save(state, 1, tokens_seen=16)
    out["pending"] = report.write_seconds is None
    out["stall_seconds"] = report.stall_seconds
    train_step()  # training goes on while the shards are written
    state["progress"]["step"] = 2
    background.wait()
    fabric.barrier()
    if fabric.is_global_zero:
        out["verified"] = verify(report.path)
        a, b = _files(sync.path), _files(report.path)
        out["same_names"] = sorted(a) == sorted(b)
        # Shards byte for byte; DCP's .metadata differs only in the path and a save id.
        out["same_shards"] = all(a[n] == b[n] for n in a if n.endswith(".distcp"))
        sync_w, async_w = load_model_state(sync.path), load_model_state(report.path)
        out["same_weights"] = all(torch.equal(sync_w[k], async_w[k]) for k in sync_w)
        out["completed"] = [str(r.path) for r in background.completed]

    # A shard write that fails on rank 1 only, after the save returned.
    write_data = dcp_fs._FileSystemWriter.write_data
    if fabric.global_rank == 1:

        def broken(self, plan, planner):
            raise OSError("disk on fire")

        dcp_fs._FileSystemWriter.write_data = broken
    failed = background.save(state, 2, tokens_seen=32)
    try:
        background.wait()
        out["failure"] = None
    except CheckpointError as e:
        out["failure"] = str(e)
    dcp_fs._FileSystemWriter.write_data = write_data
    fabric.barrier()
    if fabric.is_global_zero:
        out["failed_left"] = sorted(p.name for p in failed.path.parent.iterdir())
    # The next save works again.
    again = background.save(state, 3, tokens_seen=48)
    background.wait()
    if fabric.is_global_zero:
        out["again_verified"] = verify(again.path)
    return out


def test_async_fsdp_save_writes_the_sync_files_snapshots_and_fails_on_every_rank(tmp_path):
    from tests.orchestrator.parallel.test_strategies import run

    run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    zero = ranks[0]
    print(f"async FSDP save: training stalled {zero['stall_seconds']:.3f}s")
    assert all(r["pending"] for r in ranks)  # save() returned before the files were written
    assert zero["verified"] is None and zero["same_names"] and zero["same_shards"]
    assert zero["same_weights"]  # the state at save(), not after the next step
    assert zero["completed"] == [str(tmp_path / "async" / "checkpoints" / "step-00000001")]
    for r in ranks:  # every rank learns that rank 1 failed, and why (not 2 DCP tracebacks)
        assert r["failure"] is not None and "rank 1: OSError: disk on fire" in r["failure"], r
        assert "Traceback" not in r["failure"]
    assert zero["failed_left"] == ["step-00000001"]  # nothing published, no .partial left
    assert zero["again_verified"] is None


# -- 2. the trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(sample_data, tmp_path_factory):
    """FSDP, 2 processes, 4 steps (checkpoints at 2 and 4): synchronous and async saves side by
    side; then the async run resumed from its step-2 checkpoint, keeping only the last one."""
    from tests.orchestrator.parallel.test_strategies import (
        STRATEGIES,
        copy_checkpoint,
        start_worker,
    )

    root = tmp_path_factory.mktemp("fsdp-async")
    fsdp = STRATEGIES["fsdp"]
    runs = {
        "sync": start_worker(root / "sync", sample_data, *fsdp),
        "async": start_worker(
            root / "async", sample_data, *fsdp, "--checkpoint.async_save", "true"
        ),
    }
    for r in runs.values():
        r.wait()
    if runs["async"].ok:
        copy_checkpoint(root / "async", 2, root / "resumed")
        runs["resumed"] = start_worker(
            root / "resumed", sample_data, *fsdp,
            "--checkpoint.async_save", "true", "--checkpoint.keep_last", "1",
        ).wait()  # fmt: skip
    return runs


def test_async_fsdp_training_matches_resumes_bitwise_and_consolidates(fsdp_runs, tmp_path):
    from orchestrator.checkpoint.consolidate import load_model_state
    from orchestrator.checkpoint.manifest import verify
    from tests.orchestrator.parallel.test_strategies import STEPS, checkpoint, losses, records, run

    sync, background = fsdp_runs["sync"].check(), fsdp_runs["async"].check()
    assert "in the background (training stalled" in background.stdout
    assert losses(background.run_dir) == losses(sync.run_dir)  # bitwise
    for step in (2, STEPS):
        assert verify(checkpoint(background.run_dir, step)) is None
        assert sorted(_files(checkpoint(background.run_dir, step))) == sorted(
            _files(checkpoint(sync.run_dir, step))
        )
    # Resumed from the async step-2 checkpoint: steps 3 and 4 as in the straight run.
    resumed = fsdp_runs["resumed"].check()
    assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert [r["step"] for r in records(resumed.run_dir)] == [3, 4]
    assert losses(resumed.run_dir) == losses(background.run_dir)[2:]
    # Retention ran after the background publish: keep_last=1 left the last checkpoint only.
    left = sorted(p.name for p in (resumed.run_dir / "checkpoints").iterdir())
    assert left == [f"step-{STEPS:08d}"]
    # `orchestrator consolidate` reads the async checkpoint: the sync run's weights exactly.
    out = tmp_path / "full.pt"
    run([sys.executable, "-m", "orchestrator", "consolidate", str(background.run_dir),
         "--output", str(out)])  # fmt: skip
    weights = torch.load(out, weights_only=True)["model"]
    reference = load_model_state(checkpoint(sync.run_dir, STEPS))
    assert set(weights) == set(reference)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


if __name__ == "__main__":
    from tests.orchestrator.checkpoint.helpers import write_rank_checks

    sys.exit(write_rank_checks(checkpointer_checks, sys.argv[1]))
