"""How a built model becomes the one that trains: the same three steps, in the same order, for
every strategy (torchtitan's order): activation checkpointing, torch.compile, then sharding.

Checkpointing replaces each block's `forward` and compilation compiles each block's call in place
(parameter names unchanged); sharding is Fabric's `setup`: FSDP2 `fully_shard`s the blocks there
(`parallelize_fsdp`, the strategy's parallelize function), DeepSpeed partitions the model into
its engine, DDP wraps it. The optimizer is built before sharding, from the model as built (FSDP2:
still on the meta device; ZeRO-3: its partitions).
"""

from __future__ import annotations

from lightning_fabric import Fabric
from torch import nn

from orchestrator.config import Config
from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing
from orchestrator.parallel.compile import compile_blocks
from orchestrator.training.optim import build_optimizer


def parallelize(fabric: Fabric, model: nn.Module, cfg: Config):
    """model (built under `fabric.init_module()`) -> (model, optimizer), set up by `fabric`:
    strategy.activation_checkpointing, then model.compile, then the strategy's sharding."""
    apply_activation_checkpointing(model, cfg.strategy.activation_checkpointing)  # none: no-op
    if cfg.model.compile:  # each block in place (names and hooks unchanged)
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg, fabric.device)
    return fabric.setup(model, optimizer)
