"""A step's bookkeeping in one collective and one host sync.

Besides the gradient reduction, every rank needs the same few numbers each step: the mean loss
(the guard judges it), whether any rank got a stop signal, and how many sequences of which epoch
each rank read. They travel in one small all-reduce (a sum over ranks, without Fabric's extra
barrier); the result and the gradient norm then come to the host in one copy. Batch fingerprints
are not part of it: the monitor gathers them at log steps only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning_fabric import Fabric

from orchestrator.parallel.slurm import StopSignals
from orchestrator.training.epochs import EpochTracker


@dataclass
class StepTotals:
    loss: float  # mean over ranks of the step's mean micro-batch loss
    grad_norm: float  # global gradient norm, before clipping
    stop: int  # the strongest stop signal any rank received (parallel/slurm.py)
    epoch_counts: list[float]  # every rank's EpochTracker.step_counts(), added up


def sync_step(
    fabric: Fabric,
    step_loss: torch.Tensor,
    grad_norm: torch.Tensor,
    stop_signals: StopSignals,
    epochs: EpochTracker,
) -> StepTotals:
    """The step's totals over all ranks: one all-reduce, then one device-to-host copy."""
    host = [*stop_signals.flags(), *epochs.step_counts()]
    local = torch.tensor(host, dtype=step_loss.dtype)
    if fabric.device.type == "cuda":
        local = local.pin_memory()  # so that the copy below does not wait for the GPU
    values = torch.cat([step_loss.reshape(1), local.to(fabric.device, non_blocking=True)])
    if fabric.world_size > 1:
        dist.all_reduce(values)  # the one bookkeeping collective of the step (sum)
        values[0:1].div_(fabric.world_size)  # loss: the mean over ranks
    # The one host sync of the step: the guard decides on the host whether to update.
    totals = torch.cat([values, grad_norm.detach().reshape(1).to(values)]).tolist()
    return StepTotals(
        loss=totals[0],
        grad_norm=totals[-1],
        stop=StopSignals.strongest(totals[1:3]),
        epoch_counts=totals[3:-1],
    )
