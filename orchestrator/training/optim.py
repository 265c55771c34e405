"""The optimizer the trainer builds (optimizer.name): torch's AdamW or Adafactor over the model's
parameters (light imports, so that the benchmarks build exactly the trainer's optimizer on
machines without the data stack)."""

from __future__ import annotations

import torch
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

from orchestrator.config import Config


def build_optimizer(
    model: torch.nn.Module, cfg: Config, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """optimizer.name's optimizer, with weight decay on matrices only (not on norm gains).

    `device`: where the parameters will live, when they are still on the meta device (FSDP2
    materialises each rank's shards after the optimizer is built)."""
    decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and _ndim(p) < 2]
    o = cfg.optimizer
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if o.name == "adafactor":
        return torch.optim.Adafactor(
            groups,
            lr=o.lr,
            beta2_decay=o.beta2_decay,
            d=o.clip_threshold,
            **adafactor_implementation(o.implementation, decay + no_decay, device),
        )
    return torch.optim.AdamW(
        groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **adamw_implementation(o.implementation, decay + no_decay, device),
    )


def _ndim(p: torch.Tensor) -> int:
    # A ZeRO-3 parameter built under deepspeed.zero.Init holds an empty placeholder (1-D).
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim


def _device_type(p: torch.Tensor, device: torch.device | None) -> str:
    return device.type if p.is_meta and device is not None else p.device.type


def adamw_implementation(
    implementation: str, params: list[torch.Tensor], device: torch.device | None = None
) -> dict[str, bool]:
    """torch.optim.AdamW's `fused` / `foreach` flags for optimizer.implementation."""
    if implementation == "auto":
        fusable = all(
            p.is_floating_point() and _device_type(p, device) in ("cpu", "cuda") for p in params
        )
        implementation = "fused" if fusable else "foreach"
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def adafactor_implementation(
    implementation: str, params: list[torch.Tensor], device: torch.device | None = None
) -> dict[str, bool]:
    """torch.optim.Adafactor's `foreach` flag for optimizer.implementation. It has no fused kernel;
    `auto` is foreach only where foreach kernels exist (CUDA): elsewhere torch's foreach ops fall
    back to a per-tensor loop and only add the batched temporaries."""
    if implementation == "fused":  # Config.validate refuses this before any process starts
        raise ValueError("torch's Adafactor has no fused implementation")
    if implementation == "auto":
        supported = _get_foreach_kernels_supported_devices()
        implementation = (
            "foreach" if all(_device_type(p, device) in supported for p in params) else "for-loop"
        )
    return {"foreach": implementation == "foreach"}
