"""What the run shows: progress lines, TensorBoard scalars and text, and a metrics.jsonl record.

Everything is written by global rank 0 (`on_rank_zero`); the other ranks only take part in the
collectives some numbers need. The scalar names and the metrics.jsonl records: docs/training.md,
"Watch it"; the trackers of logging.trackers (trackers.py) get the same scalars.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger
from torch.distributed.tensor import DTensor

from data.tokenizer import Tokenizer
from data.util import format_duration
from models.flops import flops_per_token
from orchestrator.devices import device_peak_flops
from orchestrator.evaluation.generation import completion, greedy
from orchestrator.parallel.compile import eager
from orchestrator.parallel.fsdp import gathered
from orchestrator.parallel.launch import gather_object, on_rank_zero
from orchestrator.schema import to_dict
from orchestrator.training.trackers import Tracker, make_trackers


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tensorboard"


def make_loggers(cfg, resume_step: int | None = None) -> list:
    """TensorBoard and the trackers of logging.trackers (orchestrator/training/trackers.py)."""
    loggers: list = []
    if cfg.logging.tensorboard and "tensorboard" in cfg.logging.trackers:
        # version="" keeps every (re)start of the run in one directory, so a resumed run's
        # curves continue on the same plot; purge_step hides what a killed run logged after
        # the checkpoint it resumes from (those steps are trained again).
        extra = {"purge_step": resume_step + 1} if resume_step is not None else {}
        loggers.append(
            TensorBoardLogger(root_dir=cfg.run.dir, name="tensorboard", version="", **extra)
        )
    return loggers + make_trackers(cfg, resume_step)


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


def config_text(cfg) -> str:
    """The resolved config as YAML (what config.yaml of the run holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


LOW_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed")


def run_peak_flops(cfg, device: torch.device) -> float | None:
    """Peak FLOP/s of one device of this run (None when unknown: then no MFU is logged)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if device.type != "cuda" or cfg.strategy.precision not in LOW_PRECISIONS:
        return None
    return device_peak_flops(torch.cuda.get_device_name(device))


def memory_stats(device: torch.device) -> dict[str, float]:
    """Device memory of this process in GiB: the CUDA caching allocator's figures, or resident memory on CPU."""
    gib = 2**30
    if device.type == "cuda":
        return {
            "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        }
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"memory/rss_gib": rss / gib, "memory/peak_rss_gib": max(peak, rss) / gib}


def format_flops(flops_per_second: float) -> str:
    if flops_per_second >= 1e12:
        return f"{flops_per_second / 1e12:.1f} TFLOP/s"
    return f"{flops_per_second / 1e9:.2f} GFLOP/s"


_BLOCK = re.compile(r"(?:^|\.)(blocks|encoder_blocks|decoder_blocks)\.(\d+)\.")
_BLOCK_GROUP = {
    "blocks": "block",
    "encoder_blocks": "encoder_block",
    "decoder_blocks": "decoder_block",
}


def parameter_group(name: str) -> str:
    """grad_norm/<group> of a parameter: block_NN (encoder_block_NN, decoder_block_NN for the
    encoder-decoder), embedding, lm_head or other (final norms)."""
    m = _BLOCK.search(name)
    if m:
        return f"{_BLOCK_GROUP[m.group(1)]}_{int(m.group(2)):02d}"
    if re.search(r"(?:^|\.)embed\.", name):
        return "embedding"
    if re.search(r"(?:^|\.)lm_head\.", name):
        return "lm_head"
    return "other"


def group_grad_norms(fabric: Fabric, model: torch.nn.Module) -> dict[str, float] | None:
    """L2 norm of the gradients of each parameter group, over the whole model (all ranks).

    DDP gradients are already identical on every rank; FSDP2 gradients are DTensor shards whose
    squared sums are added up across ranks (a collective: call on every rank). DeepSpeed keeps
    gradients in its own buffers (p.grad is empty): None."""
    sums: dict[str, torch.Tensor] = {}
    sharded = False
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            g, sharded = g.to_local(), True
        group = parameter_group(name)
        sq = g.detach().float().pow(2).sum()
        sums[group] = sums[group] + sq if group in sums else sq
    if not sums:
        return None
    names = sorted(sums)
    total = torch.stack([sums[n].to(fabric.device) for n in names])
    if sharded:
        total = fabric.all_reduce(total, reduce_op="sum")
    return {n: math.sqrt(v) for n, v in zip(names, total.tolist(), strict=True)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside Fabric's wrapper (and DDP / DeepSpeed engines, torch.compile)."""
    inner = model
    while True:
        nxt = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if not isinstance(nxt, torch.nn.Module) or nxt is inner:
            return inner
        inner = nxt


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Leave Python's, NumPy's and torch's (CPU and this CUDA device's) random streams as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def generate_samples(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy completions of `prompts` (each decoded with its prompt), RNG streams untouched.

    Every caller runs exactly len(prompts) x (1 + max_new_tokens - 1) forward passes (no early stop
    at the end-of-sequence token), so sharded models (FSDP, ZeRO-3) stay in lockstep on every rank."""
    device = next(model.parameters()).device
    texts = []
    with preserved_rng(device), torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.encode(prompt, bos=True)[-model.cfg.max_seq_len + 1 :]
            out = greedy(model, ids, max_new_tokens, tokenizer.vocab_size)  # every step
            new = completion(out, len(ids), tokenizer.eos_id)
            texts.append(
                tokenizer.decode(ids[1:] + new)
                if ids and ids[0] == tokenizer.bos_id
                else tokenizer.decode(ids + new)
            )
    return texts


def as_preformatted(text: str) -> str:
    """Markdown that TensorBoard's text plugin shows verbatim (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())


class Monitor:
    """Collects per-step numbers on every rank; rank 0 prints and writes them."""

    def __init__(self, fabric: Fabric, cfg, start_step: int, guard=None) -> None:
        self.fabric = fabric
        self.cfg = cfg
        self.guard = guard  # its bad_steps / rollbacks counters are logged every log interval
        self.metrics_path = Path(cfg.run.dir) / "metrics.jsonl"
        self.interval_start = time.perf_counter()
        self.interval_tokens = 0
        self.interval_steps = 0
        self.interval_step_seconds = 0.0  # time inside training steps (begin_step -> train_step)
        self.interval_data_seconds = 0.0  # of which blocked on the data loader
        self.step_started: float | None = None
        self.step_z_loss: torch.Tensor | None = None  # model.z_loss > 0: the step's, on the device
        self.start_step = start_step
        self.tokens_seen: int | None = 0 if start_step == 0 else None
        self.flops_per_token = flops_per_token(cfg.model, cfg.seq_len)["training"]
        self.peak_flops = run_peak_flops(cfg, fabric.device)
        self.tokenizer = None
        self.samples_failed = False
        # Records wait here (in order) while a step's batch fingerprints are still on their ranks;
        # `hashes` holds this rank's fingerprints of each waiting step, gathered at flush steps.
        self.waiting: list[tuple[dict[str, Any], int | None]] = []
        self.hashes: list[list[str]] = []
        on_rank_zero(fabric, lambda: truncate_metrics(self.metrics_path, start_step))
        self.text("config", as_preformatted(config_text(cfg)), start_step)
        for tracker in self.trackers():  # rank 0 only (the trackers' own rank_zero_only)
            tracker.log_hyperparams(to_dict(cfg))
            tracker.log_text("config", config_text(cfg), start_step)

    def trackers(self) -> list[Tracker]:
        return [logger for logger in self.fabric.loggers if isinstance(logger, Tracker)]

    def log_step(self, step: int) -> bool:
        """Is `step` one of the train.log_interval steps (or the last)?"""
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.max_steps

    def flush_step(self, step: int) -> bool:
        """Steps at which the batch fingerprints are gathered (a collective) and the waiting
        records written: log steps and checkpoint steps (so that the metrics of a checkpoint's
        steps are on disk with it), and every step of a one-process run (nothing to gather)."""
        interval = self.cfg.checkpoint.interval
        return (
            self.fabric.world_size == 1
            or self.log_step(step)
            or bool(interval and step % interval == 0)
        )

    def record(self, values: dict[str, Any], batch_hashes: list[str] | None = None) -> None:
        """Append one JSON line to metrics.jsonl (rank 0); a record with this rank's batch
        fingerprints (or one after such a record) waits for the next `flush`."""
        if batch_hashes is not None:
            self.waiting.append((values, len(self.hashes)))
            self.hashes.append(batch_hashes)
        elif self.waiting:
            self.waiting.append((values, None))
        else:
            self._write([values])

    def flush(self) -> None:
        """Collective when fingerprints wait: every rank's, in rank order, into their records;
        then every waiting record is written."""
        if not self.waiting:
            return
        per_rank = gather_object(self.fabric, self.hashes)  # [rank][waiting step] -> hashes
        records = []
        for values, index in self.waiting:
            if index is not None:
                values = dict(values, batch_hashes=[h for rank in per_rank for h in rank[index]])
            records.append(values)
        self.waiting, self.hashes = [], []
        self._write(records)

    def _write(self, records: list[dict[str, Any]]) -> None:
        def write() -> None:
            with self.metrics_path.open("a") as f:
                f.writelines(json.dumps(values) + "\n" for values in records)

        on_rank_zero(self.fabric, write)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A TensorBoard text entry (rank 0)."""

        def write() -> None:
            for logger in self.fabric.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(tag, markdown, global_step=step)

        on_rank_zero(self.fabric, write)

    def begin_step(self) -> None:
        """Called at the top of every optimizer step: starts the step's clock."""
        self.step_started = time.perf_counter()
        self.step_z_loss = None

    def add_z_loss(self, model: torch.nn.Module, accumulation: int) -> None:
        """After each micro-batch's forward (model.z_loss > 0): add its z-loss term / accumulation to
        the step's, on the device (no host sync; it is read at log steps only)."""
        if self.cfg.model.z_loss <= 0:
            return
        term = unwrap(model).last_z_loss
        if term is not None:
            term = term / accumulation
            self.step_z_loss = term if self.step_z_loss is None else self.step_z_loss + term

    def z_loss_value(self) -> float | None:
        """The step's z-loss term, mean over ranks (a collective: call on every rank), or None."""
        if self.cfg.model.z_loss <= 0:
            return None
        z = self.step_z_loss
        z = torch.zeros((), device=self.fabric.device) if z is None else z.detach().float().clone()
        if self.fabric.world_size > 1:
            torch.distributed.all_reduce(z)  # sum over ranks (no Fabric barrier)
            z /= self.fabric.world_size
        return z.item()

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Wrap the data loader's `next()`: the time inside counts as waiting for data."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.interval_data_seconds += time.perf_counter() - started

    def train_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_seen: int,
        step_tokens: int,
        batch_hashes: list[str] | None,
    ) -> None:
        """Called after every optimizer step on every rank, with this rank's batch fingerprints;
        prints and logs every train.log_interval steps."""
        now = time.perf_counter()
        if self.step_started is not None:
            self.interval_step_seconds += now - self.step_started
            self.step_started = None
        self.interval_tokens += step_tokens
        self.interval_steps += 1
        self.tokens_seen = tokens_seen
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_seen": tokens_seen,
            "time": time.time(),
        }
        if not self.log_step(step):
            self.record(record, batch_hashes)
            if self.flush_step(step):
                self.flush()
            return
        elapsed = now - self.interval_start
        tokens_per_sec = self.interval_tokens / max(elapsed, 1e-9)
        eta = elapsed / max(self.interval_steps, 1) * (self.cfg.train.max_steps - step)
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_seen": float(tokens_seen),
            "train/tokens_per_sec": tokens_per_sec,
            **self.perf_figures(),
            **memory_stats(self.fabric.device),
        }
        if self.guard is not None:
            scalars["train/bad_steps"] = float(self.guard.bad_steps)
            scalars["train/rollbacks"] = float(self.guard.rollbacks)
        z_loss = self.z_loss_value()  # log steps only: its host sync (and collective) happen here
        if z_loss is not None:
            scalars["train/z_loss"] = record["z_loss"] = z_loss
        self.fabric.log_dict(scalars, step=step)
        extra = {k.replace("/", "_"): v for k, v in scalars.items() if not k.startswith("train/")}
        self.record(
            {**record, "tokens_per_sec": tokens_per_sec, "eta_seconds": eta, **extra}, batch_hashes
        )
        self.flush()
        speed = (
            f"MFU {100 * scalars['perf/mfu']:.1f}%"
            if "perf/mfu" in scalars
            else f"{format_flops(scalars.get('perf/tflops_per_device', 0.0) * 1e12)}/device"
        )
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad_norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | {speed} | tokens {tokens_seen:,} | "
            f"ETA {format_duration(eta)}",
            flush=True,
        )
        self.interval_start = time.perf_counter()
        self.interval_tokens = 0
        self.interval_steps = 0
        self.interval_step_seconds = 0.0
        self.interval_data_seconds = 0.0

    def perf_figures(self) -> dict[str, float]:
        """Throughput of the training steps themselves (no validation / checkpoint pauses) as model
        FLOP/s per device and MFU, and the split of rank 0's mean step into data wait and compute."""
        steps = max(self.interval_steps, 1)
        step_seconds = self.interval_step_seconds
        if step_seconds <= 0:  # begin_step() was not called: fall back to the interval's wall time
            step_seconds = time.perf_counter() - self.interval_start
        flops_per_device = (
            self.interval_tokens
            / max(step_seconds, 1e-9)
            * self.flops_per_token
            / self.fabric.world_size
        )
        data = min(self.interval_data_seconds, step_seconds)
        out = {
            "perf/tflops_per_device": flops_per_device / 1e12,
            "perf/step_time_ms": 1000 * step_seconds / steps,
            "perf/data_wait_ms": 1000 * data / steps,
            "perf/compute_ms": 1000 * (step_seconds - data) / steps,
            "perf/data_wait_fraction": data / max(step_seconds, 1e-9),
        }
        if self.peak_flops:
            out["perf/mfu"] = flops_per_device / self.peak_flops
        return out

    def layer_grad_norms(self, step: int, model: torch.nn.Module) -> None:
        """grad_norm/<part> at log steps when logging.layer_grad_norms (call on every rank, before clipping)."""
        if not self.cfg.logging.layer_grad_norms or not self.log_step(step):
            return
        norms = group_grad_norms(self.fabric, model)
        if norms is None:
            return
        self.fabric.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, step=step)
        self.record({"step": step, "grad_norms": norms})

    def sample_generations(self, step: int, model: torch.nn.Module) -> None:
        """Every logging.sample_interval steps: greedy completions of logging.sample_prompts, on the
        unwrapped model in eval mode (rank 0; every rank for FSDP / ZeRO-3, whose forward is collective)."""
        interval = self.cfg.logging.sample_interval
        if not interval or step % interval or self.samples_failed:
            return
        s = self.cfg.strategy
        everyone = s.name == "fsdp" or (s.name == "deepspeed" and s.zero_stage == 3)
        if not (everyone or self.fabric.is_global_zero):
            return
        try:
            if self.tokenizer is None:
                self.tokenizer = Tokenizer(self.cfg.data.tokenizer)
            # Eager (parallel/compile.py), and FSDP2 units gathered once for every token.
            with eager(), gathered(model):
                texts = generate_samples(
                    unwrap(model),
                    self.tokenizer,
                    list(self.cfg.logging.sample_prompts),
                    self.cfg.logging.sample_tokens,
                )
        except Exception as e:  # a monitoring feature must never end the run
            self.samples_failed = True
            self.fabric.print(
                f"warning: sample generation failed ({type(e).__name__}: {e}); "
                "no more samples this run",
                flush=True,
            )
            return
        prompts = list(self.cfg.logging.sample_prompts)
        self.text("samples", "\n\n".join(as_preformatted(t) for t in texts), step)
        for tracker in self.trackers():
            tracker.log_samples(step, prompts, texts)
        self.record(
            {
                "step": step,
                "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, texts, strict=True)],
            }
        )
        self.fabric.print(f"step {step:>6}/{self.cfg.train.max_steps} | samples:", flush=True)
        for text in texts:
            self.fabric.print("    " + " ".join(text.split())[:200], flush=True)

    def validation(self, step: int, loss: float) -> None:
        perplexity = math.exp(min(loss, 50.0))
        self.fabric.log_dict({"val/loss": loss, "val/perplexity": perplexity}, step=step)
        record = {"step": step, "val_loss": loss, "val_perplexity": perplexity}
        if self.tokens_seen is not None:
            record["tokens_seen"] = self.tokens_seen
        self.record(record)
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | val_loss {loss:.4f} | "
            f"val_ppl {perplexity:.2f}",
            flush=True,
        )

    def downstream(self, step: int, results: dict[str, float]) -> None:
        """eval.tasks scores ({"<task>/<metric>": value}, the same on every rank): TensorBoard
        eval/<task>/<metric>, a metrics.jsonl record {"step", "eval": results, "tokens_seen"}, and a
        progress line."""
        if not results:
            return
        self.fabric.log_dict({f"eval/{k}": v for k, v in results.items()}, step=step)
        record: dict[str, Any] = {"step": step, "eval": dict(results)}
        if self.tokens_seen is not None:
            record["tokens_seen"] = self.tokens_seen
        self.record(record)
        scores = " | ".join(f"{k} {v:.4f}" for k, v in results.items())
        self.fabric.print(f"step {step:>6}/{self.cfg.train.max_steps} | eval {scores}", flush=True)

    def epoch_end(self, step: int, epoch: int, sequences: int, blocks: int) -> None:
        """Report the blocks an epoch never showed (drop_last remainders; an elastic resume)."""
        unseen = blocks - sequences
        self.fabric.log_dict({"data/epoch_unseen_blocks": float(unseen)}, step=step)
        self.record(
            {
                "step": step,
                "epoch_end": epoch,
                "epoch_sequences": sequences,
                "epoch_blocks": blocks,
                "epoch_unseen_blocks": unseen,
            }
        )
        self.fabric.print(
            f"epoch {epoch} done at step {step}: {sequences:,} of {blocks:,} training blocks read "
            f"({unseen:,} not seen this epoch: drop_last remainders per rank, or a resume on a "
            "different number of processes)",
            flush=True,
        )

    def data_sources(
        self, step: int, samples_by_source: dict[str, int] | None, seq_len: int
    ) -> None:
        """Tokens consumed from each source of a data mixture, summed over all ranks; logged at the
        train.log_interval steps (TensorBoard data/tokens_<source>, a metrics.jsonl record).

        Call it on every rank after train_step (it runs a collective at log steps). The counts come
        from the data loader's own state, so they are checkpointed and continue after a resume."""
        if not samples_by_source:
            return
        if step % self.cfg.train.log_interval and step != self.cfg.train.max_steps:
            return
        names = list(samples_by_source)
        local = torch.tensor(
            [samples_by_source[n] for n in names], dtype=torch.int64, device=self.fabric.device
        )
        total = self.fabric.all_reduce(local, reduce_op="sum").tolist()
        tokens = {name: int(count) * seq_len for name, count in zip(names, total, strict=True)}
        all_tokens = max(sum(tokens.values()), 1)
        self.fabric.log_dict({f"data/tokens_{n}": float(t) for n, t in tokens.items()}, step=step)
        self.record({"step": step, "tokens_by_source": tokens})
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | data: "
            + ", ".join(
                f"{n} {t:,} tokens ({100 * t / all_tokens:.1f}%)" for n, t in tokens.items()
            ),
            flush=True,
        )

    def bad_step(self, step: int, reason: str, total: int) -> None:
        self.fabric.log_dict({"train/bad_steps": float(total)}, step=step)
        self.record({"step": step, "bad_step": reason, "bad_steps_total": total})
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | skipped update: {reason} "
            f"({total} bad step(s) so far)",
            flush=True,
        )

    def rollback(self, step: int, target: Path, rollbacks: int) -> None:
        self.fabric.log_dict({"train/rollbacks": float(rollbacks)}, step=step)
        self.record({"step": step, "rollback_to": str(target), "rollbacks_total": rollbacks})
        self.fabric.print(
            f"step {step:>6}/{self.cfg.train.max_steps} | too many bad steps in a row: rolled back "
            f"to {target} (rollback {rollbacks}/{self.cfg.guard.max_rollbacks})",
            flush=True,
        )

    def checkpoint(self, report) -> None:
        values = {"checkpoint/stall_seconds": report.stall_seconds}
        if report.write_seconds is None:
            self.fabric.print(
                f"Saving checkpoint {report.path} in the background "
                f"(training stalled {report.stall_seconds:.2f}s)",
                flush=True,
            )
        else:
            values["checkpoint/write_seconds"] = report.write_seconds
            values["checkpoint/size_mb"] = report.size_bytes / 2**20
            values["checkpoint/all_checkpoints_mb"] = report.total_bytes / 2**20
            self.fabric.print(
                f"Saved checkpoint {report.path} ({report.size_bytes / 2**20:,.1f} MB in "
                f"{report.write_seconds:.2f}s, training stalled {report.stall_seconds:.2f}s; "
                f"checkpoints use {report.total_bytes / 2**20:,.1f} MB)",
                flush=True,
            )
        self.fabric.log_dict(values, step=report.step)
        self.record(
            {
                "step": report.step,
                "checkpoint": str(report.path),
                **{k.split("/")[1]: v for k, v in values.items()},
            }
        )

    def close(self) -> None:
        """Collective: write what still waits, finish the loggers."""
        self.flush()
        for logger in self.fabric.loggers:
            logger.finalize("success")
