"""cluster/pretrain.slurm on a real Slurm cluster (two simulated nodes on this machine, CPU mode).

The cluster comes from cluster/local_slurm.py: Debian's slurmctld/slurmd/munge, installed with
apt-get when missing. These tests skip (saying why) only where that is impossible: not root, or
no package access.

    sbatch (2 nodes x 1 task) trains the quickstart config;
    the same job, signalled mid-run (scancel --signal=USR1), saves, requeues itself, resumes and
    ends with the same losses and the same batches, each consumed exactly once;
    a killed rank fails the job within seconds; a hung rank within strategy.timeout_s.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, local_slurm

pytestmark = pytest.mark.slow

STEPS = 12
KILL_BOUND_S = 15  # SIGKILLed rank -> job FAILED (measured ~1 s)
HANG_TIMEOUT_S = 10  # strategy.timeout_s for the hung-rank job
HANG_BOUND_S = HANG_TIMEOUT_S + 20  # SIGSTOPped rank -> job FAILED (measured ~timeout + 1 s)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    yield from local_slurm(tmp_path_factory)


def submit(slurm, run_dir, sample_data, *overrides):
    """sbatch cluster/pretrain.slurm in its documented CPU mode: 2 nodes x 1 task, no GPUs."""
    tokens, tokenizer = sample_data
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
        f"--output={run_dir}/slurm-%j.out",
        "cluster/pretrain.slurm", "--config", "configs/quickstart.yaml",
        "--data.dir", str(tokens), "--data.tokenizer", str(tokenizer), "--run.dir", str(run_dir),
        "--eval.max_batches", "2", *overrides,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LT_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO_ROOT))
    return slurm.sbatch(args, env=env, cwd=REPO_ROOT)


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def wait_for_step(run_dir, step, job, slurm, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in records(run_dir)):
            return
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", None), (
            f"job {job} is {state}: {job_log(run_dir, job)}"
        )
        time.sleep(0.3)
    raise TimeoutError(f"job {job} did not reach step {step}: {job_log(run_dir, job)}")


def job_log(run_dir, job):
    logs = [Path(run_dir) / "logs" / f"job-{job}.log", *Path(run_dir).glob(f"slurm-{job}.out")]
    return "\n".join(p.read_text()[-4000:] for p in logs if p.is_file())


def rank_pid(job, rank):
    """The training process of `rank` in Slurm job `job` (all simulated nodes are this machine)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in env
            and f"SLURM_PROCID={rank}".encode() in env
            and b"orchestrator" in cmd
            and b"train" in cmd
        ):
            return int(entry.name)
    raise LookupError(f"no training process of rank {rank} in job {job}")


def test_sbatch_trains_requeues_on_usr1_and_resumes_exactly(slurm, sample_data, tmp_path):
    schedule = [
        "--train.max_steps",
        str(STEPS),
        "--eval.interval",
        "6",
        "--checkpoint.interval",
        "6",
    ]
    straight_dir, signalled_dir = tmp_path / "straight", tmp_path / "signalled"
    straight = submit(slurm, straight_dir, sample_data, *schedule)
    signalled = submit(slurm, signalled_dir, sample_data, *schedule)

    wait_for_step(signalled_dir, 3, signalled, slurm)
    signalled_at = time.perf_counter()
    slurm.cancel(
        signalled, signal_name="USR1"
    )  # what `#SBATCH --signal=USR1@300` sends before the time limit
    info = slurm.wait(signalled, timeout=400)
    finished_in = time.perf_counter() - signalled_at
    log = job_log(signalled_dir, signalled)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, log)
    straight_info = slurm.wait(straight, timeout=400)
    assert straight_info["JobState"] == "COMPLETED", job_log(straight_dir, straight)
    print(f"signalled job: requeued, resumed and finished {finished_in:.0f}s after SIGUSR1")

    # It saved at the step it was at, requeued itself, and the restart resumed from that checkpoint.
    assert "received SIGUSR1" in log and f"requeued Slurm job {signalled}" in log
    assert (
        "restart 0" in log and "restart 1" in log
    )  # one log per job id, appended across the requeue
    stopped_at = int(log.split("Stopped by SIGUSR1 after step ")[1].split("/")[0])
    assert 3 <= stopped_at < STEPS
    assert f"Resumed from {signalled_dir / 'checkpoints' / f'step-{stopped_at:08d}'}" in log

    a, b = records(straight_dir), records(signalled_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # every step exactly once
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bitwise the uninterrupted run
    assert [r["batch_hashes"] for r in b] == [r["batch_hashes"] for r in a]  # the same batches...
    hashes = [h for r in b for h in r["batch_hashes"]]
    assert (
        len(hashes) == len(set(hashes)) == STEPS * 2
    )  # ...each consumed once (2 ranks x 1 micro-batch)
    summary_a = json.loads((straight_dir / "summary.json").read_text())
    summary_b = json.loads((signalled_dir / "summary.json").read_text())
    assert summary_b["final_val_loss"] == summary_a["final_val_loss"]
    assert summary_b["steps"] == STEPS


def test_a_killed_or_hung_rank_fails_the_job_within_a_bound(slurm, sample_data, tmp_path):
    endless = ["--train.max_steps", "100000", "--eval.interval", "0", "--checkpoint.interval", "0"]
    killed_dir, hung_dir = tmp_path / "killed", tmp_path / "hung"
    killed = submit(slurm, killed_dir, sample_data, *endless)
    hung = submit(
        slurm, hung_dir, sample_data, *endless, "--strategy.timeout_s", str(HANG_TIMEOUT_S)
    )
    stopped_pid = None
    try:
        wait_for_step(killed_dir, 2, killed, slurm)
        wait_for_step(hung_dir, 2, hung, slurm)
        os.kill(rank_pid(killed, 1), signal.SIGKILL)  # a rank that dies (crash, OOM kill)
        killed_at = time.perf_counter()
        stopped_pid = rank_pid(hung, 1)
        os.kill(
            stopped_pid, signal.SIGSTOP
        )  # a rank that hangs (stuck kernel, dead node without TCP reset)
        hung_at = time.perf_counter()

        info = slurm.wait(killed, timeout=KILL_BOUND_S * 4, poll=0.2)
        killed_s = time.perf_counter() - killed_at
        info_hung = slurm.wait(hung, timeout=HANG_BOUND_S * 4, poll=0.2)
        hung_s = time.perf_counter() - hung_at
    finally:
        for job in (killed, hung):
            if slurm.job(job).get("JobState") in ("RUNNING", "PENDING"):
                slurm.cancel(job)
        if stopped_pid is not None:
            try:
                os.kill(stopped_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    print(
        f"killed rank: job {info['JobState']} after {killed_s:.1f}s; "
        f"hung rank (timeout_s={HANG_TIMEOUT_S}): job {info_hung['JobState']} after {hung_s:.1f}s"
    )
    assert info["JobState"] == "FAILED" and killed_s < KILL_BOUND_S, (info, killed_s)
    assert "lost contact with another rank" in job_log(killed_dir, killed)
    assert info_hung["JobState"] == "FAILED" and hung_s < HANG_BOUND_S, (info_hung, hung_s)
    hung_log = job_log(hung_dir, hung)
    assert "lost contact with another rank" in hung_log and "Timed out" in hung_log
    assert f"strategy.timeout_s={HANG_TIMEOUT_S}" in hung_log


class _OneProcess:
    """Just enough of a Fabric for the signal and requeue helpers in one process."""

    world_size, global_rank, is_global_zero, device = 1, 0, True, "cpu"

    def broadcast(self, obj):
        return obj


def test_signals_become_a_flag_and_a_second_sigterm_stops_at_once():
    from orchestrator.parallel.slurm import TERM, USR1, StopSignals

    stop = StopSignals()
    try:
        assert stop.agreed(_OneProcess()) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # handlers run in the main thread, between bytecodes
        time.sleep(0.01)
        assert stop.agreed(_OneProcess()) == USR1
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.received == TERM
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert exit_info.value.code == 128 + signal.SIGTERM
    finally:
        stop.restore()


def test_requeue_inside_a_container_is_left_to_the_batch_script(tmp_path, monkeypatch):
    """No scontrol on PATH (pyxis, Apptainer): the trainer leaves a marker that
    cluster/pretrain.slurm turns into `scontrol requeue` on the host."""
    from orchestrator.config import load_config
    from orchestrator.parallel.slurm import USR1, finish_stop

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = load_config(["--run.dir", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    summary = finish_stop(_OneProcess(), cfg, USR1, step=5)
    assert summary["requeued"] and summary["exit_code"] == 0
    assert (tmp_path / "run" / ".requeue-4242").read_text().strip() == "4242"
    assert ".requeue-$SLURM_JOB_ID" in (REPO_ROOT / "cluster" / "pretrain.slurm").read_text()
