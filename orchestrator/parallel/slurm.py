"""Preemption, time limits and requeue: stop cleanly on a signal, save, and let the job continue.

    SIGUSR1  (Slurm `--signal=USR1@N` before the time limit, a preemption notice, or
             `scancel --signal=USR1 JOB`): finish the optimizer step, save a checkpoint, and, inside
             a Slurm job with strategy.requeue, run `scontrol requeue $SLURM_JOB_ID`; exit 0. The
             requeued job resumes from that checkpoint (checkpoint.resume=auto).
    SIGTERM  (scancel, the time limit itself, `docker stop`, Kubernetes): finish the step, save,
             exit 143 (no requeue: somebody asked this job to end). A second SIGTERM exits at once,
             and so does one before training runs (train.py: nothing to save yet).

Signals reach different ranks at different moments (or only one rank, e.g. the launcher's
process); ranks agree with an all-reduce after every optimizer step, so all of them stop after
the same step and write one consistent checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from orchestrator.checkpoint.layout import checkpoint_root, latest_checkpoint
from orchestrator.config import load_config

NONE, USR1, TERM = 0, 1, 2
NAMES = {USR1: "SIGUSR1", TERM: "SIGTERM"}


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


class StopSignals:
    """Records SIGUSR1 / SIGTERM; `agreed(fabric)` tells every rank whether any rank got one."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.received = NONE
        self._previous: dict[int, object] = {}
        for signum in signals:
            self.install(signum)

    def install(self, signum: int) -> None:
        """Record `signum` from now on (handlers live in the main thread only)."""
        if threading.current_thread() is threading.main_thread() and signum not in self._previous:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        code = USR1 if signum == signal.SIGUSR1 else TERM
        if code == TERM and self.received == TERM:
            # Asked twice: stop now (the checkpoint of the last interval is what is left).
            self.restore()
            raise SystemExit(128 + signal.SIGTERM)
        self.received = max(self.received, code)
        print(
            f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] received "
            f"{NAMES[code]}: stopping after the current step with a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def flags(self) -> list[float]:
        """This rank's share of the step's all-reduce: [got SIGUSR1, got SIGTERM]."""
        return [float(self.received == USR1), float(self.received == TERM)]

    @staticmethod
    def strongest(summed_flags: list[float]) -> int:
        """The strongest signal any rank received, from the flags added up over ranks."""
        usr1, term = summed_flags
        return TERM if term > 0 else USR1 if usr1 > 0 else NONE

    def agreed(self, fabric) -> int:
        """The strongest signal any rank received, in a collective of its own (the trainer
        carries `flags()` in its step's bookkeeping all-reduce instead)."""
        if fabric.world_size == 1:
            return self.received
        flags = torch.tensor(self.flags(), device=fabric.device)
        torch.distributed.all_reduce(flags)
        return self.strongest(flags.tolist())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous = {}


def requeue_marker(run_dir) -> Path:
    """File by which a trainer without `scontrol` (in a container) asks the batch script to requeue."""
    return Path(run_dir) / f".requeue-{os.environ.get('SLURM_JOB_ID', 'none')}"


def requeue_job() -> tuple[bool, str]:
    """`scontrol requeue $SLURM_JOB_ID` (the job must allow it: `#SBATCH --requeue`)."""
    job = os.environ.get("SLURM_JOB_ID")  # also an array task's own id
    if not job:
        return False, "not inside a Slurm job"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, "scontrol is not on PATH"
    try:
        proc = subprocess.run(
            [scontrol, "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"scontrol requeue {job} failed: {e}"
    if proc.returncode != 0:
        return False, f"scontrol requeue {job} failed: {(proc.stderr or proc.stdout).strip()}"
    return True, f"requeued Slurm job {job}"


def finish_stop(fabric, cfg, stop: int, step: int) -> dict:
    """After the stop checkpoint of `step`: requeue (SIGUSR1 in a Slurm job) and say what happened.

    Returns the run summary with the process exit code (0 after a requeue or SIGUSR1, 143 after SIGTERM).
    """
    latest = latest_checkpoint(checkpoint_root(cfg))
    requeued, detail = False, ""
    if stop == USR1 and cfg.strategy.requeue and in_slurm_job():
        if fabric.is_global_zero:
            requeued, detail = requeue_job()
            if not requeued and shutil.which("scontrol") is None:
                # Inside a container (pyxis, Apptainer) Slurm's tools are usually absent: leave the
                # request to cluster/pretrain.slurm, which runs `scontrol requeue` on the host.
                marker = requeue_marker(cfg.run.dir)
                marker.write_text(os.environ.get("SLURM_JOB_ID", "") + "\n")
                requeued, detail = (
                    True,
                    f"asked the batch script to requeue Slurm job {os.environ.get('SLURM_JOB_ID')} ({marker})",
                )
        requeued, detail = fabric.broadcast((requeued, detail))
    if fabric.is_global_zero:
        print(
            f"Stopped by {NAMES[stop]} after step {step}/{cfg.train.max_steps}; checkpoint {latest}",
            flush=True,
        )
        if requeued:
            print(f"{detail}: it resumes from that checkpoint when Slurm restarts it", flush=True)
        elif detail:
            print(
                f"warning: could not requeue ({detail}); resubmit the job to resume",
                file=sys.stderr,
                flush=True,
            )
        else:
            print("Run the same command again to resume.", flush=True)
    return {
        "steps": step,
        "stopped_by": NAMES[stop],
        "requeued": requeued,
        "latest_checkpoint": str(latest),
        "exit_code": 128 + signal.SIGTERM if stop == TERM else 0,
    }


def job_env(argv: list[str]) -> str:
    """Shell assignments for cluster/pretrain.slurm from the resolved config (`RUN_DIR=...`, threads).

    Also warns when the CPUs Slurm gives each task cannot hold the data-loader workers plus the
    training process (workers multiplying past the node's cores is a classic cluster failure).
    """
    cfg = load_config(argv)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)
    workers = cfg.data.num_workers
    if workers + 1 > cpus:
        print(
            f"warning: data.num_workers={workers} worker processes + the training process per task exceed "
            f"--cpus-per-task={cpus}: lower data.num_workers or raise --cpus-per-task",
            file=sys.stderr,
        )
    threads = max(1, cpus - workers)
    return (
        "\n".join(
            [
                f"RUN_DIR={shlex.quote(str(cfg.run.dir))}",
                f"CONFIG_THREADS={threads}",
                f"CONFIG_ACCELERATOR={shlex.quote(cfg.strategy.accelerator)}",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "job-env":
        try:
            sys.stdout.write(job_env(sys.argv[2:]))
        except Exception as e:  # noqa: BLE001 - the batch script stops on it with this message
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print(
            "usage: python -m orchestrator.parallel.slurm job-env [--config FILE] [--section.key value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
