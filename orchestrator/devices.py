"""Which device to run on, and how fast a device can be at best.

`pick_device` turns a `--device` value (auto | cpu | cuda | cuda:N | ...) into a torch device;
`apply_matmul_precision` sets the fp32 matmul precision (TF32) of a CUDA process.
`DEVICE_PEAK_FLOPS` is the one table of peak FLOP/s that MFU figures are computed against: the
trainer's perf/mfu (orchestrator/training/monitor.py), `orchestrator plan` (GPU-hours -> FLOPs)
and benchmarks/throughput.py.

Light on purpose (torch only: no lightning, no data pipeline): benchmarks/throughput.py imports it
on machines without the data stack.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) peak FLOP/s of one device in bf16 tensor-core math, from the vendors' data
# sheets, which mostly quote the figure with 2:4 structured sparsity: dense is half of it.
# fp32 peaks are not tabulated (runs in fp32 report no MFU). Keys are matched against the device
# name (see device_peak_flops), so a more specific key ("H200 NVL") wins over a shorter one ("H200").
# Not tabulated, for want of a vendor figure: H800 (no NVIDIA data sheet could be cited) and A10G
# (an AWS-specific part; NVIDIA publishes no data sheet for it) -- they report no MFU unless
# logging.peak_tflops is set.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "H100": 989e12,  # NVIDIA H100 Tensor Core GPU data sheet, H100 SXM5: BF16 1,979 TFLOPS sparse
    "H100 PCIe": 756e12,  # same data sheet, H100 PCIe: BF16 1,513 TFLOPS sparse
    "H100 NVL": 835e12,  # same data sheet, H100 NVL (per GPU): BF16 1,671 TFLOPS sparse
    "H200": 989e12,  # NVIDIA H200 Tensor Core GPU data sheet, H200 SXM: BF16 1,979 TFLOPS sparse
    "H200 NVL": 835e12,  # same data sheet, H200 NVL: BF16 1,671 TFLOPS sparse
    "B200": 2250e12,  # NVIDIA HGX B200 specifications, per GPU: FP16/BF16 4.5 PFLOPS sparse
    "GB200": 2500e12,  # NVIDIA GB200 NVL72 specifications, per GPU: FP16/BF16 5 PFLOPS sparse
    "L40S": 362e12,  # NVIDIA L40S data sheet: BF16 362.05 TFLOPS dense (733 sparse)
    "A100": 312e12,  # NVIDIA A100 Tensor Core GPU data sheet: BF16 312 TFLOPS dense (624 sparse)
}


def device_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device named like 'NVIDIA H100 80GB HBM3' (or 'h100'), or None.

    The rule: the longest key of DEVICE_PEAK_FLOPS contained in the name, case-insensitive, with
    '-' and '_' read as spaces ('NVIDIA H100 PCIe' is the PCIe card, not the SXM one)."""
    name = device_name.lower().replace("-", " ").replace("_", " ")
    matches = [k for k in DEVICE_PEAK_FLOPS if k.lower() in name]
    return DEVICE_PEAK_FLOPS[max(matches, key=len)] if matches else None


def device_names() -> list[str]:
    """The tabulated devices as a user types them (h100, h100-pcie, ...)."""
    return [k.lower().replace(" ", "-") for k in DEVICE_PEAK_FLOPS]


def pick_device(device: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def apply_matmul_precision(device_type: str, precision: str) -> bool:
    """strategy.matmul_precision for a process whose device is `device_type`: on CUDA,
    torch.set_float32_matmul_precision(precision) (`high`: fp32 matmuls may use TF32 tensor cores;
    `highest`: exact fp32); anywhere else torch's default is left untouched, so that CPU numerics
    (and the bitwise resume tests) never change. Returns whether it was applied."""
    if device_type != "cuda":
        return False
    torch.set_float32_matmul_precision(precision)
    return True
