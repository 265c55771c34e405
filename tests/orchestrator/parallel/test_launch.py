"""orchestrator/parallel/launch.py: a failing rank's error names that rank under every launcher."""

import multiprocessing
import os
import traceback

import torch.distributed as dist

from orchestrator.parallel import launch


def _rank(rank: int, store: str) -> None:
    # As under Fabric's own launcher: a process group, but no RANK / WORLD_SIZE variables.
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        if rank == 1:
            launch.fail_fast(ValueError("bad batch on purpose"))  # exits
    except BaseException:
        traceback.print_exc()  # in the test's failure message
        os._exit(3)
    os._exit(0)


def test_failing_rank_is_named_by_its_process_group(tmp_path, capfd):
    fork = multiprocessing.get_context("fork")  # this process's imports: starts in milliseconds
    procs = [fork.Process(target=_rank, args=(r, tmp_path / "store")) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    err = capfd.readouterr().err
    assert procs[1].exitcode == 1, err
    assert "error: rank 1/2 failed: ValueError: bad batch on purpose" in err, err
