"""FSDP2 (`strategy.name: fsdp`): `fully_shard` on every transformer block and on the root,
through Fabric's ModelParallelStrategy (Fabric's FSDPStrategy is FSDP1, which refuses CPUs).

Checkpoint: a directory of per-rank shards (torch.distributed.checkpoint), or one gathered
file with strategy.sharded_checkpoint=false.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities.types import _Stateful
from torch import nn

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6 has FSDP2 under its composable API only
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from orchestrator.parallel.activation_checkpointing import (
    apply_activation_checkpointing,
    transformer_blocks,
)


def parallelize_fsdp(
    model: nn.Module,
    device_mesh,
    *,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool | str = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """`fully_shard` every transformer block, then the root (embedding, final norm, output head).

    `param_dtype=torch.bfloat16` gathers parameters in bf16 for compute while master weights,
    gradient reduction and the optimizer stay fp32 (FSDP2's MixedPrecisionPolicy).
    """
    mesh = (
        device_mesh["data_parallel"]
        if "data_parallel" in (device_mesh.mesh_dim_names or ())
        else device_mesh
    )
    apply_activation_checkpointing(model, activation_checkpointing)  # a no-op for false / none
    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(
            block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs
        )
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Fabric's ModelParallelStrategy (FSDP2), accepting an optimizer built before sharding.

    `fully_shard` replaces every parameter by a sharded DTensor parameter of the same name; the
    optimizer's parameter groups are re-pointed to those (its state is still empty), so the
    trainer builds model and optimizer the same way under every strategy.
    """

    def module_init_context(self, empty_init: bool | None = None):
        # Build (and initialise) on the process's device, as DDP does: the same weights under every
        # strategy, and a 1B model initialised in seconds on a GPU instead of minutes on CPU cores.
        # fully_shard then keeps each rank's shard only.
        stack = ExitStack()
        stack.enter_context(super().module_init_context(empty_init=empty_init))
        if not empty_init:
            stack.enter_context(self.root_device)
        return stack

    def setup_module_and_optimizers(self, module, optimizers, scheduler=None):
        names = {id(p): n for n, p in module.named_parameters()}
        module = self.setup_module(module)
        sharded = dict(module.named_parameters())
        for optimizer in optimizers:
            if optimizer.state:
                raise RuntimeError("FSDP: set up the optimizer before its first step")
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return module, [self.setup_optimizer(o) for o in optimizers], scheduler

    def save_checkpoint(self, path, state, storage_options=None, filter=None):
        # The full-state-dict variant torch.save's straight to `path` without creating its folder.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    def load_checkpoint(self, path, state=None, strict=True, weights_only=None):
        # Lightning's sharded (DCP) load puts the saved state dict of stateful objects (scheduler,
        # data loader, ...) into `state` in place of the objects instead of restoring them.
        stateful = {}
        if isinstance(state, dict):
            stateful = {
                k: v
                for k, v in state.items()
                if isinstance(v, _Stateful)
                and not isinstance(v, (nn.Module, torch.optim.Optimizer))
            }
        remainder = super().load_checkpoint(
            path, state=state, strict=strict, weights_only=weights_only
        )
        for key, obj in stateful.items():
            if state.get(key) is not obj:
                obj.load_state_dict(state[key])
                state[key] = obj
        return remainder
