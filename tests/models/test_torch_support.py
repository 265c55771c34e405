"""The supported torch / lightning range: pyproject.toml's floors, the Docker base image, and the APIs
that set the floors (each must exist in the installed release, which must satisfy the floor).

Why torch >= 2.6 (none of these is in 2.4; the first two are not in 2.5):
  * torch.distributed.fsdp.fully_shard / MixedPrecisionPolicy: FSDP2's public API (2.6; before,
    only the prototype torch.distributed._composable.fsdp);
  * torch.nn.utils.get_total_norm (2.6; tests/orchestrator/training/test_monitor.py);
  * torch.distributed.tensor.DTensor as a public module (2.5; orchestrator/training/monitor.py);
  * torch.utils.checkpoint.create_selective_checkpoint_contexts, torch.get_autocast_dtype(device),
    fused AdamW on CPU tensors (2.4).
Why lightning-fabric >= 2.6.1: Fabric.load(..., weights_only=) (orchestrator/checkpoint/checkpointer.py).
"""

from __future__ import annotations

import inspect
import re
import tomllib

import pytest
import torch

from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def release(text: str) -> tuple[int, ...]:
    """'2.6.0+cu124' -> (2, 6, 0); '2.6' -> (2, 6)."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", text).group(0).split("."))


def floor(requirements: list[str], package: str) -> tuple[int, ...]:
    spec = next(r for r in requirements if re.match(rf"{re.escape(package)}\s*>=", r))
    return release(spec.split(">=", 1)[1])


def test_installed_torch_and_lightning_satisfy_the_declared_floors():
    import lightning_fabric

    deps = PYPROJECT["dependencies"]
    assert floor(deps, "torch") == (2, 6)
    assert release(torch.__version__) >= floor(deps, "torch"), torch.__version__
    fabric = release(lightning_fabric.__version__)
    assert fabric >= floor(deps, "lightning-fabric"), lightning_fabric.__version__


def test_docker_base_image_is_inside_the_supported_range():
    text = (REPO_ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    tag = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-devel", base)
    assert tag, (
        f"{base}: expected a pytorch/pytorch <torch>-cuda<x.y>-cudnn<n>-devel tag (nvcc included)"
    )
    assert release(tag.group(1)) >= floor(PYPROJECT["dependencies"], "torch"), base
    # The GPU extras the image installs ask for no release below the gpu extra's floors.
    gpu = PYPROJECT["optional-dependencies"]["gpu"]
    flash = re.search(r"^ARG FLASH_ATTN_VERSION=(\S+)$", text, re.M).group(1)
    assert release(flash) >= floor(gpu, "flash-attn")
    for package in ("xformers", "liger-kernel"):
        pinned = re.search(rf'"{package}>=([\w.]+)"', text).group(1)
        assert f"{package}>={pinned}" in gpu, (package, pinned, gpu)


def test_fsdp2_import_path():
    """orchestrator/parallel/fsdp.py's FSDP2 API is torch.distributed.fsdp's public one at the floor."""
    import torch.distributed.fsdp as public

    from orchestrator.parallel import fsdp

    assert fsdp.fully_shard is public.fully_shard
    assert fsdp.MixedPrecisionPolicy is public.MixedPrecisionPolicy


def test_apis_that_set_the_floor_exist(tmp_path):
    from lightning_fabric import Fabric
    from torch.distributed.tensor import DTensor  # noqa: F401
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts  # noqa: F401

    assert callable(torch.nn.utils.get_total_norm)
    assert callable(torch.nn.Module.compile)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.optim.AdamW([p], lr=0.1, fused=True).step()  # fused AdamW on CPU tensors
    assert (p < 1).all()
    torch.save({"w": torch.arange(4)}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", map_location="cpu", mmap=True, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(4))
    assert "weights_only" in inspect.signature(Fabric.load).parameters


@pytest.mark.parametrize("package", ["flash-attn", "xformers", "liger-kernel"])
def test_gpu_extra_floors(package):
    """flash-attn >= 2.7 registers its kernels as torch ops (selective checkpointing can keep them);
    xformers >= 0.0.29.post2 is built for torch 2.6; liger-kernel >= 0.5 takes keyword arguments."""
    from models import kernels

    expected = {
        "flash-attn": (2, 7),
        "xformers": (0, 0, 29),
        "liger-kernel": release(kernels.LIGER_MIN),
    }
    assert (
        floor(PYPROJECT["optional-dependencies"]["gpu"], package)[: len(expected[package])]
        >= expected[package]
    )
