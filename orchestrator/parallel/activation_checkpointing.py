"""Activation checkpointing of transformer blocks, `full` or `selective`, under every strategy.

`full` keeps only each block's input and recomputes the block in backward; `selective` also keeps
the outputs of matmuls and attention kernels and recomputes the cheap, memory-bound rest (norms,
RoPE, activations, residual adds).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


def checkpointing_mode(value: bool | str) -> str:
    """strategy.activation_checkpointing -> `none` | `selective` | `full` (true is full, false none)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in ("none", "selective", "full"):
        raise ValueError(f"activation checkpointing must be none, selective or full, got {value!r}")
    return value


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units that strategies shard, checkpoint and compile: `model.blocks`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList of transformer blocks")
    return list(blocks)


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> nn.Module:
    """Recompute each transformer block's activations during backward.

    The block's `forward` is replaced on the instance (no wrapper module), so parameter names and
    state-dict keys stay exactly those of models/llama.py under every strategy. Sharding hooks
    (FSDP2, ZeRO-3) sit on the module call and therefore outside the recomputed function.
    """
    mode = checkpointing_mode(mode)
    if mode == "none":
        return model
    for block in transformer_blocks(model):
        if getattr(block, "_activation_checkpointing", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward, mode == "selective")
        block._activation_checkpointing = True
    return model


def _checkpointed_forward(forward, selective, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation / generation: nothing to save for backward
        return forward(*args, **kwargs)
    if selective:
        return checkpoint(
            forward, *args, use_reentrant=False, context_fn=selective_checkpoint_context, **kwargs
        )
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _save_ops() -> set:
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    )  # fmt: skip
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    # flash-attn >= 2.6 registers its kernels as torch ops
    flash = getattr(torch.ops, "flash_attn", None)
    for n in ("_flash_attn_forward",):
        if flash is not None and hasattr(flash, n):
            ops.add(getattr(flash, n).default)
    return ops


def selective_checkpoint_context():
    """Context for `torch.utils.checkpoint(..., context_fn=...)`: keep the outputs of matmuls and
    attention kernels, recompute everything else (norms, RoPE, activations, residual adds) in
    backward. The recomputed ops are cheap and memory-bound; the saved ones are what would be
    costly to redo."""
    save = _save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
