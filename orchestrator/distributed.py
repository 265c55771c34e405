"""Building the Fabric object and the few collective helpers the trainer needs."""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

T = TypeVar("T")


def launched_by_fabric_cli() -> bool:
    """`fabric run` has already created the processes and passes its settings in LT_* variables."""
    return os.environ.get("LT_CLI_USED", "0") == "1"


def build_fabric(cfg, loggers: list | None = None) -> Fabric:
    """A Fabric for cfg.strategy; under `fabric run` the CLI's accelerator/devices/precision win."""
    from lightning.fabric.strategies import DDPStrategy

    s = cfg.strategy
    strategy: Any = s.name
    if s.name == "ddp":
        strategy = DDPStrategy(process_group_backend=None)  # nccl on GPU, gloo on CPU
    elif s.name == "single":
        strategy = "auto"
    settings = dict(
        accelerator=s.accelerator,
        devices=1 if s.name == "single" else s.devices,
        num_nodes=s.num_nodes,
        precision=s.precision,
    )
    if launched_by_fabric_cli():
        # Fabric refuses a constructor argument that conflicts with the CLI's: leave those to it.
        settings = {k: v for k, v in settings.items() if f"LT_{k.upper()}" not in os.environ}
    return Fabric(strategy=strategy, loggers=loggers, **settings)


def on_rank_zero(fabric: Fabric, fn: Callable[[], T]) -> T | None:
    """Run `fn` on global rank 0 only (file writes, prints, logging); the one place that decides."""
    if fabric.is_global_zero:
        return fn()
    return None


def gather_object(fabric: Fabric, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if fabric.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def threads_per_process(devices: int) -> None:
    """On CPU, N processes on C cores each get C/N threads unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, devices)))
