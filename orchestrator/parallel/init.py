"""Building a model without ever holding all of it: on the meta device (FSDP2) or partitioned as
it is built (ZeRO-3 under `deepspeed.zero.Init`), with bitwise the initial weights and random
stream of an unsharded build (DDP) for the same seed.

`FullTensorInit` runs every `nn.init` call on a temporary full-size tensor of the
unsharded build's dtype, on the device the unsharded build would use, so the generator draws
exactly what it would, then keeps only this rank's part: nothing for a meta tensor (the draws
of a constructor's throwaway init), the local shard of an FSDP2 DTensor, the gathered-then-
repartitioned ZeRO-3 parameter. One full parameter at a time is the peak (the embedding: 262 MB
at TinyLlama-1.1B), instead of the whole model per rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

# torch.nn.init's initialisers: each dispatches through __torch_function__, so a mode sees the
# outer call (the tensor and its arguments) and not the draws inside it.
NN_INITS = frozenset(
    {
        nn.init.constant_,
        nn.init.ones_,
        nn.init.zeros_,
        nn.init.eye_,
        nn.init.dirac_,
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.trunc_normal_,
        nn.init.kaiming_uniform_,
        nn.init.kaiming_normal_,
        nn.init.xavier_uniform_,
        nn.init.xavier_normal_,
        nn.init.orthogonal_,
        nn.init.sparse_,
    }
)
# Random in-place tensor methods; a model that calls them on a meta, sharded or partitioned
# parameter is refused rather than initialised differently from an unsharded build.
_RANDOM_METHODS = frozenset(
    {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.log_normal_,
        torch.Tensor.cauchy_,
        torch.Tensor.geometric_,
    }
)


def _is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")  # a DeepSpeed ZeRO-3 parameter (its data is a partition)


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The C binding itself: deepspeed.zero.Init replaces `torch.empty` by a version that casts
    # every new floating-point tensor to its (bf16) dtype, which would change the draws.
    return torch._C._VariableFunctions.empty(tuple(shape), dtype=dtype, device=device)


@torch.no_grad()
def _store(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Keep this rank's part of `full` in `tensor`."""
    if tensor.is_meta:
        return  # a constructor's init on the meta device: the draws were all that mattered
    if isinstance(tensor, DTensor):
        # src_data_rank=None: every rank holds the same `full`; each keeps its chunk, no traffic.
        local = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
        tensor.to_local().copy_(local.to_local())
    elif _is_zero3_partitioned(tensor):
        import deepspeed  # heavy import (seconds): ZeRO runs only

        # Collective: every rank initialises the same parameters in the same order.
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            tensor.data.copy_(full)
    else:
        tensor.copy_(full)


class FullTensorInit(TorchFunctionMode):
    """While active, `nn.init`'s initialisers of meta, FSDP2-sharded or ZeRO-3-partitioned
    tensors (and, given `dtype`, of tensors of another dtype) draw a full tensor on `device`, of
    `dtype` or else the tensor's own, then keep this rank's part. Other calls run as they are."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.dtype = dtype  # the unsharded build's dtype, where the sharded one builds in another

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in NN_INITS:
            # torch.nn.init passes the tensor by keyword to handle_torch_function.
            tensor, rest = (
                (kwargs.pop("tensor"), args) if "tensor" in kwargs else (args[0], args[1:])
            )
            if not self._needs_full(tensor):
                return func(tensor, *rest, **kwargs)
            shape = tensor.ds_shape if _is_zero3_partitioned(tensor) else tensor.shape
            full = _empty(shape, self.dtype or tensor.dtype, self.device)
            func(full, *rest, **kwargs)
            _store(tensor, full)
            return tensor
        if func in _RANDOM_METHODS and args and self._needs_full(args[0]):
            raise NotImplementedError(
                f"{func.__name__} on a meta, sharded or partitioned parameter: initialise it "
                "through torch.nn.init so every strategy draws the same weights"
            )
        return func(*args, **kwargs)

    def _needs_full(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.is_meta
            or isinstance(tensor, DTensor)
            or _is_zero3_partitioned(tensor)
            or (self.dtype is not None and tensor.dtype != self.dtype)
        )


def materialize_sharded(model: nn.Module, device: torch.device) -> None:
    """After `fully_shard` of a model built on the meta device (under `FullTensorInit`): give each
    rank's shards storage on `device` and initialise them as an unsharded build would."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives tied modules separate storage
    with FullTensorInit(device):
        if hasattr(model, "init_weights"):  # the model's own initialisation (models/llama.py)
            model.init_weights()
        else:
            for module in model.modules():
                if callable(reset := getattr(module, "reset_parameters", None)):
                    reset()
