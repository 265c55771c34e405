"""Activation checkpointing of transformer blocks, `full` or `selective`, under every strategy.

`full` keeps only each block's input and recomputes the block in backward; `selective` also keeps
the outputs of matmuls and attention kernels and recomputes the cheap, memory-bound rest (norms,
RoPE, activations, residual adds).

Selective checkpointing sees the ops a block runs through torch's dispatcher, so it can keep only
the outputs of kernels registered as torch ops (`SAVED_OPS`): aten's matmuls and SDPA kernels;
flash-attn >= 2.7 (`torch.ops.flash_attn._flash_attn_forward`; the gpu extra's floor); xformers'
attention backends (`torch.ops.xformers_flash.flash_fwd`, `xformers_flash3.flash_fwd`, and
cutlass through `aten._efficient_attention_forward`, or `xformers.efficient_attention_forward_cutlass`
in older releases) and its fused SwiGLU's dual matmul (`xformers.dual_gemm_silu_identity_mul`).
A kernel called outside the dispatcher (flash-attn < 2.7, which calls its CUDA extension
directly; Triton kernels such as liger-kernel's and flash-attn's norms, RoPE and SwiGLU) is
recomputed in backward like any unlisted op: for the norms, RoPE and activations that is the
intent; for flash-attn < 2.7 it means the attention forward runs twice.
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


# Where each family keeps its transformer blocks, in forward order: Llama's `blocks`; the
# encoder-decoder's `encoder_blocks`, then `decoder_blocks` (models/encdec.py).
BLOCK_LISTS = ("blocks", "encoder_blocks", "decoder_blocks")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units that strategies shard, checkpoint and compile, in forward order."""
    blocks = [
        block
        for name in BLOCK_LISTS
        if isinstance(getattr(model, name, None), nn.ModuleList)
        for block in getattr(model, name)
    ]
    if not blocks:
        raise TypeError(
            f"{type(model).__name__} has no ModuleList of transformer blocks ({', '.join(BLOCK_LISTS)})"
        )
    return blocks


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


# (namespace, op) whose outputs selective checkpointing keeps, where registered (a library that
# is not installed, or a release without the op, simply contributes nothing).
SAVED_OPS: tuple[tuple[str, str], ...] = (
    # matmuls (nn.Linear: mm / addmm; batched: bmm)
    ("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"),
    # torch's SDPA kernels, and the aten kernels xformers' backends call (cutlass; PyTorch's flash)
    ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("aten", "_scaled_dot_product_efficient_attention"), ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_efficient_attention_forward"), ("aten", "_flash_attention_forward"),
    # flash-attn >= 2.7 (torch.library.custom_op, with torch >= 2.4)
    ("flash_attn", "_flash_attn_forward"), ("flash_attn", "_flash_attn_varlen_forward"),
    # xformers: memory_efficient_attention's forward backends, and the fused SwiGLU's dual matmul
    ("xformers_flash", "flash_fwd"), ("xformers_flash3", "flash_fwd"),
    ("xformers", "efficient_attention_forward_cutlass"), ("xformers", "dual_gemm_silu_identity_mul"),
)  # fmt: skip


def _save_ops() -> set:
    """The registered ops among SAVED_OPS (resolved per call: a library imported after this module
    registers its ops on import, before the first forward that uses it)."""
    ops = set()
    for namespace, name in SAVED_OPS:
        packet = getattr(getattr(torch.ops, namespace), name, None)  # None where not registered
        overload = getattr(packet, "default", None)
        if overload is not None:
            ops.add(overload)
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
