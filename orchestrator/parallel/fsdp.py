"""FSDP2 (`strategy.name: fsdp`): `fully_shard` on every transformer block and on the root,
through Fabric's ModelParallelStrategy (Fabric's FSDPStrategy is FSDP1, which refuses CPUs).

HSDP (strategy.fsdp_shard_size = S, a divisor of the world size W below it): the same units over
a 2-D mesh (W/S replicas x S shards; ranks r*S .. r*S+S-1 form replica r, one node each when S is
the GPUs per node). FSDP2 then all-gathers and reduce-scatters within a replica and all-reduces
the reduced shards across replicas.

Checkpoint: a directory of per-rank shards (torch.distributed.checkpoint), or one gathered
file with strategy.sharded_checkpoint=false. The shards can also be written in the background
(`FSDP2Strategy.async_save_checkpoint`, checkpoint.async_save): the same files.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.strategies import ModelParallelStrategy
from lightning_fabric.strategies.model_parallel import _has_dtensor_modules
from lightning_fabric.utilities.load import _METADATA_FILENAME
from lightning_fabric.utilities.types import _Stateful
from torch import nn
from torch.distributed.checkpoint import async_save, save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (  # public from torch 2.6
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)

from orchestrator.parallel.activation_checkpointing import transformer_blocks
from orchestrator.parallel.init import FullTensorInit, materialize_sharded


def data_parallel_mesh(device_mesh: DeviceMesh, shard_size: int | None = None) -> DeviceMesh:
    """The mesh `fully_shard` gets: Fabric's data-parallel dimension (1-D: full sharding), or,
    given a `shard_size` that divides it into more than one group, a 2-D ("replicate", "shard")
    mesh over the same ranks (HSDP: FSDP2 replicates over dim 0 and shards over dim 1)."""
    mesh = (
        device_mesh["data_parallel"]
        if "data_parallel" in (device_mesh.mesh_dim_names or ())
        else device_mesh
    )
    world = mesh.size()
    if not shard_size or shard_size >= world:
        return mesh
    if world % shard_size:  # Config.validate refuses this before launch
        raise ValueError(f"strategy.fsdp_shard_size={shard_size} does not divide {world} ranks")
    if mesh.ndim != 1 or world != torch.distributed.get_world_size():
        raise ValueError("HSDP needs a data-parallel mesh of all ranks (no tensor parallelism)")
    # Collective (creates the replica and shard process groups): every rank parallelizes.
    # Row-major: shard groups are consecutive ranks, i.e. one node when shard_size = devices.
    return init_device_mesh(
        mesh.device_type,
        (world // shard_size, shard_size),
        mesh_dim_names=("replicate", "shard"),
    )


def parallelize_fsdp(
    model: nn.Module,
    device_mesh,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    shard_size: int | None = None,
) -> nn.Module:
    """`fully_shard` every transformer block, the embedding and the output head (when untied),
    then the root (the rest: final norm; tied embeddings). Fabric calls it in `fabric.setup`,
    the last step of `parallelize` (checkpointing and compilation are already applied).

    `param_dtype=torch.bfloat16` gathers parameters in bf16 for compute while master weights,
    gradient reduction and the optimizer stay fp32 (FSDP2's MixedPrecisionPolicy).
    `shard_size`: HSDP over groups of that many ranks (`data_parallel_mesh`).
    """
    mesh = data_parallel_mesh(device_mesh, shard_size)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        _shard(block, reshard_after_forward and i < len(blocks) - 1, **kwargs)
    # A decoder's untied embedding and output head: units of their own, so backward reduces the
    # head's gradients as soon as they exist instead of holding them (in bf16 and fp32) with the
    # embedding's to the end. (The encoder-decoder reads its embedding twice: it stays in the root.)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.arch == "decoder" and not cfg.tie_embeddings:
        _shard(model.embed, reshard_after_forward, **kwargs)
        _shard(model.lm_head, False, **kwargs)  # backward's first
    _shard(model, reshard_after_forward, **kwargs)
    return model


RESHARD_AFTER_FORWARD = "reshard_after_forward_in_training"  # each unit's setting, kept on it


def _shard(module: nn.Module, reshard_after_forward: bool, **kwargs) -> None:
    fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    setattr(module, RESHARD_AFTER_FORWARD, reshard_after_forward)  # restored after `gathered`


@contextmanager
def gathered(model: nn.Module):
    """FSDP2: every unit of `model` stays gathered from its first forward to the end of the block,
    then reshards. For in-loop evaluation and generation, whose many small forwards (one per
    generated token) would otherwise all-gather every block each time (~2.2 GB per token per rank
    at 1.1B in bf16). Costs one gathered copy of the weights per rank meanwhile. Other models: as
    they are."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(
                getattr(unit, RESHARD_AFTER_FORWARD, True), recurse=False
            )


class FSDP2Strategy(ModelParallelStrategy):
    """Fabric's ModelParallelStrategy (FSDP2), accepting an optimizer built before sharding.

    `fully_shard` replaces every parameter by a sharded DTensor parameter of the same name; the
    optimizer's parameter groups are re-pointed to those (its state is still empty), so the
    trainer builds model and optimizer the same way under every strategy.
    """

    def module_init_context(self, empty_init: bool | None = None):
        # Build on the meta device: no rank ever holds the whole model (4.4 GB in fp32 at 1.1B).
        # The constructor's random draws still happen, one full tensor at a time on the process's
        # device, so `setup_module` initialises each shard with bitwise the weights (and leaves the
        # generator in the state) of an unsharded build under DDP.
        stack = ExitStack()
        stack.enter_context(super().module_init_context(empty_init=True))
        stack.enter_context(FullTensorInit(self.root_device))
        return stack

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = self._parallelize_fn(module, self.device_mesh)
        if any(t.is_meta for t in chain(module.parameters(), module.buffers())):
            materialize_sharded(module, self.root_device)  # only this rank's shards
        return module

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

    def clip_gradients_norm(
        self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True
    ):
        # Over DTensor gradients, clip_grad_norm_ returns the norm as a DTensor: the trainer takes
        # a plain tensor (the same value on every rank), as from every other strategy.
        norm = super().clip_gradients_norm(
            module, optimizer, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_checkpoint(self, path, state, storage_options=None, filter=None):
        # The full-state-dict variant torch.save's straight to `path` without creating its folder.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    def save_sharded_checkpoint(self, path, state: dict[str, Any], storage_writer) -> None:
        """`save_checkpoint` with sharded checkpoints (the same files), through `storage_writer`
        (a torch.distributed.checkpoint FileSystemWriter for `path`, e.g. one that hashes the
        files as it writes them). Collective; `state` holds unwrapped objects."""
        self.async_save_checkpoint(path, state, None, storage_writer=storage_writer, blocking=True)

    def async_save_checkpoint(
        self, path, state: dict[str, Any], process_group, storage_writer=None, blocking=False
    ) -> Future | None:
        """What `save_checkpoint` writes with sharded checkpoints (Lightning's `_save_checkpoint`
        in lightning/fabric/strategies/model_parallel.py: model and optimizer shards through
        torch.distributed.checkpoint, everything else in rank 0's `meta.pt`), written by a
        background thread. Collective. Returns after every shard is copied to CPU memory (and
        `meta.pt` written); the future completes when every rank's files and DCP's `.metadata`
        are on disk, and raises on every rank if any rank failed.

        `state` holds unwrapped objects (`_unwrap_objects`). `process_group`: a gloo group of all
        ranks that nothing else uses (the writing thread runs its collectives while training
        runs its own on the default group). `storage_writer`: see `save_sharded_checkpoint`;
        `blocking`: write now, in this thread (that method).
        """
        if not self._save_distributed_checkpoint:
            raise NotImplementedError("async_save_checkpoint writes sharded checkpoints only")
        path = Path(self.broadcast(path))
        modules = [obj for obj in state.values() if _has_dtensor_modules(obj)]
        if len(modules) != 1:
            raise ValueError(f"expected one FSDP-sharded model in the state, found {len(modules)}")
        # Local shards where they are (cpu_offload=False): DCP's stager copies them to CPU
        # memory once (Lightning's cpu_offload=True would copy GPU shards twice). Same files.
        options = StateDictOptions(full_state_dict=False, cpu_offload=False)
        converted: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for key, obj in state.items():
            if isinstance(obj, nn.Module):
                converted[key] = get_model_state_dict(obj, options=options)
            elif isinstance(obj, torch.optim.Optimizer):
                converted[key] = get_optimizer_state_dict(modules[0], obj, options=options)
            else:  # Lightning's "metadata": everything but modules and optimizers
                metadata[key] = obj.state_dict() if isinstance(obj, _Stateful) else obj
        path.mkdir(parents=True, exist_ok=True)
        if blocking:
            save(converted, checkpoint_id=path, storage_writer=storage_writer)
            if self.global_rank == 0:
                torch.save(metadata, path / _METADATA_FILENAME)
            return None
        future = async_save(
            converted,
            checkpoint_id=path,
            storage_writer=storage_writer,
            process_group=process_group,
        )
        # After async_save on every rank: should this fail, no rank's writing thread waits for a
        # rank that never started one.
        if self.global_rank == 0:
            torch.save(metadata, path / _METADATA_FILENAME)  # small: written now, a snapshot
        return future

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
