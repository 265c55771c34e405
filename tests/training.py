"""Shared helpers for tests that run the real trainer in subprocesses (tiny model, 2 gloo processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "--model.name", "tiny", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_hidden", "172", "--model.vocab_size", "512",
    "--model.max_seq_len", "64",
    "--train.micro_batch_size", "4", "--train.global_batch_size", "16", "--train.log_interval", "2",
    "--optimizer.lr", "1e-3", "--optimizer.min_lr", "1e-4", "--schedule.warmup_steps", "2",
    "--eval.max_batches", "2", "--strategy.accelerator", "cpu", "--strategy.devices", "2",
    "--strategy.precision", "32-true",
]  # fmt: skip


def data_args(sample_data):
    tokens, tokenizer = sample_data
    return ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]


def run_cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NTASKS", None)
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train(run_dir, sample_data, *extra, entry=None):
    entry = entry or [sys.executable, "-m", "orchestrator", "train"]
    return run_cli([*entry, *TINY, *data_args(sample_data), "--run.dir", str(run_dir), *extra])


def step_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]
