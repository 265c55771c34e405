"""cfg.strategy -> a Lightning Fabric strategy that works on GPUs (NCCL) and on CPUs (gloo).

    ddp        DistributedDataParallel; checkpoint = one file written by rank 0.
    fsdp       FSDP2 (orchestrator/parallel/fsdp.py): per-rank shards, or one gathered file;
               with strategy.fsdp_shard_size, HSDP (sharded within groups, replicated across).
    deepspeed  ZeRO stage 1, 2 or 3 (orchestrator/parallel/deepspeed.py): DeepSpeed's shards.
    single     one process, no process group.

Every strategy gets the collective timeout `strategy.timeout_s`, so a rank that died or hangs
ends the job with an error instead of a hang. `orchestrator consolidate`
(orchestrator/checkpoint/consolidate.py) turns any of their checkpoints into one state dict.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import timedelta
from typing import Any

import torch
from lightning_fabric.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning_fabric.strategies.model_parallel import _has_dtensor_modules, _load_raw_module_state
from lightning_fabric.wrappers import _unwrap_objects
from torch import nn

from orchestrator.config import Config
from orchestrator.parallel.deepspeed import (
    CPUCapableDeepSpeedStrategy,
    deepspeed_config,
    grad_accum_dtype,
)
from orchestrator.parallel.fsdp import FSDP2Strategy, parallelize_fsdp


def strategy_label(cfg: Config) -> str:
    """`ddp`, `fsdp`, `deepspeed-zero3`, ... (for logs and messages)."""
    s = cfg.strategy
    return f"deepspeed-zero{s.zero_stage}" if s.name == "deepspeed" else s.name


def build_strategy(cfg: Config, accelerator: str) -> Any:
    """A Fabric strategy (object, or "auto") for cfg.strategy on `accelerator` ("cpu" / "cuda")."""
    s = cfg.strategy
    timeout = timedelta(seconds=s.timeout_s)
    on_gpu = accelerator == "cuda"
    if s.name == "ddp":
        # process_group_backend=None: NCCL on GPUs, gloo on CPUs.
        return DDPStrategy(process_group_backend=None, timeout=timeout)
    if s.name == "fsdp":
        param_dtype = torch.bfloat16 if s.precision == "bf16-mixed" else None
        shard = functools.partial(
            parallelize_fsdp,
            reshard_after_forward=s.reshard_after_forward,
            param_dtype=param_dtype,
            shard_size=s.fsdp_shard_size,
        )
        world = s.devices * s.num_nodes
        return FSDP2Strategy(
            parallelize_fn=shard,
            data_parallel_size=world,
            tensor_parallel_size=1,
            save_distributed_checkpoint=s.sharded_checkpoint,
            timeout=timeout,
        )
    if s.name == "deepspeed":
        return CPUCapableDeepSpeedStrategy(
            config=deepspeed_config(cfg, on_gpu),
            timeout=timeout,
            process_group_backend="nccl" if on_gpu else "gloo",
        )
    if s.name == "single":
        return SingleDeviceStrategy(
            device=torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        )
    return "auto"


def hsdp_shape(cfg: Config) -> tuple[int, int] | None:
    """(replicas, shards per replica) when cfg.strategy is HSDP, else None."""
    s = cfg.strategy
    world = s.devices * s.num_nodes
    if s.name != "fsdp" or not s.fsdp_shard_size or s.fsdp_shard_size >= world:
        return None
    return world // s.fsdp_shard_size, s.fsdp_shard_size


def describe_strategy(cfg: Config) -> str:
    """The start-up line's word on the strategy: its name, precision and what DeepSpeed chose."""
    s = cfg.strategy
    text = f"{s.name} | {s.precision}"
    if shape := hsdp_shape(cfg):
        text = f"fsdp HSDP {shape[0]} replicas x {shape[1]} shards | {s.precision}"
    if s.name == "deepspeed":
        text = f"deepspeed ZeRO-{s.zero_stage} | {s.precision}"
        if s.precision in ("bf16-mixed", "bf16-true"):
            text += f" (grad_accum_dtype={grad_accum_dtype(cfg)})"
    return text


def scheduler_optimizer(optimizer):
    """The torch optimizer a learning-rate scheduler drives: under DeepSpeed, the one inside the ZeRO
    optimizer (whose parameter groups DeepSpeed steps); otherwise `optimizer` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper
    if not isinstance(inner, torch.optim.Optimizer) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        return inner.optimizer  # DeepSpeed's ZeRO optimizer wraps the client's torch optimizer
    return optimizer


# --------------------------------------------------------------------------------------------
# Loading a full (consolidated) state dict into a set-up model of any strategy
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def load_full_model_state(
    fabric, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load a plain state dict (models/llama.py names, e.g. from `load_model_state`) into `model`
    after `fabric.setup`, whatever the strategy: replicated, FSDP2-sharded or ZeRO-partitioned.
    Every rank passes the same full state dict."""
    module = _unwrap_objects(model)
    if isinstance(fabric.strategy, DeepSpeedStrategy):  # `module` is a DeepSpeedEngine
        import deepspeed  # heavy import (seconds): ZeRO runs only

        inner = module.module
        params = list(inner.parameters())
        stage3 = module.zero_optimization_stage() == 3
        context = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=0)
            if stage3
            else contextlib.nullcontext()
        )
        with context:
            _load_plain(inner, state_dict, strict)
        if hasattr(module.optimizer, "refresh_fp32_params"):
            module.optimizer.refresh_fp32_params()  # the optimizer's fp32 master copy follows the weights
        return
    if _has_dtensor_modules(module):
        _load_raw_module_state(state_dict, module, world_size=fabric.world_size, strict=strict)
        return
    inner = getattr(module, "module", module)  # DistributedDataParallel
    _load_plain(inner, state_dict, strict)


def _load_plain(module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
    # Copies in place: shared / flattened storage stays.
    module.load_state_dict(state_dict, strict=strict)
