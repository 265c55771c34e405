"""Optional fused kernels for models/llama.py: the libraries that provide them (flash-attn,
xformers, liger-kernel: the `gpu` extra, CUDA only), and the choice of one kernel per op from a
config string. The ops themselves, wrapped, are in models/fused.py; the eager code in
models/llama.py is the reference every kernel is tested against (tests/models/test_kernels.py).

    model.attention       auto | sdpa | flash_attn | xformers | eager
    model.rmsnorm_kernel  auto | eager | liger | flash_attn
    model.swiglu_kernel   auto | eager | liger | flash_attn | xformers
    model.rope_kernel     auto | eager | liger | flash_attn
    model.loss_kernel     auto | cross_entropy | chunked | liger_fused | liger | flash_attn

A kernel asked for by name that cannot run here raises `KernelUnavailable`; `auto` never fails.
What each library provides, the z-loss in each loss kernel, what `auto` picks: docs/gpus.md.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from models.config import ConfigError

IGNORE_INDEX = -100  # targets with this value take no part in the loss (F.cross_entropy's default)
HALF = (torch.bfloat16, torch.float16)


class KernelUnavailable(ConfigError):
    """A kernel chosen by name that cannot run on this machine, device or dtype."""


# --------------------------------------------------------------------------------------------
# Libraries: imported once, on first use; a failed import is remembered with its reason.
# --------------------------------------------------------------------------------------------

_LIBS: dict[str, SimpleNamespace | str] = {}  # name -> functions, or the reason it cannot be used


def _import_flash_attn() -> SimpleNamespace:
    import flash_attn
    from flash_attn import flash_attn_func

    ns = SimpleNamespace(
        flash_attn_func=flash_attn_func,
        flash_attn_varlen_func=getattr(flash_attn, "flash_attn_varlen_func", None),
        rms_norm=None,
        rotary=None,
        cross_entropy=None,
        swiglu=None,
    )
    # The Triton ops are separate modules; older releases lack some of them.
    for attr, module, name in (
        ("rms_norm", "flash_attn.ops.triton.layer_norm", "rms_norm_fn"),
        ("rotary", "flash_attn.layers.rotary", "apply_rotary_emb"),
        ("cross_entropy", "flash_attn.ops.triton.cross_entropy", "cross_entropy_loss"),
        ("swiglu", "flash_attn.ops.activations", "swiglu"),
    ):
        try:
            setattr(ns, attr, getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001 - an op missing from this release: that kernel is unavailable
            pass
    return ns


def _import_xformers() -> SimpleNamespace:
    import xformers.ops as xops
    from xformers.ops import swiglu_op

    return SimpleNamespace(
        memory_efficient_attention=xops.memory_efficient_attention,
        LowerTriangularMask=xops.LowerTriangularMask,
        swiglu=swiglu_op.swiglu,
    )


LIGER_MIN = (
    "0.5.0"  # the first release whose functional API takes keyword arguments (pyproject: gpu extra)
)


def _import_liger() -> SimpleNamespace:
    from liger_kernel.transformers import functional as lf

    # liger-kernel 0.4.x exposes liger_rms_norm, liger_fused_linear_cross_entropy (and others) as bare
    # `torch.autograd.Function.apply`, which takes no keyword arguments: our calls below (offset=,
    # casting_mode=, ignore_index=) would raise at the first forward. Refuse such a release here, so
    # that `auto` never picks it and a named liger kernel fails before the run with this reason.
    for name, keyword in (
        ("liger_rms_norm", "casting_mode"),
        ("liger_fused_linear_cross_entropy", "ignore_index"),
        ("liger_cross_entropy", "ignore_index"),
    ):
        if keyword not in inspect.signature(getattr(lf, name)).parameters:
            raise ImportError(
                f"liger-kernel {package_version('liger-kernel')} is too old: its {name} takes no keyword "
                f"arguments (a bare autograd Function.apply); install liger-kernel>={LIGER_MIN}"
            )
    # casting_mode "llama": fp32 statistics, x_hat cast to x's dtype, then times the weight (our order).
    # Not in place: the gradient of the norm's output is left alone (releases without it: default).
    rms_kwargs = dict(offset=0.0, casting_mode="llama")
    if "in_place" in inspect.signature(lf.liger_rms_norm).parameters:
        rms_kwargs["in_place"] = False
    return SimpleNamespace(
        rms_norm=functools.partial(lf.liger_rms_norm, **rms_kwargs),
        rope=lf.liger_rope,
        swiglu=lf.liger_swiglu,
        cross_entropy=lf.liger_cross_entropy,
        fused_linear_cross_entropy=_with_fp32_accumulation(lf.liger_fused_linear_cross_entropy),
    )


def _with_fp32_accumulation(fused_linear_cross_entropy):
    """liger's fused linear + cross-entropy accumulating the weight gradient in fp32 where the release
    can (`accum_dtype`): the output projection's gradient sums over every token of the batch."""
    if "accum_dtype" in inspect.signature(fused_linear_cross_entropy).parameters:
        return functools.partial(fused_linear_cross_entropy, accum_dtype=torch.float32)
    return fused_linear_cross_entropy


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


_IMPORTERS = {
    "flash_attn": _import_flash_attn,
    "xformers": _import_xformers,
    "liger": _import_liger,
}
_PACKAGES = {"flash_attn": "flash-attn", "xformers": "xformers", "liger": "liger-kernel"}


def library(name: str) -> SimpleNamespace | None:
    """The library's functions, or None when it is not installed or does not import."""
    if name not in _LIBS:
        try:
            _LIBS[name] = _IMPORTERS[name]()
        except Exception as e:  # noqa: BLE001 - ImportError, or a wheel built for another torch/CUDA
            _LIBS[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    lib = _LIBS[name]
    return lib if isinstance(lib, SimpleNamespace) else None


def library_problem(name: str) -> str | None:
    """Why `library(name)` is None (None when it is usable)."""
    library(name)
    lib = _LIBS[name]
    return None if isinstance(lib, SimpleNamespace) else lib


def installed() -> dict[str, bool]:
    """Which optional kernel libraries import here."""
    return {name: library(name) is not None for name in _IMPORTERS}


def loaded(name: str) -> SimpleNamespace | None:
    """The library's functions if `library(name)` imported them, importing nothing (None when it was
    not asked for yet or is unusable): what the ops of models/fused.py call, once `choose` picked it."""
    lib = _LIBS.get(name)
    return lib if isinstance(lib, SimpleNamespace) else None


# --------------------------------------------------------------------------------------------
# Choosing: config strings -> the kernel each op uses for this device and compute dtype
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChoice:
    """The concrete implementation of each op for one forward pass (no `auto` left)."""

    attention: str = "sdpa"
    rmsnorm: str = "eager"
    swiglu: str = "eager"
    rope: str = "eager"
    loss: str = "cross_entropy"


EAGER = KernelChoice(
    attention="eager", rmsnorm="eager", swiglu="eager", rope="eager", loss="cross_entropy"
)

# (library, attribute that must exist) for every named kernel; eager/sdpa/chunked/cross_entropy need none.
_NEEDS = {
    ("attention", "flash_attn"): ("flash_attn", "flash_attn_func"),
    ("attention", "xformers"): ("xformers", "memory_efficient_attention"),
    ("rmsnorm", "liger"): ("liger", "rms_norm"),
    ("rmsnorm", "flash_attn"): ("flash_attn", "rms_norm"),
    ("swiglu", "liger"): ("liger", "swiglu"),
    ("swiglu", "flash_attn"): ("flash_attn", "swiglu"),
    ("swiglu", "xformers"): ("xformers", "swiglu"),
    ("rope", "liger"): ("liger", "rope"),
    ("rope", "flash_attn"): ("flash_attn", "rotary"),
    ("loss", "liger_fused"): ("liger", "fused_linear_cross_entropy"),
    ("loss", "liger"): ("liger", "cross_entropy"),
    ("loss", "flash_attn"): ("flash_attn", "cross_entropy"),
}
# What `auto` tries, best first, on CUDA; the last entry always runs.
_AUTO_CUDA = {
    "attention": ("flash_attn", "sdpa"),
    "rmsnorm": ("liger", "flash_attn", "eager"),
    "swiglu": ("liger", "flash_attn", "eager"),
    "rope": ("liger", "flash_attn", "eager"),
    "loss": ("liger_fused", "chunked"),
}
_AUTO_CPU = {
    "attention": "sdpa",
    "rmsnorm": "eager",
    "swiglu": "eager",
    "rope": "eager",
    "loss": "chunked",
}
CONFIG_KEYS = {
    "attention": "model.attention",
    "rmsnorm": "model.rmsnorm_kernel",
    "swiglu": "model.swiglu_kernel",
    "rope": "model.rope_kernel",
    "loss": "model.loss_kernel",
}


# What a library's loss must take for model.z_loss > 0 (it adds z * lse^2 itself, in its forward and
# backward; liger hands back the term for logging with return_z_loss, flash-attn always does).
_Z_LOSS_KEYWORDS = {
    "liger_fused": ("lse_square_scale", "return_z_loss"),  # liger-kernel >= 0.5.5
    "liger": ("lse_square_scale", "return_z_loss"),
    "flash_attn": ("lse_square_scale",),
}


def _parameters(fn) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # not introspectable (a builtin, a stand-in object)
        return ()


def why_not(
    op: str, kernel: str, device_type: str, dtype: torch.dtype, z_loss: bool = False
) -> str | None:
    """None when `kernel` can compute `op` for tensors of this device type and dtype, else the reason.

    `z_loss`: the loss must also add a z-loss (model.z_loss > 0)."""
    need = _NEEDS.get((op, kernel))
    if need is None:
        return None
    lib_name, attr = need
    lib = library(lib_name)
    if lib is None:
        return f"{_PACKAGES[lib_name]} is not usable here ({library_problem(lib_name)})"
    if getattr(lib, attr, None) is None:
        return f"this {_PACKAGES[lib_name]} release has no {attr}"
    if device_type != "cuda":
        return f"{_PACKAGES[lib_name]} kernels need CUDA tensors, these are on {device_type}"
    if (op, kernel) == ("attention", "flash_attn") and dtype not in HALF:
        return (
            f"flash-attn computes in bf16/fp16 only, this run computes in {dtype} "
            "(use strategy.precision bf16-mixed)"
        )
    if z_loss and op == "loss" and kernel in _Z_LOSS_KEYWORDS:
        params = _parameters(getattr(lib, attr))
        missing = [k for k in _Z_LOSS_KEYWORDS[kernel] if k not in params]
        if missing:
            return (
                f"this {_PACKAGES[lib_name]} release's {attr} takes no {' / '.join(missing)}, which "
                "model.z_loss > 0 needs"
            )
    return None


def choose(op: str, wanted: str, device_type: str, dtype: torch.dtype, z_loss: bool = False) -> str:
    """The kernel `op` uses: `wanted` itself (or KernelUnavailable), or the best that runs for `auto`.

    `z_loss`: the loss must add a z-loss (model.z_loss > 0)."""
    if wanted != "auto":
        problem = why_not(op, wanted, device_type, dtype, z_loss)
        if problem is not None:
            fallback = choose(op, "auto", device_type, dtype, z_loss)
            raise KernelUnavailable(
                f"{CONFIG_KEYS[op]}={wanted!r} cannot run: {problem}. Install the `gpu` extra "
                f"(pip install -e '.[gpu]') on a CUDA machine, or set {CONFIG_KEYS[op]}=auto (here: {fallback!r})"
            )
        return wanted
    if device_type != "cuda":
        return _AUTO_CPU[op]
    return next(k for k in _AUTO_CUDA[op] if why_not(op, k, device_type, dtype, z_loss) is None)


_CHOICES: dict[tuple, KernelChoice] = {}


def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for this device type, else `default`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


@torch.compiler.disable
def choose_kernels(cfg, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """Resolve cfg's kernel strings for tensors on `device` computing in `dtype` (cached)."""
    wanted = (
        cfg.attention,
        cfg.rmsnorm_kernel,
        cfg.swiglu_kernel,
        cfg.rope_kernel,
        cfg.loss_kernel,
    )
    z_loss = getattr(cfg, "z_loss", 0.0) > 0  # the loss kernel must then add a z-loss
    key = (wanted, device.type, dtype, z_loss)
    if key not in _CHOICES:
        ops = ("attention", "rmsnorm", "swiglu", "rope", "loss")
        _CHOICES[key] = KernelChoice(
            **{
                op: choose(op, w, device.type, dtype, z_loss and op == "loss")
                for op, w in zip(ops, wanted)
            }
        )
    return _CHOICES[key]
