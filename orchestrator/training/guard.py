"""Bad-step detection: a step whose loss or gradient is not finite, or whose loss spikes far
above its running mean, does not update the weights; too many in a row roll the run back.

Decisions use the all-reduced loss and the global gradient norm, so every rank decides alike.
The guard's running statistics are part of the checkpoint, so a resumed run judges the same way.
"""

from __future__ import annotations

import math
from typing import Any


class StepGuard:
    def __init__(self, cfg) -> None:
        self.cfg = cfg.guard
        self.loss_mean: float | None = None  # exponential moving average of good-step losses
        self.good_steps = 0
        self.consecutive_bad = 0
        self.bad_steps = 0
        self.rollbacks = 0

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step, else why the update must be skipped."""
        if self.cfg.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if (
            self.cfg.spike_factor > 0
            and self.loss_mean is not None
            and self.good_steps >= self.cfg.spike_warmup
            and loss > self.cfg.spike_factor * self.loss_mean
        ):
            return f"loss spike ({loss:.4f} > {self.cfg.spike_factor} x running mean {self.loss_mean:.4f})"
        return None

    def record(self, reason: str | None, loss: float) -> bool:
        """Count the step; True when the run must roll back to its last checkpoint."""
        if reason is None:
            self.consecutive_bad = 0
            self.good_steps += 1
            self.loss_mean = loss if self.loss_mean is None else 0.95 * self.loss_mean + 0.05 * loss
            return False
        self.bad_steps += 1
        self.consecutive_bad += 1
        return bool(self.cfg.rollback_after) and self.consecutive_bad >= self.cfg.rollback_after

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_mean": self.loss_mean,
            "good_steps": self.good_steps,
            "consecutive_bad": self.consecutive_bad,
            "bad_steps": self.bad_steps,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_mean = state["loss_mean"]
        self.good_steps = state["good_steps"]
        self.consecutive_bad = state["consecutive_bad"]
        self.bad_steps = state["bad_steps"]
        self.rollbacks = state["rollbacks"]
