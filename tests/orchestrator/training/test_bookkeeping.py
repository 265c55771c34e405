"""A training step's bookkeeping costs one collective beyond the gradient reduction."""

import json
import sys

from tests.conftest import REPO_ROOT
from tests.training import data_args, run_cli

QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


def test_a_demo_step_does_one_bookkeeping_collective(sample_data, tmp_path):
    """The demo config (DDP, 2 CPU processes): every step that is not a log, validation or
    checkpoint step calls exactly one collective from Python (the bookkeeping all-reduce; DDP
    reduces gradients in C++). Log steps add the gather of the batch fingerprints."""
    log = tmp_path / "collectives"
    run_cli(
        [sys.executable, str(REPO_ROOT / "tests" / "collectives_worker.py"), str(log)]
        + ["--config", str(QUICKSTART), *data_args(sample_data), "--run.dir", str(tmp_path / "run")]
        + ["--train.max_steps", "8", "--train.log_interval", "4", "--eval.interval", "0"]
        + ["--checkpoint.interval", "0", "--eval.at_start", "false"]
    )
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"collectives.{rank}.json").read_text())
        assert len(steps) == 8
        print(f"rank {rank}: collectives per step {steps}")
        for step, collectives in enumerate(steps, start=1):
            if step % 4:  # a plain step
                assert collectives == ["all_reduce"], (rank, step, collectives)
        # Log step 4: the bookkeeping all-reduce, then the fingerprints of steps 1-4 at once.
        assert steps[3] == ["all_reduce", "all_gather_object"], steps[3]
