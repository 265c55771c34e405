"""Learning-rate schedules: linear warmup, then cosine / linear / constant decay to a minimum, or
warmup-stable-decay (WSD: the peak until a decay phase of its own shape and length).

Stepped once per optimizer step, never per micro-batch (a known pitfall of older trainers).
`step` below is the number of optimizer steps already taken: step s of a run (1-based) trains at
lr(s - 1), and a phase starting at step S is at its beginning (progress 0) for run step S + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_lr(peak_lr: float, warmup_steps: int, step: int) -> float:
    """Linear warmup from peak/warmup (the first step) to peak."""
    return peak_lr * (step + 1) / warmup_steps


@dataclass
class WarmupDecay:
    """lr(step) / peak_lr, for `step` optimizer steps already taken."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay: str = "cosine"

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_lr(self.peak_lr, self.warmup_steps, step)
        if self.decay == "constant" or step >= self.decay_steps:
            return self.peak_lr if self.decay == "constant" else self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * shape

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak_lr


@dataclass
class WarmupStableDecay:
    """Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations"): linear warmup to the peak, the peak until `decay_start` steps,
    then `shape` down to min_lr over `decay_steps` steps, min_lr after. The stable phase does not
    depend on the run's length: one long run's checkpoints branch into cooldowns of any budget
    (checkpoint.branch_from)."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    decay_start: int
    decay_steps: int
    shape: str = "1-sqrt"

    def __post_init__(self) -> None:
        if self.shape not in WSD_SHAPES:
            raise ValueError(f"WSD shape must be one of {WSD_SHAPES}, got {self.shape!r}")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_lr(self.peak_lr, self.warmup_steps, step)
        if step < self.decay_start:
            return self.peak_lr
        progress = min(1.0, (step - self.decay_start) / self.decay_steps)
        if self.shape == "linear":
            factor = 1.0 - progress
        elif self.shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(progress)
        return self.min_lr + (self.peak_lr - self.min_lr) * factor

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak_lr


def schedule_shape(cfg) -> WarmupDecay | WarmupStableDecay:
    """The schedule of config `cfg` (schedule.*, optimizer.lr / min_lr, train.max_steps)."""
    s, max_steps = cfg.schedule, cfg.train.max_steps
    if s.decay == "wsd":
        return WarmupStableDecay(
            peak_lr=cfg.optimizer.lr,
            min_lr=cfg.optimizer.min_lr,
            warmup_steps=s.warmup_steps,
            decay_start=s.wsd_decay_start(max_steps),
            decay_steps=s.wsd_decay_length(max_steps),
            shape=s.wsd_shape,
        )
    return WarmupDecay(
        peak_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        warmup_steps=s.warmup_steps,
        decay_steps=s.decay_steps or max_steps,
        decay=s.decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> LambdaLR:
    shape = schedule_shape(cfg)
    # A plain lambda, not the dataclass: LambdaLR saves callable objects into its state dict,
    # and a resumed run must follow the current config's schedule, not the checkpoint's.
    return LambdaLR(optimizer, lambda step: shape(step))


def follow_schedule(scheduler: LambdaLR, peak_lr: float) -> None:
    """After loading a checkpoint into `scheduler` (and its optimizer): the lr of the next step
    from this run's schedule at the checkpoint's step, instead of the lr the checkpoint's run set
    (the optimizer state holds it), and this run's peak lr (optimizer.lr) as the schedule's base.
    A resume with the same config gets exactly the values it had; a branch (checkpoint.branch_from)
    or a resume with changed schedule keys starts on its own schedule at once."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [peak_lr] * len(groups)
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        lr = base * fn(scheduler.last_epoch)  # what LambdaLR.step computes
        if isinstance(group["lr"], torch.Tensor):  # a tensor lr (capturable optimizers) stays one
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = [
        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups
    ]
