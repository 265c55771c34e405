"""The TinyLlama-1.1B recipe at full size on 2 CPU processes: memory per rank, init, step,
checkpoint, resume and export, as a user runs them (`orchestrator train` on the sample corpus).

    .venv/bin/python benchmarks/scale.py --strategy fsdp            # FSDP2
    .venv/bin/python benchmarks/scale.py --strategy zero3           # DeepSpeed ZeRO-3
    .venv/bin/python benchmarks/scale.py --strategy fsdp --model tiny --seq-len 64   # a smoke run

configs/tinyllama-1.1b.yaml (1,100,048,384 parameters with its 32,000-token vocabulary) with
bf16-mixed, full activation checkpointing, seq 512, one sequence per rank and step, checkpoints
every `--save-at` steps. Then the same command in a copy of the run whose newest checkpoint is
the one at `--save-at`: it resumes and must give the straight run's losses, bitwise. Then
`orchestrator export` of the final checkpoint (with --export).

Memory: every process of the run is sampled from /proc (VmRSS, every 0.2 s, and the kernel's
high-water mark VmHWM); per rank the peak before the first step, the peak of each step and of
the whole run. Glibc's allocator is left at its defaults unless the trainer sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2**30
STRATEGIES = {
    "fsdp": ["--strategy.name", "fsdp"],
    "zero3": ["--strategy.name", "deepspeed", "--strategy.zero_stage", "3"],
    "ddp": ["--strategy.name", "ddp"],
}


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes ({} once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class MemorySampler(threading.Thread):
    """RSS of a process and its descendants over time: [(t, {pid: rss})], and each pid's VmHWM."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.hwm: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids, frontier = [], [self.root]
            while frontier:  # the whole tree: launcher, ranks, data workers
                pid = frontier.pop()
                pids.append(pid)
                frontier.extend(_children(pid))
            sample = {}
            for pid in pids:
                status = _status(pid)
                if status:
                    sample[pid] = status["VmRSS"]
                    self.hwm[pid] = max(self.hwm.get(pid, 0), status["VmHWM"])
            self.samples.append((time.time(), sample))
            self.done.wait(self.interval)

    def peak(self, pid: int, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.get(pid, 0) for t, s in self.samples if start <= t <= end), default=0)


def run_trainer(args: list[str], log: Path) -> dict:
    """`orchestrator train ARGS`, sampled; returns its timeline and memory."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    start = time.time()
    lines: list[tuple[float, str]] = []
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "train", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        sampler = MemorySampler(proc.pid)
        sampler.start()
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip()))
            out.write(line)
            out.flush()
        code = proc.wait()
    sampler.done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"orchestrator train exited {code}; see {log}")
    return {"start": start, "end": time.time(), "lines": lines, "sampler": sampler}


def rank_pids(sampler: MemorySampler, root: int) -> list[int]:
    """Rank 0 is the launching process; the other ranks are its children that ran the longest
    (data workers are short-lived children of the ranks)."""
    seen: dict[int, int] = {}
    for _, sample in sampler.samples:
        for pid in sample:
            seen[pid] = seen.get(pid, 0) + 1
    heavy = sorted((p for p in seen if p != root), key=lambda p: -sampler.hwm.get(p, 0))
    return [root, *heavy[:1]]


def summarise(result: dict, run_dir: Path) -> dict:
    sampler = result["sampler"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r and "perf_step_time_ms" in r]
    saves = [r for r in records if "checkpoint" in r and "write_seconds" in r]
    ranks = rank_pids(sampler, sampler.root)
    first_step_begin = steps[0]["time"] - steps[0]["perf_step_time_ms"] / 1000
    setup_done = next((t for t, line in result["lines"] if "parameters |" in line), None)
    per_rank = []
    for rank, pid in enumerate(ranks):
        step_peaks, begin = [], first_step_begin
        for r in steps:
            step_peaks.append(round(sampler.peak(pid, begin, r["time"]) / GIB, 2))
            begin = r["time"]
        per_rank.append(
            {
                "rank": rank,
                "peak_before_first_step_gib": round(
                    sampler.peak(pid, 0, first_step_begin) / GIB, 2
                ),
                "peak_per_step_gib": step_peaks,
                "peak_gib": round(sampler.hwm.get(pid, 0) / GIB, 2),
            }
        )
    return {
        "losses": [r["loss"] for r in steps],
        "steps": [r["step"] for r in steps],
        "step_seconds": [round(r["perf_step_time_ms"] / 1000, 1) for r in steps],
        "init_seconds": round(setup_done - result["start"], 1) if setup_done else None,
        "wall_seconds": round(result["end"] - result["start"], 1),
        "checkpoints": [
            {k: round(r[k], 2) for k in ("step", "write_seconds", "stall_seconds", "size_mb")}
            for r in saves
        ],
        "ranks": per_rank,
        "total_peak_gib": round(
            max((sum(s.values()) for _, s in sampler.samples), default=0) / GIB, 2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="fsdp")
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-at", type=int, default=2)
    p.add_argument("--no-resume", action="store_true", help="skip the resumed run")
    p.add_argument(
        "--resume-only", action="store_true", help="only the resumed run, from an earlier run's"
    )
    p.add_argument("--export", action="store_true", help="also time `orchestrator export`")
    p.add_argument("--work", default=".cache/scale", help="run dirs and the prepared data")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--data", nargs=2, metavar=("TOKENS", "TOKENIZER"), help="prepared data")
    a, extra = p.parse_known_args(argv)  # the rest: `orchestrator train` overrides

    from data.sample_corpus import prepare_sample_tokens

    work = Path(a.work) if Path(a.work).is_absolute() else REPO / a.work
    tokens, tokenizer = a.data or prepare_sample_tokens(work / "data", train_docs=2000, val_docs=50)
    name = f"{a.strategy}-{a.model}"
    run_dir = work / name
    if not a.resume_only:
        shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        "--config", str(REPO / "configs" / "tinyllama-1.1b.yaml"),
        "--model.name", a.model, "--run.dir", str(run_dir),
        "--data.dir", str(tokens), "--data.tokenizer", str(tokenizer), "--data.num_workers", "0",
        *STRATEGIES[a.strategy], "--strategy.accelerator", "cpu", "--strategy.devices", "2",
        "--strategy.precision", "bf16-mixed", "--strategy.activation_checkpointing", "full",
        "--train.seq_len", str(a.seq_len), "--train.micro_batch_size", "1",
        "--train.global_batch_tokens", str(2 * a.seq_len),
        "--train.max_steps", str(a.steps), "--train.log_interval", "1",
        "--eval.interval", "0", "--eval.at_start", "false", "--eval.max_batches", "0",
        "--checkpoint.interval", str(a.save_at), "--checkpoint.keep_last", "0",
        *extra,
    ]  # fmt: skip
    print(f"== {name}: {a.steps} steps, checkpoints every {a.save_at}", flush=True)
    straight = (
        {"losses": [json.loads(x).get("loss") for x in (run_dir / "metrics.jsonl").open()
                    if '"perf_step_time_ms"' in x]}
        if a.resume_only
        else summarise(run_trainer(args, work / f"{name}.log"), run_dir)
    )  # fmt: skip
    out = {
        "device": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([sys.executable, *sys.argv]),
        "strategy": a.strategy,
        "model": a.model,
        "straight": straight,
    }
    print(json.dumps(straight, indent=1), flush=True)

    if not a.no_resume:
        # A copy of the run whose newest checkpoint is the one at --save-at, as after a crash.
        resumed_dir = work / f"{name}-resumed"
        shutil.rmtree(resumed_dir, ignore_errors=True)
        resumed_dir.mkdir(parents=True)
        ckpts = resumed_dir / "checkpoints"
        ckpts.mkdir()
        source = run_dir / "checkpoints" / f"step-{a.save_at:08d}"
        shutil.copytree(source, ckpts / source.name)
        shutil.copy(run_dir / "config.yaml", resumed_dir / "config.yaml")
        resumed_args = [*args]
        resumed_args[resumed_args.index("--run.dir") + 1] = str(resumed_dir)
        result = run_trainer(resumed_args, work / f"{name}-resumed.log")
        resumed = summarise(result, resumed_dir)
        resumed_line = next((t for t, line in result["lines"] if "Resumed from" in line), None)
        resumed["resume_seconds"] = (
            round(resumed_line - result["start"], 1) if resumed_line else None
        )
        resumed["bitwise"] = resumed["losses"] == straight["losses"][a.save_at :]
        out["resumed"] = resumed
        print(json.dumps(resumed, indent=1), flush=True)
        shutil.rmtree(resumed_dir / "checkpoints", ignore_errors=True)

    if a.export:
        hf = work / f"{name}-hf"
        shutil.rmtree(hf, ignore_errors=True)
        start = time.time()
        subprocess.run(
            [sys.executable, "-m", "orchestrator", "export", "--checkpoint", str(run_dir),
             "--output", str(hf)],
            cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        out["export_seconds"] = round(time.time() - start, 1)
        print(f"export: {out['export_seconds']} s", flush=True)
        shutil.rmtree(hf, ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 12.6 GB each at 1.1B
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
