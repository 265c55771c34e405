"""Checkpoint save / load time and training stall, beside the raw write bandwidth of the same disk.

    .venv/bin/python benchmarks/checkpoint.py                      # llama-400m (393M params), CPU
    .venv/bin/python benchmarks/checkpoint.py --model llama-124m --json out.json
    .venv/bin/python benchmarks/checkpoint.py --strategy fsdp --devices 2   # FSDP2 shards, 2 processes
    .venv/bin/python benchmarks/checkpoint.py --strategy fsdp --devices 8 --accelerator cuda

Builds the model and an AdamW state (weights + two moments: ~12 bytes per parameter in fp32),
then, in one run and on one directory:
  raw write   write the same number of bytes with plain os.write + fsync (the disk's ceiling)
  sync save   Checkpointer.save (orchestrator/checkpoint/checkpointer.py): torch.save streamed to
              disk while hashed, fsync, SHA-256 manifest, atomic rename
  async save  Checkpointer.save with checkpoint.async_save: training stalls only for a CPU snapshot
              (FSDP: every rank's shards, torch.distributed.checkpoint.async_save)
  manifest    of the sync save: rank 0's write_manifest (hashes what no rank hashed while writing)
  verify      SHA-256 of every file against the manifest (orchestrator/checkpoint/manifest.py):
              by rank 0 alone (`verify`: resume before 2026-12-07, and export), and shared
              (`Checkpointer.verify`, each rank its own shards: resume since; absent before)
  load        Checkpointer.load into the model and optimizer (weights-only unpickling)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from lightning_fabric import Fabric  # noqa: E402

import orchestrator.checkpoint.checkpointer as checkpointer_mod  # noqa: E402
from data.util import file_sha256  # noqa: E402
from models.llama import Llama  # noqa: E402
from orchestrator.checkpoint.checkpointer import Checkpointer  # noqa: E402
from orchestrator.checkpoint.manifest import read_manifest, verify  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.parallel.launch import build_fabric  # noqa: E402


def raw_write(path: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Seconds to write `nbytes` (random-looking, incompressible) and fsync them."""
    buffer = os.urandom(block)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, buffer[: min(block, nbytes - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="llama-400m", help="named size (see `orchestrator models`)"
    )
    parser.add_argument(
        "--dir", default=None, help="directory on the disk to measure (default: a temp dir)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--strategy",
        choices=["single", "fsdp"],
        default="single",
        help="single: one file from one process; fsdp: FSDP2 shards from --devices processes",
    )
    parser.add_argument("--devices", type=int, default=2, help="processes (fsdp)")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    fsdp = args.strategy == "fsdp"
    devices = args.devices if fsdp else 1

    # One directory for every rank (FSDP: Fabric starts the other ranks with the same arguments).
    work = Path(args.dir or os.environ.get("CKPT_BENCH_DIR") or tempfile.mkdtemp(prefix="ckpt-"))
    os.environ["CKPT_BENCH_DIR"] = str(work)
    work.mkdir(parents=True, exist_ok=True)
    if args.accelerator == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    cfg = load_config(
        [
            "--model.name", args.model, "--run.dir", str(work / "run"),
            "--strategy.accelerator", args.accelerator, "--strategy.devices", str(devices),
            "--strategy.name", args.strategy, "--checkpoint.keep_last", "0",
        ]
    )  # fmt: skip
    if fsdp:
        fabric = build_fabric(cfg)
        fabric.launch()
    else:
        fabric = Fabric(accelerator=args.accelerator, devices=1)

    with fabric.init_module():
        model = Llama(cfg.model)
    params = sum(p.numel() for p in model.parameters())  # before sharding
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = fabric.setup(model, optimizer)
    for p in model.parameters():  # materialise AdamW's two moments without a costly backward
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = {"model": model, "optimizer": optimizer, "progress": {"step": 1, "tokens_seen": 0}}
    device = (
        f"CPU ({os.cpu_count()} cores)"
        if args.accelerator == "cpu"
        else f"{devices} x {torch.cuda.get_device_name()}"
    )
    results: dict = {
        "model": args.model,
        "parameters": params,
        "strategy": f"{args.strategy} ({devices} process(es))",
        "device": f"{device}, {platform.platform()}",
        "torch": torch.__version__,
        "directory": str(work),
    }

    manifest_seconds: list[float] = []  # rank 0's write_manifest, timed
    write_manifest = checkpointer_mod.write_manifest

    def timed_manifest(*args, **kwargs):
        started = time.perf_counter()
        try:
            return write_manifest(*args, **kwargs)
        finally:
            manifest_seconds.append(time.perf_counter() - started)

    checkpointer_mod.write_manifest = timed_manifest
    checkpointer = Checkpointer(fabric, cfg)
    report = checkpointer.save(state, step=1, tokens_seen=0)
    results["sync_manifest_s"] = manifest_seconds[0] if manifest_seconds else 0.0
    nbytes = report.size_bytes
    results["checkpoint_bytes"] = nbytes
    results["sync_save_s"] = report.write_seconds

    raw_seconds = 0.0
    if fabric.is_global_zero:  # (FSDP: the same bytes from one process)
        raw_seconds = raw_write(work / "raw.bin", nbytes)
        (work / "raw.bin").unlink()
    fabric.barrier()
    results["raw_write_s"] = raw_seconds
    results["raw_write_gb_s"] = nbytes / raw_seconds / 1e9 if raw_seconds else None
    results["sync_save_gb_s"] = nbytes / report.write_seconds / 1e9

    started = time.perf_counter()
    if fabric.is_global_zero:  # rank 0 alone, the others wait
        reason = verify(report.path, checksums=True)
        assert reason is None, reason
    fabric.barrier()
    results["verify_s"] = time.perf_counter() - started
    started = time.perf_counter()
    if fabric.is_global_zero:  # rank 0 alone, one file after the other (verify before 2026-12-07)
        for name, entry in read_manifest(report.path)["files"].items():
            assert file_sha256(report.path / name) == entry["sha256"], name
    fabric.barrier()
    results["verify_serial_s"] = time.perf_counter() - started
    results["verify_shared_s"] = None
    if hasattr(checkpointer, "verify"):  # every rank its own shards (since 2026-12-07)
        fabric.barrier()
        started = time.perf_counter()
        reason = checkpointer.verify(report.path)
        fabric.barrier()
        results["verify_shared_s"] = time.perf_counter() - started
        assert reason is None, reason

    started = time.perf_counter()
    checkpointer.load(report.path, dict(state))
    results["load_s"] = time.perf_counter() - started

    cfg.checkpoint.async_save = True
    async_checkpointer = Checkpointer(fabric, cfg)
    started = time.perf_counter()
    async_report = async_checkpointer.save(state, step=2, tokens_seen=0)
    async_checkpointer.wait()
    fabric.barrier()
    results["async_stall_s"] = async_report.stall_seconds
    results["async_manifest_s"] = manifest_seconds[-1] if len(manifest_seconds) > 1 else None
    results["async_total_s"] = time.perf_counter() - started
    if not fabric.is_global_zero:
        return

    print(
        f"{args.model}: {params:,} parameters, checkpoint {nbytes / 1e9:.2f} GB (weights + AdamW), "
        f"{results['strategy']}, {work}"
    )
    rows = [
        ("raw write + fsync (same bytes)", results["raw_write_s"], results["raw_write_gb_s"]),
        ("sync save (training stalls)", results["sync_save_s"], results["sync_save_gb_s"]),
        ("  of which manifest (rank 0)", results["sync_manifest_s"], None),
        ("async save: stall", results["async_stall_s"], None),
        ("async save: total", results["async_total_s"], nbytes / results["async_total_s"] / 1e9),
        ("  of which manifest (rank 0)", results["async_manifest_s"], None),
        ("verify (SHA-256), rank 0 alone", results["verify_s"], nbytes / results["verify_s"] / 1e9),
        ("  the same, one file at a time", results["verify_serial_s"], None),
        ("load", results["load_s"], nbytes / results["load_s"] / 1e9),
    ]
    if results["verify_shared_s"] is not None:
        shared = results["verify_shared_s"]
        rows.append(("verify (SHA-256), ranks share", shared, nbytes / shared / 1e9))
    print(f"{'':34} {'seconds':>8} {'GB/s':>6}")
    for name, seconds, rate in rows:
        if seconds is None:
            continue
        print(f"{name:34} {seconds:8.2f} {'' if rate is None else f'{rate:6.2f}'}")
    print(f"sync save / raw write: {results['sync_save_s'] / results['raw_write_s']:.2f}x the time")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
