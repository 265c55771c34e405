"""The process count stated before start, and its warnings (orchestrator/training/preflight.py)."""

import os

from orchestrator.config import load_config
from orchestrator.training.preflight import process_count, report_processes


def config(*argv):
    return load_config(["--model.name", "tiny", *argv])


def test_process_count_is_ranks_times_workers_plus_one():
    cfg = config("--strategy.devices", "8", "--data.num_workers", "3")
    assert process_count(cfg) == (4, 32)


def test_stated_once_per_node_and_warns_naming_the_keys(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    cores = len(os.sched_getaffinity(0))
    cfg = config("--strategy.devices", str(cores), "--data.num_workers", "4")
    warnings = report_processes(cfg)
    err = capsys.readouterr().err
    assert (
        f"processes per node: {5 * cores} = strategy.devices {cores} x (1 rank + data.num_workers 4"
        in err
    )
    assert any("SLURM_CPUS_PER_TASK=4" in w and "data.num_workers" in w for w in warnings)
    assert any(f"exceed the {cores} CPU cores" in w and "strategy.devices" in w for w in warnings)
    assert "warning: " in err
    # Within the limits: stated, no warning.
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert report_processes(config("--strategy.devices", "1", "--data.num_workers", "0")) == []
    assert "warning" not in capsys.readouterr().err
    # The other ranks of the node say nothing.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert report_processes(cfg) == [] and capsys.readouterr().err == ""


def test_async_save_that_cannot_fit_host_memory_is_refused_before_launch():
    import pytest

    from orchestrator.schema import ConfigError
    from orchestrator.training.preflight import check_async_save_memory
    from tests.conftest import REPO_ROOT

    def cfg(*extra):
        return load_config(
            ["--config", str(REPO_ROOT / "configs/tinyllama-1.1b.yaml"), "--strategy.name", "fsdp",
             "--strategy.accelerator", "cpu", "--strategy.devices", "2", *extra]
        )  # fmt: skip

    # TinyLlama-1.1B on 2 CPU processes: 2 x 28 bytes x 1.1e9 / 2 = 28.7 GiB > a 24 GiB machine.
    with pytest.raises(ConfigError, match="checkpoint.async_save=false"):
        check_async_save_memory(cfg("--checkpoint.async_save", "true"), memory=24 * 2**30)
    check_async_save_memory(cfg("--checkpoint.async_save", "true"), memory=64 * 2**30)  # fits
    check_async_save_memory(cfg(), memory=24 * 2**30)  # a synchronous save makes no copy
