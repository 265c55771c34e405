"""torchrun (TorchElastic) as the launcher: Kubernetes PyTorchJob / JobSet, SkyPilot, bare metal.

Two torchrun agents on loopback are two "nodes" of one CPU worker each, meeting through a c10d
rendezvous, as `docs/torchrun.md` starts them:
    ranks and sizes come from the rendezvous, and the overrides of the config are printed;
    a worker SIGKILLed before any checkpoint and another after one: the agents restart every
    worker, which start over / resume, and the job ends with the per-step losses, batches and
    final weights of an uninterrupted run, bitwise;
    SIGTERM to one agent (a Kubernetes eviction) saves a checkpoint before the workers exit; a
    replacement agent rejoins and the job ends as the uninterrupted run.
The environment alone (what each launcher sets, and which one wins) is a unit test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.layout import STATE_NAME, latest_checkpoint
from tests.training import REPO_ROOT, TINY, data_args, train

STEPS = 12
# TINY says 2 devices on 1 node: torchrun's 2 nodes x 1 worker override both, with a note.
ARGS = ["--train.max_steps", str(STEPS), "--eval.interval", "0", "--checkpoint.keep_last", "2",
        "--logging.batch_hashes", "batch"]  # fmt: skip
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def agent_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for key in [k for k in env if k.startswith(("SLURM_", "LT_", "MASTER_", "TORCHELASTIC_"))]:
        env.pop(key)  # never mistake the test machine for a Slurm job or a launcher's child
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(key, None)
    # A fresh store per rendezvous round (docs/torchrun.md): the shared one keeps the previous
    # round's worker addresses (pytorch/pytorch#135712).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d ... -m orchestrator train`: one
    agent per "node", each with its own log. Agent 0 hosts the rendezvous store (is_host), as the
    master pod of a PyTorchJob does, so that agent 1 can be evicted and replaced."""

    def __init__(self, run_dir, sample_data, *extra):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        endpoint = f"127.0.0.1:{free_port()}"
        self.train_args = [*TINY, *data_args(sample_data), "--run.dir", str(run_dir), *ARGS, *extra]
        self.rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "2",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                     "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]  # fmt: skip
        self.agents = [self.start(0), self.start(1)]

    def start(self, node, replacement=False):
        log = (
            self.run_dir.parent / f"{self.run_dir.name}-agent{node}{'b' if replacement else ''}.log"
        )
        cmd = [TORCHRUN, *self.rdzv, "--rdzv-conf", f"is_host={int(node == 0)}",
               "-m", "orchestrator", "train", *self.train_args]  # fmt: skip
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=agent_env(), stdout=out, stderr=subprocess.STDOUT
            )
        proc.log = log
        return proc

    def worker(self, node):
        """The training process that agent `node` runs now (its only child)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = children(self.agents[node].pid)
            if pids:
                return pids[0]
            time.sleep(0.01)
        raise TimeoutError(f"agent {node} started no worker:\n{self.logs()}")

    def wait(self, timeout=300):
        for agent in self.agents:
            try:
                agent.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the job did not finish:\n{self.logs()}") from None
        return [a.returncode for a in self.agents]

    def kill(self):
        """Clean up after a failure: workers run in sessions of their own, outliving a killed agent."""
        for agent in self.agents:
            if agent.poll() is None:
                for pid in children(agent.pid):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                agent.kill()
                agent.wait()

    def logs(self):
        return "\n".join(f"--- {a.log.name}\n{a.log.read_text()[-5000:]}" for a in self.agents)


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()[: text.count("\n")]  # not a line still being written
    return [r for r in map(json.loads, lines) if "loss" in r]


def last_record_per_step(run_dir):
    return list({r["step"]: r for r in records(run_dir)}.values())


def published(run_dir):
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if not p.name.endswith(".partial"))


def wait_for(predicate, job, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert all(a.poll() is None for a in job.agents), f"ended before {what}:\n{job.logs()}"
        time.sleep(0.005)
    raise TimeoutError(f"no {what}:\n{job.logs()}")


def assert_same_run(got_dir, want_dir, logs):
    got, want = last_record_per_step(got_dir), last_record_per_step(want_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), logs
    assert [r["loss"] for r in got] == [r["loss"] for r in want], logs
    assert [r["batch_hashes"] for r in got] == [r["batch_hashes"] for r in want]
    a, b = (
        torch.load(latest_checkpoint(Path(d) / "checkpoints") / STATE_NAME, weights_only=True)
        for d in (got_dir, want_dir)
    )
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def uninterrupted(sample_data, tmp_path_factory):
    """The same run in one go, started by Fabric (2 processes on 1 node): on CPU the data order
    does not depend on how the 2 ranks are spread over nodes."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir, sample_data, *ARGS, "--checkpoint.interval", "1")
    return run_dir


@pytest.mark.slow
def test_elastic_restarts_resume_from_the_newest_checkpoint(sample_data, uninterrupted, tmp_path):
    """`--max-restarts 2`: a worker SIGKILLed before any checkpoint, then again after one; the
    agents restart every worker both times and the job ends as if nothing had happened."""
    run_dir = tmp_path / "run"
    job = Job(run_dir, sample_data, "--checkpoint.interval", "1")
    try:
        # 1. A worker dies before any checkpoint (its process group is up: config.yaml is written).
        wait_for(lambda: (run_dir / "config.yaml").is_file(), job, "start")
        os.kill(job.worker(1), signal.SIGKILL)
        assert published(run_dir) == [] and records(run_dir) == []  # nothing to resume from
        # 2. Once the restarted job has published a checkpoint, a worker dies again.
        wait_for(lambda: published(run_dir), job, "checkpoint")
        before = len(records(run_dir))
        os.kill(job.worker(1), signal.SIGKILL)
        killed_at = time.perf_counter()
        wait_for(lambda: len(records(run_dir)) > before, job, "step after the restart")
        first_step_s = time.perf_counter() - killed_at
        codes = job.wait()
    finally:
        job.kill()
    logs = job.logs()
    assert codes == [0, 0], logs
    print(f"SIGKILL of a worker -> first step of the resumed job: {first_step_s:.1f}s")

    out = "".join(a.log.read_text() for a in job.agents)  # rank 0's lines are in one of them
    assert "note: torchrun (--nproc-per-node=1) sets strategy.devices=1 (the config says 2)" in out
    assert "note: torchrun (--nnodes=2) sets strategy.num_nodes=2 (the config says 1)" in out
    assert out.count("2 process(es) on cpu") == 2, logs  # both restarts trained (not the start)
    log1 = job.agents[1].log.read_text()  # agent 1's worker failed twice: restarts 1 and 2
    assert "torchrun restart 1 of at most 2" in log1 and "torchrun restart 2 of at most 2" in log1
    # The restart after the first kill started at step 0; the one after the second resumed.
    assert out.count("Resumed from ") == 1, logs
    resumed = int(out.split("Resumed from ")[1].split(" at step ")[1].split()[0])
    assert 1 <= resumed < STEPS, logs
    # The resumed job's first step is the one after its checkpoint.
    assert records(run_dir)[before]["step"] == resumed + 1
    assert_same_run(run_dir, uninterrupted, logs)


@pytest.mark.slow
def test_sigterm_to_an_agent_saves_then_a_replacement_resumes(sample_data, uninterrupted, tmp_path):
    """A Kubernetes eviction: SIGTERM to one agent (the pod's PID 1). It forwards the signal to
    its worker, the ranks agree to stop after the same step and write a checkpoint (none is due:
    checkpoint.interval 0), and exit 143; the other agent restarts its worker and waits in the
    rendezvous for a replacement, which joins and the job resumes."""
    run_dir = tmp_path / "run"
    job = Job(run_dir, sample_data, "--checkpoint.interval", "0")
    try:
        # SIGTERM is turned into a stop with a checkpoint once training runs.
        wait_for(lambda: records(run_dir), job, "first step")
        job.agents[1].send_signal(signal.SIGTERM)
        job.agents[1].wait(timeout=60)
        stopped = published(run_dir)
        log1 = job.agents[1].log.read_text()
        job.agents[1] = job.start(1, replacement=True)  # the pod, recreated
        codes = job.wait()
    finally:
        job.kill()
    logs = job.logs() + f"\n--- evicted agent\n{log1[-5000:]}"
    assert codes == [0, 0], logs
    assert "received SIGTERM: stopping after the current step with a checkpoint" in log1, logs
    out = log1 + "".join(a.log.read_text() for a in job.agents)
    step = int(out.split("Stopped by SIGTERM after step ")[1].split("/")[0])
    assert 1 <= step < STEPS and stopped == [f"step-{step:08d}"], (stopped, logs)
    assert f"Resumed from {run_dir / 'checkpoints' / stopped[0]} at step {step}" in out, logs
    assert_same_run(run_dir, uninterrupted, logs)


def test_torchrun_environment_sets_devices_and_nodes(monkeypatch):
    """What a torchrun agent sets decides devices and num_nodes (printed), also inside a Slurm
    job (torchrun under srun, one task per node); unequal workers per node stop the run."""
    from orchestrator.config import load_config
    from orchestrator.parallel.launch import resolve_launch, torchrun_restart
    from orchestrator.schema import ConfigError

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LT_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    for key, value in dict(
        TORCHELASTIC_RUN_ID="job", LOCAL_WORLD_SIZE="8", WORLD_SIZE="32", GROUP_WORLD_SIZE="4",
        RANK="9", LOCAL_RANK="1", GROUP_RANK="1", TORCHELASTIC_RESTART_COUNT="1",
        TORCHELASTIC_MAX_RESTARTS="3",
        SLURM_NTASKS="4", SLURM_NNODES="4", SLURM_JOB_NAME="pretrain", SLURM_JOB_ID="7",
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    cfg = load_config(["--strategy.devices", "2"])
    notes = resolve_launch(cfg)
    assert (cfg.strategy.devices, cfg.strategy.num_nodes) == (8, 4)
    assert notes == [
        "torchrun (--nproc-per-node=8) sets strategy.devices=8 (the config says 2)",
        "torchrun (--nnodes=4) sets strategy.num_nodes=4 (the config says 1)",
    ]
    assert torchrun_restart() == (1, 3)

    monkeypatch.setenv("WORLD_SIZE", "30")  # agents given different --nproc-per-node
    with pytest.raises(ConfigError, match="give every agent the same --nproc-per-node"):
        resolve_launch(load_config([]))
