"""`orchestrator train`, recording the torch.distributed collectives each rank calls, step by step.

    python tests/collectives_worker.py LOG_PREFIX <orchestrator train arguments>

Each rank writes LOG_PREFIX.<rank>.json: a list with one entry per optimizer step, the names of
the collectives it called from Python during that step (from the monitor's begin_step to the
next). DDP's gradient reduction runs in C++ (its reducer) and is not among them.
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single",
)  # fmt: skip
steps: list[list[str]] = []  # collectives per step; before the first step: not recorded
rank = [0]
depth = [0]  # only the outermost call counts (all_gather_object calls all_gather itself)


def counted(name, collective):
    def call(*args, **kwargs):
        if depth[0] == 0 and steps:
            steps[-1].append(name)
        depth[0] += 1
        try:
            return collective(*args, **kwargs)
        finally:
            depth[0] -= 1
            if dist.is_initialized():
                rank[0] = dist.get_rank()

    return call


for name in COLLECTIVES:
    if hasattr(dist, name):
        setattr(dist, name, counted(name, getattr(dist, name)))


def main() -> int:
    log_prefix, argv = sys.argv[1], sys.argv[2:]
    from orchestrator import train
    from orchestrator.training.monitor import Monitor

    begin_step = Monitor.begin_step

    def begin_step_marked(self):
        steps.append([])
        return begin_step(self)

    Monitor.begin_step = begin_step_marked

    def write() -> None:
        Path(f"{log_prefix}.{rank[0]}.json").write_text(json.dumps(steps))

    atexit.register(write)
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
