"""What the run shows: progress lines, TensorBoard scalars and a metrics.jsonl record.

TensorBoard scalar names (all indexed by optimizer step):
  train/loss, train/lr, train/grad_norm, train/tokens_seen, train/tokens_per_sec,
  val/loss, val/perplexity
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger

from orchestrator.distributed import on_rank_zero


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tensorboard"


def make_loggers(cfg, resume_step: int | None = None) -> list:
    if not cfg.logging.tensorboard:
        return []
    # version="" keeps every (re)start of the run in one directory, so a resumed run's
    # curves continue on the same plot; purge_step hides what a killed run logged after
    # the checkpoint it resumes from (those steps are trained again).
    extra = {"purge_step": resume_step + 1} if resume_step is not None else {}
    return [TensorBoardLogger(root_dir=cfg.run.dir, name="tensorboard", version="", **extra)]


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Drop records of steps after `keep_through_step` (a resumed run trains them again) and a
    torn last line left by a killed process."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= keep_through_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def batch_fingerprint(tokens: torch.Tensor) -> int:
    """A 63-bit hash of a batch's token ids: equal batches give equal fingerprints."""
    digest = hashlib.blake2b(tokens.detach().cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Monitor:
    """Collects per-step numbers on every rank; rank 0 prints and writes them."""

    def __init__(self, fabric: Fabric, cfg, start_step: int) -> None:
        self.fabric = fabric
        self.cfg = cfg
        self.metrics_path = Path(cfg.run.dir) / "metrics.jsonl"
        self.interval_start = time.perf_counter()
        self.interval_tokens = 0
        self.interval_steps = 0
        self.start_step = start_step
        on_rank_zero(fabric, lambda: truncate_metrics(self.metrics_path, start_step))

    def record(self, values: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (rank 0)."""

        def write() -> None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(values) + "\n")

        on_rank_zero(self.fabric, write)

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_seen: int,
                   step_tokens: int, batch_hashes: list[int] | None) -> None:
        """Called after every optimizer step; prints and logs every train.log_interval steps."""
        self.interval_tokens += step_tokens
        self.interval_steps += 1
        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens_seen": tokens_seen}
        if batch_hashes is not None:
            record["batch_hashes"] = [f"{h:016x}" for h in batch_hashes]
        self.record(record)
        if step % self.cfg.train.log_interval and step != self.cfg.train.max_steps:
            return
        elapsed = time.perf_counter() - self.interval_start
        tokens_per_sec = self.interval_tokens / max(elapsed, 1e-9)
        seconds_per_step = elapsed / max(self.interval_steps, 1)
        eta = seconds_per_step * (self.cfg.train.max_steps - step)
        self.fabric.log_dict(
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_seen": float(tokens_seen),
                "train/tokens_per_sec": tokens_per_sec,
            },
            step=step,
        )
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad_norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | tokens {tokens_seen:,} | "
            f"ETA {format_duration(eta)}",
            flush=True,
        )
        self.interval_start = time.perf_counter()
        self.interval_tokens = 0
        self.interval_steps = 0

    def validation(self, step: int, loss: float) -> None:
        perplexity = math.exp(min(loss, 50.0))
        self.fabric.log_dict({"val/loss": loss, "val/perplexity": perplexity}, step=step)
        self.record({"step": step, "val_loss": loss, "val_perplexity": perplexity})
        self.fabric.print(f"step {step:>6}/{self.cfg.train.max_steps} | val_loss {loss:.4f} | "
                          f"val_ppl {perplexity:.2f}", flush=True)

    def bad_step(self, step: int, reason: str, total: int) -> None:
        self.fabric.log_dict({"train/bad_steps": float(total)}, step=step)
        self.record({"step": step, "bad_step": reason, "bad_steps_total": total})
        self.fabric.print(f"step {step:>6}/{self.cfg.train.max_steps} | skipped update: {reason} "
                          f"({total} bad step(s) so far)", flush=True)

    def rollback(self, step: int, target: Path, rollbacks: int) -> None:
        self.fabric.log_dict({"train/rollbacks": float(rollbacks)}, step=step)
        self.record({"step": step, "rollback_to": str(target), "rollbacks_total": rollbacks})
        self.fabric.print(f"step {step:>6}/{self.cfg.train.max_steps} | too many bad steps in a row: rolled back "
                          f"to {target} (rollback {rollbacks}/{self.cfg.guard.max_rollbacks})", flush=True)

    def checkpoint(self, report) -> None:
        values = {"checkpoint/stall_seconds": report.stall_seconds}
        if report.write_seconds is None:
            self.fabric.print(f"Saving checkpoint {report.path} in the background "
                              f"(training stalled {report.stall_seconds:.2f}s)", flush=True)
        else:
            values["checkpoint/write_seconds"] = report.write_seconds
            values["checkpoint/size_mb"] = report.size_bytes / 2**20
            values["checkpoint/all_checkpoints_mb"] = report.total_bytes / 2**20
            self.fabric.print(f"Saved checkpoint {report.path} ({report.size_bytes / 2**20:,.1f} MB in "
                              f"{report.write_seconds:.2f}s, training stalled {report.stall_seconds:.2f}s; "
                              f"checkpoints use {report.total_bytes / 2**20:,.1f} MB)", flush=True)
        self.fabric.log_dict(values, step=report.step)
        self.record({"step": report.step, "checkpoint": str(report.path),
                     **{k.split("/")[1]: v for k, v in values.items()}})

    def close(self) -> None:
        for logger in self.fabric.loggers:
            logger.finalize("success")
