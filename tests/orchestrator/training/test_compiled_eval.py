"""A compiled run (model.compile) keeps training compiled through in-loop evaluation: validation,
sample generation (a KV cache: a variant per layer index and cache state) and their like run
eagerly (orchestrator/parallel/compile.py `eager`), so they never spend the blocks' recompile
limit, which would leave training itself eager from then on."""

from __future__ import annotations

import pytest
import torch

from tests.training import TINY, data_args


@pytest.mark.slow
def test_eval_and_generation_leave_the_compiled_training_step_alone(sample_data, tmp_path, capfd):
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    from orchestrator.train import main as train_main

    torch._dynamo.reset()
    counters.clear()
    argv = [
        *TINY, *data_args(sample_data), "--run.dir", str(tmp_path / "run"),
        "--strategy.name", "single", "--strategy.devices", "1", "--train.global_batch_size", "4",
        "--model.compile", "true", "--train.max_steps", "3", "--checkpoint.interval", "0",
        "--eval.at_start", "true", "--eval.interval", "1",
        "--logging.sample_interval", "1", "--logging.sample_tokens", "12",
    ]  # fmt: skip
    # Hitting the recompile limit fails the run instead of warning and running eager.
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        assert train_main(argv) == 0
    assert "sample generation failed" not in capfd.readouterr().out  # (it would hit the limit)
    # The training step compiled the blocks (one graph serves them all: inlined modules),
    # and evaluation / generation compiled nothing of their own.
    assert counters["frames"]["ok"] >= 1
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()
