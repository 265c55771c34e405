"""Fault drills (`faults.*`): deliberate faults that exercise the guard and rollback in tests and
drills. Installed on the model at set-up, so the training loop itself knows nothing of them."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.config import Config


class NanLossDrill:
    """faults.nan_loss_at_steps: the training loss of these steps becomes NaN, once per step
    number per process (a transient fault: the step after a rollback replays clean).

    A forward hook on the model: every training micro-batch of a listed step (the first time that
    step runs) returns `loss * nan`, as a fault in the forward pass would.
    """

    def __init__(self, steps: list[int], progress_of: Any, micro_batches: int) -> None:
        self.steps = set(steps)
        self.progress_of = progress_of  # () -> the training state's current progress dict
        self.micro_batches = micro_batches
        self.fired: set[int] = set()
        self.calls: dict[int, int] = {}

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None  # validation and generation run clean
        step = self.progress_of()["step"] + 1
        if step not in self.steps or step in self.fired:
            return None
        self.calls[step] = self.calls.get(step, 0) + 1
        if self.calls[step] == self.micro_batches:  # the step's last micro-batch: done
            self.fired.add(step)
        return output * float("nan")


def install_fault_drills(
    model: torch.nn.Module, cfg: Config, state: dict[str, Any], micro_batches: int
) -> None:
    """Hook the configured drills onto `model` (the module the training loop calls)."""
    if cfg.faults.nan_loss_at_steps:
        drill = NanLossDrill(cfg.faults.nan_loss_at_steps, lambda: state["progress"], micro_batches)
        model.register_forward_hook(drill)
