"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to a minimum.

Stepped once per optimizer step, never per micro-batch (a known pitfall of older trainers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


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
            return self.peak_lr * (step + 1) / self.warmup_steps
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> LambdaLR:
    shape = WarmupDecay(
        peak_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        warmup_steps=cfg.schedule.warmup_steps,
        decay_steps=cfg.schedule.decay_steps or cfg.train.max_steps,
        decay=cfg.schedule.decay,
    )
    # A plain lambda, not the dataclass: LambdaLR saves callable objects into its state dict,
    # and a resumed run must follow the current config's schedule, not the checkpoint's.
    return LambdaLR(optimizer, lambda step: shape(step))
