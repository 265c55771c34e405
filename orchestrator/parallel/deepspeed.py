"""DeepSpeed ZeRO (`strategy.name: deepspeed`), stage 1, 2 or 3, optional CPU offload of optimizer
state / parameters, on GPUs (NCCL) and CPUs (gloo).

Precision bf16-mixed / bf16-true: bf16 weights, fp32 master weights and optimizer state, and
gradients accumulated in fp32 (DeepSpeed's default would be bf16; ZeRO-3 with one micro-batch per
step keeps bf16 partitions, which hold the same values: see grad_accum_dtype). The ZeRO optimizer:
ZeRO-1 (without offload) DeepSpeed's BF16_Optimizer, ZeRO-2 / ZeRO-3 their own, each handled by
the clipping and skipped-step code below.

deepspeed >= 0.19.8 (pyproject.toml). Measured with torch 2.13 on CPU (tests/orchestrator/parallel/
test_deepspeed.py): in 0.16.0, 0.16.9, 0.17.0 and 0.18.0, ZeRO-1/2 leave no reduced gradients
for the norm before the step (the trainer's clipping fails); in 0.18.9, BF16_Optimizer adds the
boundary micro-batch's gradients after the all-reduce; in 0.19.0, 0.19.5 and 0.19.7, ZeRO-2
ignores `grad_accum_dtype` and accumulates in bf16; `combine_grad_norm_groups` (used below)
first ships in 0.19.8.

Checkpoint: DeepSpeed's directory of per-rank model and optimizer shards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import warnings
from typing import Any

import torch
from lightning_fabric.accelerators import CUDAAccelerator
from lightning_fabric.strategies import DDPStrategy, DeepSpeedStrategy
from lightning_fabric.strategies.strategy import _BackwardSyncControl
from lightning_fabric.utilities.seed import reset_seed
from torch import nn

from orchestrator.config import Config
from orchestrator.parallel.init import FullTensorInit


def deepspeed_config(cfg: Config, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for cfg.strategy (ZeRO stage, offload, gradient accumulation dtype) and
    the optimizer's clipping. (Lightning adds the precision's `bf16` / `fp16` section.)"""
    s = cfg.strategy
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "contiguous_gradients": True,
        # Overlapping communication with backward uses CUDA streams; on CPU it buys nothing.
        "overlap_comm": on_gpu,
        "reduce_scatter": True,
        "allgather_partitions": True,
        # Buckets bound the transient memory of gradient reduction (elements, in the weights'
        # dtype): 50M = 100 MB in bf16, ~1 block of TinyLlama-1.1B.
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if s.zero_stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": 100_000,
                # Gathered parameters kept live (and prefetched) at once: DeepSpeed's default of
                # 1e9 lets a 1.1B model stay gathered whole on every rank.
                "stage3_max_live_parameters": 100_000_000,
                "stage3_max_reuse_distance": 100_000_000,
                "stage3_prefetch_bucket_size": 50_000_000,
                # The optimizer steps its fp32 partition in groups of this many elements (bf16
                # gradients are converted to fp32 one group at a time: 25M = 100 MB).
                "sub_group_size": 25_000_000,
            }
        )
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
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
    if s.precision in ("bf16-mixed", "bf16-true"):
        config["data_types"] = {"grad_accum_dtype": grad_accum_dtype(cfg)}
    return config


def grad_accum_dtype(cfg: Config) -> str:
    """strategy.grad_accum_dtype resolved: the dtype DeepSpeed keeps gradient partitions in under bf16.

    Lightning adds only `bf16.enabled`; DeepSpeed then accumulates in the weights' dtype, bf16 (8
    mantissa bits: over 16 micro-batches, small contributions round away), so `auto` asks for fp32,
    except for ZeRO-3 with one micro-batch per step: it reduce-scatters in bf16 (its communication
    dtype) and adds nothing afterwards, so an fp32 partition would hold the same bf16 values in twice
    the memory (2.05 GiB per rank of TinyLlama-1.1B on 2 ranks). fp32: ZeRO-1 (without offload)
    becomes DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep their optimizers with fp32 partitions."""
    s = cfg.strategy
    if s.grad_accum_dtype != "auto":
        return s.grad_accum_dtype
    single_micro_batch = cfg.gradient_accumulation(s.devices * s.num_nodes) == 1
    return "bf16" if s.zero_stage == 3 and single_micro_batch else "fp32"


class _BoundaryControl(_BackwardSyncControl):
    """fabric.no_backward_sync(model, enabled) -> the engine's gradient-accumulation boundary."""

    def no_backward_sync(self, module: nn.Module, enabled: bool):
        from deepspeed import DeepSpeedEngine  # heavy import (seconds): ZeRO runs only

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
      its step, with the same max_norm), +inf when a gradient is inf / NaN.
    * ZeRO-3 builds under `deepspeed.zero.Init` (parameters partitioned as they are built),
      with bitwise the initial weights of the other strategies (`module_init_context`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backward_sync_control = _BoundaryControl()
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
        # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm imports torch)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        ds_torch_comm.build_shm_op = lambda: None  # inference-only kernel; skip its C++ build
        DDPStrategy.setup_environment(self)  # -> self._setup_distributed()

    def _setup_distributed(self) -> None:
        if self._on_gpu():
            return super()._setup_distributed()
        reset_seed()
        self._set_world_ranks()
        self._init_deepspeed_distributed()
        if not self._config_initialized:
            self._format_config()
            self._config_initialized = True

    def _initialize_engine(self, model, optimizer=None, scheduler=None):
        import deepspeed  # heavy import (seconds): ZeRO runs only

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
        if _is_bf16_optimizer(engine.optimizer):
            _label_bf16_checkpoint_as_zero1(engine.optimizer)
        return engine, ds_optimizer, ds_scheduler

    def module_init_context(self, empty_init: bool | None = None):
        if not self.zero_stage_3:  # built as DDP builds (on the device, real init)
            return DDPStrategy.module_init_context(self, empty_init=empty_init)
        # ZeRO-3: each module's parameters are partitioned as soon as it is built
        # (deepspeed.zero.Init), so no rank holds the whole model. Every random init draws a
        # full tensor in DDP's dtype on DDP's device (one parameter at a time): the initial
        # weights and random stream of an unsharded build, bitwise.
        stack = contextlib.ExitStack()
        stack.enter_context(self.precision.module_init_context())  # DDP's dtype
        unsharded_dtype = torch.get_default_dtype()
        stack.enter_context(self.module_sharded_context())
        stack.enter_context(FullTensorInit(self.root_device, dtype=unsharded_dtype))
        return stack

    def clip_gradients_norm(
        self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True
    ):
        zero = self._deepspeed_engine.optimizer
        if float(norm_type) != 2.0:
            raise ValueError("DeepSpeed computes the L2 gradient norm only")
        # The trainer's max_norm is authoritative (DeepSpeed reads clip_grad at step time).
        zero.clip_grad = 0.0 if math.isinf(max_norm) else float(max_norm)
        norm = global_grad_norm(zero)
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"the total norm of the gradients is non-finite ({norm.item()})")
        return norm


def _is_bf16_optimizer(zero) -> bool:
    """DeepSpeed's BF16_Optimizer: ZeRO-1 with bf16 weights and fp32 gradient accumulation."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # heavy import: ZeRO runs only

    return isinstance(zero, BF16_Optimizer)


def _label_bf16_checkpoint_as_zero1(zero) -> None:
    """BF16_Optimizer saves the fp32 master partitions in ZeRO-1/2's layout (`single_partition_of_
    fp32_groups`, the same alignment) but without their `zero_stage` entry, so DeepSpeed's
    zero_to_fp32 (`orchestrator consolidate`, `--checkpoint.init_from`, export) refuses the
    checkpoint: "... is not a zero checkpoint". Its universal-checkpoint converter reads a missing
    entry as stage 1; this says so in the file. Loading ignores the entry."""
    from deepspeed.checkpoint.constants import ZERO_STAGE

    state_dict = zero.state_dict

    def labelled_state_dict():
        return {**state_dict(), ZERO_STAGE: 1}

    zero.state_dict = labelled_state_dict


def global_grad_norm(zero) -> torch.Tensor:
    """The global L2 norm of the accumulated (reduced) gradients before clipping, as the ZeRO
    optimizer's step computes it: a float32 scalar tensor, +inf if any gradient is inf / NaN. On
    the device: the trainer brings it to the host with the step's other numbers (one sync)."""
    # deepspeed: heavy import (seconds), ZeRO runs only. combine_grad_norm_groups (deepspeed >=
    # 0.19.8) keeps the -1 that marks a non-finite group norm invalid instead of squaring it to 1.
    from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors

    if _is_bf16_optimizer(zero):
        # Full fp32 gradients, all-reduced at the boundary: the same on every rank.
        grads, _ = zero.get_grads_for_norm()  # (non-expert, expert) gradients; no MoE here
        norm = combine_grad_norm_groups([get_global_norm_of_tensors(grads, mpu=zero.mpu)])
    elif hasattr(zero, "scaled_global_norm"):  # ZeRO-1 / 2
        norm = zero.scaled_global_norm()
    else:  # ZeRO-3
        norm = combine_grad_norm_groups(zero._get_norm_groups())
    norm = torch.as_tensor(norm, dtype=torch.float32)
    return norm / float(getattr(zero, "loss_scale", 1.0) or 1.0)


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

    bf16_optimizer = _is_bf16_optimizer(zero)

    def discard() -> None:
        if bf16_optimizer:  # ZeRO-1 under bf16: its own zero_grad (below) clears the fp32
            return  # accumulated gradients, as its step does on overflow
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
