"""The optimizer the trainer builds: AdamW over the model's parameters (light imports, so that the
benchmarks build exactly the trainer's optimizer on machines without the data stack)."""

from __future__ import annotations

import torch

from orchestrator.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = cfg.optimizer
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **adamw_implementation(o.implementation, decay + no_decay),
    )


def adamw_implementation(implementation: str, params: list[torch.Tensor]) -> dict[str, bool]:
    """torch.optim.AdamW's `fused` / `foreach` flags for optimizer.implementation."""
    if implementation == "auto":
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        implementation = "fused" if fusable else "foreach"
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}
