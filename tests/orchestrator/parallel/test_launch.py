"""orchestrator/parallel/launch.py: a failing rank's error names that rank under every launcher;
the host allocator returns freed large temporaries to the system."""

import multiprocessing
import os
import subprocess
import sys
import traceback

import pytest
import torch.distributed as dist

from orchestrator.parallel import launch
from tests.conftest import REPO_ROOT
from tests.orchestrator.parallel.test_strategies import clean_env


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


_ALLOCATION_PATTERN = """
import os, sys, torch
if sys.argv[1] == "fixed":
    from orchestrator.parallel.launch import fix_host_allocator
    fix_host_allocator()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(4 << 20); del x  # a 16 MiB block freed: glibc raises its mmap threshold to it
base = rss()
big, small = [], []
for _ in range(64):  # 4 MiB temporaries, each followed by something small that stays
    big.append(torch.ones(1 << 20))
    small.append(torch.ones(16))
del big
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_large_temporaries_go_back_to_the_system():
    """The pattern that made FSDP ranks grow to 11.7 GiB at 1.1B: with glibc's defaults 256 MiB
    of freed 4 MiB temporaries stay resident; with fix_host_allocator they are returned."""
    env = {k: v for k, v in clean_env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = {}
    for mode in ("default", "fixed"):
        proc = subprocess.run(
            [sys.executable, "-c", _ALLOCATION_PATTERN, mode],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        kept[mode] = float(proc.stdout.split()[-1])
    assert kept["default"] > 128, kept  # what the fix is for (glibc's dynamic threshold)
    assert kept["fixed"] < 16, kept
