"""cfg.strategy -> a Lightning Fabric strategy that works on GPUs (NCCL) and on CPUs (gloo).

    ddp        DistributedDataParallel; checkpoint = one file written by rank 0.
    fsdp       FSDP2: `fully_shard` on every transformer block and on the root, through Fabric's
               ModelParallelStrategy (Fabric's FSDPStrategy is FSDP1, which refuses CPUs).
               Checkpoint = a directory of per-rank shards (torch.distributed.checkpoint), or one
               gathered file with strategy.sharded_checkpoint=false.
    deepspeed  ZeRO stage 1, 2 or 3 (optional CPU offload of optimizer state / parameters).
               Checkpoint = DeepSpeed's directory of per-rank model and optimizer shards.
    single     one process, no process group.

Every strategy gets the collective timeout `strategy.timeout_s`, so a rank that died or hangs
ends the job with an error instead of a hang. `orchestrator consolidate` (orchestrator/
consolidate.py) turns any of these checkpoints into one full state dict.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import torch
from torch import nn

__all__ = [
    "apply_activation_checkpointing",
    "checkpointing_mode",
    "build_strategy",
    "CPUCapableDeepSpeedStrategy",
    "deepspeed_config",
    "load_full_model_state",
    "parallelize_fsdp",
    "strategy_label",
]


def strategy_label(cfg) -> str:
    """`ddp`, `fsdp`, `deepspeed-zero3`, ... (for logs and messages)."""
    s = cfg.strategy
    return f"deepspeed-zero{s.zero_stage}" if s.name == "deepspeed" else s.name


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


def checkpointing_mode(value: bool | str) -> str:
    """strategy.activation_checkpointing -> `none` | `selective` | `full` (true is full, false none)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in ("none", "selective", "full"):
        raise ValueError(f"activation checkpointing must be none, selective or full, got {value!r}")
    return value


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> nn.Module:
    """Recompute each transformer block's activations during backward.

    `full` keeps only each block's input; `selective` also keeps the outputs of matmuls and attention
    kernels and recomputes the cheap rest (norms, RoPE, activations; models.kernels.
    selective_checkpoint_context). The block's `forward` is replaced on the instance (no wrapper
    module), so parameter names and state-dict keys stay exactly those of models/llama.py under every
    strategy. Sharding hooks (FSDP2, ZeRO-3) sit on the module call and therefore outside the
    recomputed function.
    """
    mode = checkpointing_mode(mode)
    if mode == "none":
        return model
    for block in _blocks(model):
        if getattr(block, "_activation_checkpointing", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward, mode == "selective")
        block._activation_checkpointing = True
    return model


def _checkpointed_forward(forward, selective, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation / generation: nothing to save for backward
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    if selective:
        from models.kernels import selective_checkpoint_context

        return checkpoint(
            forward, *args, use_reentrant=False, context_fn=selective_checkpoint_context, **kwargs
        )
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList of transformer blocks")
    return list(blocks)


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


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
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(
            block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs
        )
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def _fsdp_strategy_class():
    from lightning.fabric.strategies import ModelParallelStrategy

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
            from contextlib import ExitStack

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
            from pathlib import Path

            # The full-state-dict variant torch.save's straight to `path` without creating its folder.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return super().save_checkpoint(
                path, state, storage_options=storage_options, filter=filter
            )

        def load_checkpoint(self, path, state=None, strict=True, weights_only=None):
            # Lightning's sharded (DCP) load puts the saved state dict of stateful objects (scheduler,
            # data loader, ...) into `state` in place of the objects instead of restoring them.
            from lightning.fabric.utilities.types import _Stateful

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

    return FSDP2Strategy


# --------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------


def deepspeed_config(cfg, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for cfg.strategy (ZeRO stage, offload) and the optimizer's clipping."""
    s = cfg.strategy
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "contiguous_gradients": True,
        # Overlapping communication with backward uses CUDA streams; on CPU it buys nothing.
        "overlap_comm": on_gpu,
        "reduce_scatter": True,
        "allgather_partitions": True,
        "reduce_bucket_size": 200_000_000,
        "allgather_bucket_size": 200_000_000,
    }
    if s.zero_stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": 100_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_prefetch_bucket_size": 50_000_000,
                "sub_group_size": 1_000_000_000,
            }
        )
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "zero_optimization": zero,
        # Our AdamW (torch.optim) is used as is, also with offload (DeepSpeed would otherwise insist
        # on its compiled CPU Adam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Clipping happens inside DeepSpeed's step; the trainer's max_norm is applied to it (see below).
        "gradient_clipping": float(cfg.optimizer.grad_clip),
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        # Gradient accumulation is the trainer's loop (fabric.no_backward_sync marks the boundary).
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def _deepspeed_strategy_class():
    from lightning.fabric.accelerators import CUDAAccelerator
    from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy
    from lightning.fabric.strategies.strategy import _BackwardSyncControl

    class _BoundaryControl(_BackwardSyncControl):
        """fabric.no_backward_sync(model, enabled) -> the engine's gradient-accumulation boundary."""

        def no_backward_sync(self, module: nn.Module, enabled: bool):
            import contextlib

            from deepspeed import DeepSpeedEngine

            if isinstance(module, DeepSpeedEngine):
                module.set_gradient_accumulation_boundary(not enabled)
            return contextlib.nullcontext()

    class CPUCapableDeepSpeedStrategy(DeepSpeedStrategy):
        """Fabric's DeepSpeedStrategy, usable on CPUs (gloo) as well as GPUs.

        Differences from Lightning's class:
        * CPU: no CUDA-only environment and device-index checks; the engine gets the local rank;
          DeepSpeed's shared-memory all-reduce kernel (for inference, compiled with g++ on first
          use) is not built.
        * Gradient accumulation: the trainer's `no_backward_sync` marks DeepSpeed's accumulation
          boundary, so one optimizer step follows N micro-batches exactly as under DDP.
        * `clip_gradients` returns the global gradient norm before the step (DeepSpeed clips inside
          its step, with the same max_norm).
        * Parameters are built normally and partitioned by `deepspeed.initialize` (no
          `zero.Init`), so every strategy starts from bitwise the same initial weights.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._backward_sync_control = _BoundaryControl()
            import warnings

            # DeepSpeed calls torch.distributed's *_tensor collectives, deprecated in recent torch: once per bucket.
            warnings.filterwarnings(
                "ignore",
                message=r".*is deprecated\. Please use `torch\.distributed\.",
                category=FutureWarning,
            )

        def _on_gpu(self) -> bool:
            return isinstance(self.accelerator, CUDAAccelerator)

        def setup_environment(self) -> None:
            if self._on_gpu():
                return super().setup_environment()
            import importlib

            # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm imports torch)
            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
            ds_torch_comm.build_shm_op = lambda: None  # inference-only kernel; skip its C++ build
            DDPStrategy.setup_environment(self)  # -> self._setup_distributed()

        def _setup_distributed(self) -> None:
            if self._on_gpu():
                return super()._setup_distributed()
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self._set_world_ranks()
            self._init_deepspeed_distributed()
            if not self._config_initialized:
                self._format_config()
                self._config_initialized = True

        def _initialize_engine(self, model, optimizer=None, scheduler=None):
            import argparse

            import deepspeed

            rank = self.root_device.index if self._on_gpu() else self.local_rank
            parameters = filter(lambda p: p.requires_grad, model.parameters())
            engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
                args=argparse.Namespace(device_rank=rank),
                config=self.config,
                model=model,
                model_parameters=parameters,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                dist_init_required=False,
            )
            _discard_gradients_of_skipped_steps(engine)
            return engine, ds_optimizer, ds_scheduler

        def module_init_context(self, empty_init: bool | None = None):
            # Build the model as DDP would (on the device, real init); deepspeed.initialize
            # partitions ZeRO-3 parameters afterwards.
            return DDPStrategy.module_init_context(self, empty_init=empty_init)

        def clip_gradients_norm(
            self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True
        ):
            import math

            engine = self._deepspeed_engine
            zero = engine.optimizer
            if float(norm_type) != 2.0:
                raise ValueError("DeepSpeed computes the L2 gradient norm only")
            # The trainer's max_norm is authoritative (DeepSpeed reads clip_grad at step time).
            zero.clip_grad = 0.0 if math.isinf(max_norm) else float(max_norm)
            if hasattr(zero, "scaled_global_norm"):  # ZeRO 1/2
                norm = zero.scaled_global_norm()
            else:  # ZeRO 3
                from deepspeed.runtime.utils import combine_grad_norm_groups

                norm = combine_grad_norm_groups(zero._get_norm_groups())
            norm = torch.as_tensor(norm, dtype=torch.float32).cpu() / float(
                getattr(zero, "loss_scale", 1.0) or 1.0
            )
            if norm.item() < 0:  # DeepSpeed's marker for inf/nan
                norm = torch.tensor(float("nan"))
            if error_if_nonfinite and not torch.isfinite(norm):
                raise RuntimeError(f"the total norm of the gradients is non-finite ({norm.item()})")
            return norm

    return CPUCapableDeepSpeedStrategy


def _discard_gradients_of_skipped_steps(engine) -> None:
    """`optimizer.zero_grad()` after backward without `optimizer.step()` (the trainer skips the update
    of a bad step) must also drop ZeRO's reduced gradient partitions; DeepSpeed itself does that
    only inside its step (overflow path), so they would be added to the next step's gradients.

    Also routes Fabric's `zero_grad` to the ZeRO optimizer itself: Fabric's wrapper subclasses the
    optimizer's class, so DeepSpeed's zero_grad would run with the wrapper as `self` and reset
    ZeRO-3's micro-step counter on the wrapper instead of the optimizer.
    """
    zero = engine.optimizer
    cls = type(zero)
    pending = {"gradients": False}
    # Fabric steps the ZeRO optimizer itself (not engine.step): watch both.
    backward, engine_step, zero_step = engine.backward, engine.step, zero.step

    def backward_(*args, **kwargs):
        pending["gradients"] = True
        return backward(*args, **kwargs)

    def engine_step_(*args, **kwargs):
        pending["gradients"] = False
        return engine_step(*args, **kwargs)

    def zero_step_(*args, **kwargs):
        pending["gradients"] = False
        return zero_step(*args, **kwargs)

    def discard() -> None:
        if hasattr(zero, "_overflow_clean_up"):  # ZeRO-3: what its step does on overflow
            zero._pre_step()
            zero._partition_all_parameters()
            zero._overflow_clean_up(zero.loss_scale)
        elif hasattr(zero, "averaged_gradients"):  # ZeRO-1/2: likewise
            if hasattr(zero, "_release_preflattened_grad_buffers"):
                zero._release_preflattened_grad_buffers()
            if getattr(zero, "cpu_offload", False):
                zero.reset_cpu_buffers()
            else:
                for key in list(zero.averaged_gradients.keys()):
                    zero.averaged_gradients[key] = None
                for key in list(getattr(zero, "all_grad_tensors", {}).keys()):
                    zero.all_grad_tensors[key] = None
            zero.micro_step_id = -1  # INITIAL_MICRO_STEP_ID

    def zero_grad(self, *args, **kwargs):
        wrapped = self.__dict__.get("_optimizer")
        real = wrapped if isinstance(wrapped, cls) else self  # called through Fabric's wrapper
        if real is zero and pending["gradients"]:
            pending["gradients"] = False
            discard()
        return cls.zero_grad(real, *args, **kwargs)

    engine.backward = backward_
    engine.step = engine_step_
    zero.step = zero_step_
    zero.__class__ = type(cls.__name__, (cls,), {"zero_grad": zero_grad})


def __getattr__(
    name: str,
):  # CPUCapableDeepSpeedStrategy without importing deepspeed at module import
    if name == "CPUCapableDeepSpeedStrategy":
        return _deepspeed_strategy_class()
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------
# The strategy object
# --------------------------------------------------------------------------------------------


def build_strategy(cfg, accelerator: str) -> Any:
    """A Fabric strategy (object, or "auto") for cfg.strategy on `accelerator` ("cpu" / "cuda")."""
    from lightning.fabric.strategies import DDPStrategy, SingleDeviceStrategy

    s = cfg.strategy
    timeout = timedelta(seconds=s.timeout_s)
    on_gpu = accelerator == "cuda"
    if s.name == "ddp":
        # process_group_backend=None: NCCL on GPUs, gloo on CPUs.
        return DDPStrategy(process_group_backend=None, timeout=timeout)
    if s.name == "fsdp":
        param_dtype = torch.bfloat16 if s.precision == "bf16-mixed" else None
        parallelize = functools.partial(
            parallelize_fsdp,
            reshard_after_forward=s.reshard_after_forward,
            activation_checkpointing=s.activation_checkpointing,
            param_dtype=param_dtype,
        )
        world = s.devices * s.num_nodes
        return _fsdp_strategy_class()(
            parallelize_fn=parallelize,
            data_parallel_size=world,
            tensor_parallel_size=1,
            save_distributed_checkpoint=s.sharded_checkpoint,
            timeout=timeout,
        )
    if s.name == "deepspeed":
        cls = _deepspeed_strategy_class()
        return cls(
            config=deepspeed_config(cfg, on_gpu),
            timeout=timeout,
            process_group_backend="nccl" if on_gpu else "gloo",
        )
    if s.name == "single":
        return SingleDeviceStrategy(
            device=torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        )
    return "auto"


def scheduler_optimizer(optimizer):
    """The torch optimizer a learning-rate scheduler drives: under DeepSpeed, the one inside the ZeRO
    optimizer (whose parameter groups DeepSpeed steps); otherwise `optimizer` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper
    if not isinstance(inner, torch.optim.Optimizer) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        return inner.optimizer  # DeepSpeed's ZeRO optimizer wraps the client's torch optimizer
    return optimizer


def wants_activation_checkpointing_outside(cfg) -> bool:
    """FSDP applies it inside its parallelize function; the others need it before fabric.setup."""
    return (
        checkpointing_mode(cfg.strategy.activation_checkpointing) != "none"
        and cfg.strategy.name != "fsdp"
    )


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
    from lightning.fabric.wrappers import _unwrap_objects

    module = _unwrap_objects(model)
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        DeepSpeedEngine = ()  # type: ignore[assignment]
    if isinstance(module, DeepSpeedEngine):
        import deepspeed

        inner = module.module
        params = list(inner.parameters())
        stage3 = module.zero_optimization_stage() == 3
        context = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=0) if stage3 else _nullcontext()
        )
        with context:
            _load_plain(inner, state_dict, strict)
        if hasattr(module.optimizer, "refresh_fp32_params"):
            module.optimizer.refresh_fp32_params()  # the optimizer's fp32 master copy follows the weights
        return
    from lightning.fabric.strategies.model_parallel import (
        _has_dtensor_modules,
        _load_raw_module_state,
    )

    if _has_dtensor_modules(module):
        _load_raw_module_state(state_dict, module, world_size=fabric.world_size, strict=strict)
        return
    inner = getattr(module, "module", module)  # DistributedDataParallel
    _load_plain(inner, state_dict, strict)


def _load_plain(module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
    module.load_state_dict(
        state_dict, strict=strict
    )  # copies in place: shared/flattened storage stays


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------
# Resuming needs the strategy that wrote the checkpoint
# --------------------------------------------------------------------------------------------


def check_resume_strategy(ckpt_dir, cfg, world_size: int) -> None:
    """A clear error, before loading, when checkpoint `ckpt_dir` cannot be resumed by this run's strategy
    (its optimizer state is laid out for another one); the weights can always start a new run."""
    from pathlib import Path

    import yaml

    from orchestrator.consolidate import checkpoint_format
    from orchestrator.schema import ConfigError

    ckpt_dir = Path(ckpt_dir)
    try:
        kind = checkpoint_format(ckpt_dir)
        saved = (yaml.safe_load((ckpt_dir / "config.yaml").read_text()) or {}).get("strategy", {})
        manifest = ckpt_dir / "manifest.json"
        saved_world = (
            __import__("json").loads(manifest.read_text()).get("world_size")
            if manifest.is_file()
            else None
        )
    except (OSError, ValueError):
        return  # unreadable: the loader reports it
    s = cfg.strategy
    wanted = {
        "ddp": "file",
        "single": "file",
        "auto": "file",
        "fsdp": "dcp" if s.sharded_checkpoint else "file",
        "deepspeed": "deepspeed",
    }[s.name]
    problem = None
    replicated = ("ddp", "single", "auto")
    if kind != wanted:
        problem = f"it holds a {kind!r} checkpoint, this run ({strategy_label(cfg)}) reads {wanted!r} ones"
    elif (
        kind == "file"
        and saved.get("name")
        and (saved["name"] in replicated) != (s.name in replicated)
    ):
        problem = f"its optimizer state is laid out for {saved['name']}, this run uses {s.name}"
    elif kind == "deepspeed" and saved.get("zero_stage") not in (None, s.zero_stage):
        problem = f"it was written by ZeRO stage {saved.get('zero_stage')}, this run uses stage {s.zero_stage}"
    elif kind == "deepspeed" and saved_world not in (None, world_size):
        problem = f"its ZeRO partitions are for {saved_world} processes, this run has {world_size}"
    if problem:
        source = f"{saved.get('name', '?')}" + (
            f" (ZeRO-{saved.get('zero_stage')})" if saved.get("name") == "deepspeed" else ""
        )
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: {problem} (written with strategy {source}). Resume with the "
            f"strategy and world size that wrote it, or start a new run from its weights: "
            f"`--checkpoint.init_from {ckpt_dir} --run.dir NEW_DIR` (any strategy; `orchestrator consolidate "
            f"{ckpt_dir}` makes that instant)"
        )
