"""orchestrator/devices.py: the peak-FLOPs table and the fp32 matmul precision (TF32) of a process."""

import re
from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.devices import (
    DEVICE_PEAK_FLOPS,
    apply_matmul_precision,
    device_names,
    device_peak_flops,
)
from orchestrator.schema import ConfigError


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200 NVL", 835e12),  # not H200 SXM's 989
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GB200", 2500e12),  # not B200's figure, though the name contains "B200"
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("h200-nvl", 835e12),
        ("NVIDIA H800", None),  # no NVIDIA data sheet figure could be cited: no MFU
        ("NVIDIA A10G", None),  # AWS-specific part without an NVIDIA data sheet (and not an A100)
        ("Tesla T4", None),
    ],
)
def test_peak_flops_longest_contained_key(name, peak):
    assert device_peak_flops(name) == peak


def test_every_peak_has_a_source_comment():
    source = (Path(__file__).parents[2] / "orchestrator" / "devices.py").read_text()
    for key in DEVICE_PEAK_FLOPS:
        line = next(ln for ln in source.splitlines() if ln.strip().startswith(f'"{key}":'))
        assert re.search(r"#\s*NVIDIA|#\s*same data sheet", line), line
    assert {"b200", "gb200", "h200-nvl", "l40s"} <= set(device_names())


@pytest.fixture
def matmul_precision_restored():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_matmul_precision_validates_and_defaults_to_high():
    assert load_config([]).strategy.matmul_precision == "high"
    for value in ("highest", "high", "medium"):
        assert (
            load_config(["--strategy.matmul_precision", value]).strategy.matmul_precision == value
        )
    with pytest.raises(ConfigError, match="strategy.matmul_precision='tf32' is not one of"):
        load_config(["--strategy.matmul_precision", "tf32"])


def test_matmul_precision_leaves_cpu_untouched(monkeypatch, matmul_precision_restored):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    assert not apply_matmul_precision("cpu", "medium")
    assert calls == []
    assert apply_matmul_precision("cuda", "high") and calls == ["high"]


def test_cpu_fabric_keeps_torch_default(matmul_precision_restored):
    from orchestrator.parallel.launch import build_fabric

    before = torch.get_float32_matmul_precision()
    cfg = load_config(
        ["--strategy.name", "single", "--strategy.accelerator", "cpu"]
        + ["--strategy.matmul_precision", "medium", "--logging.tensorboard", "false"]
    )
    fabric = build_fabric(cfg)
    assert fabric.device.type == "cpu"
    assert torch.get_float32_matmul_precision() == before  # CPU numerics unchanged


@pytest.mark.gpu
@pytest.mark.parametrize("value, tf32", [("high", True), ("highest", False)])
def test_cuda_fabric_applies_matmul_precision(value, tf32, matmul_precision_restored):
    from orchestrator.parallel.launch import build_fabric

    cfg = load_config(
        ["--strategy.name", "single", "--strategy.accelerator", "cuda"]
        + ["--strategy.matmul_precision", value, "--logging.tensorboard", "false"]
    )
    build_fabric(cfg)
    assert torch.get_float32_matmul_precision() == value
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
