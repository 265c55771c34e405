#!/usr/bin/env python3
"""A real Slurm cluster on this machine: munged, slurmctld and two slurmd's (simulated nodes n1, n2).

For the test suite (tests/orchestrator/parallel/test_slurm.py) and for anyone who wants to try cluster/pretrain.slurm
without a cluster. Debian/Ubuntu packages (slurmctld slurmd slurm-client munge), run as root,
no systemd or cgroups needed.

    sudo python3 cluster/local_slurm.py up          # prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/orchestrator-slurm/slurm.conf
    sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 cluster/pretrain.slurm \\
        --config configs/quickstart.yaml
    squeue; scontrol show job JOBID
    sudo python3 cluster/local_slurm.py down        # stops the daemons `up` started, nothing else

Everything lives in one directory (config, state, spool, logs, pid files); the daemons get their
own munge socket and free TCP ports, so the cluster does not touch (or collide with) another
Slurm or munge on the machine. Requeued jobs restart after ~10 s instead of Slurm's default 120 s
(`cred_expire=10`). The node names n1 and n2 must resolve: `up` adds `127.0.0.1 n1 n2` to
/etc/hosts when they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DEFAULT_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/orchestrator-slurm"))
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local cluster; the message says why."""


def _run(
    cmd: list[str], timeout: float = 60, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def _binaries_present() -> bool:
    return all(
        shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged")
    )


def ensure_installed(allow_install: bool = True) -> None:
    """The Debian packages, installed with apt-get when missing (root only); SlurmUnavailable if not possible."""
    if _binaries_present() and MUNGE_KEY.is_file():
        return
    if not allow_install:
        raise SlurmUnavailable(
            "Slurm/munge are not installed (apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            "Slurm/munge are not installed and there is no apt-get to install them"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:  # stale or missing package lists: refresh once
        subprocess.run(
            ["apt-get", "update", "-q"], capture_output=True, text=True, timeout=600, env=env
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 or not _binaries_present():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SlurmUnavailable(
            f"could not install {' '.join(PACKAGES)} with apt-get: {' | '.join(tail)}"
        )
    if not MUNGE_KEY.is_file():
        _run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=False)
        if not MUNGE_KEY.is_file():
            raise SlurmUnavailable(f"{MUNGE_KEY} is missing (create it with mungekey --create)")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited daemon whose parent (often PID 1 in a container) has not reaped it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalSlurm:
    """One local cluster rooted in `root` (a directory it owns)."""

    def __init__(
        self,
        root: Path | str = DEFAULT_DIR,
        nodes: int = 2,
        cpus_per_node: int | None = None,
        memory_mb: int = 8000,
    ) -> None:
        self.root = Path(root).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node or max(2, os.cpu_count() or 2)
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.state_file = self.root / "daemons.json"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, scontrol) and the jobs they submit."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "the local Slurm cluster runs its daemons as root (SlurmUser=root)"
            )
        ensure_installed()
        if self.running():
            return self
        self.stop()  # leftovers of an earlier `up` in the same directory (only its own daemons)
        for sub in ("state", "munge", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._ensure_hosts()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
        started: dict[str, int] = {}
        try:
            started["munged"] = self._start_munged()
            started["slurmctld"] = self._start_daemon(
                ["slurmctld", "-f", str(self.conf), "-i"], self.root / "slurmctld.pid", "slurmctld"
            )
            for node in self.nodes:
                started[f"slurmd-{node}"] = self._start_daemon(
                    ["slurmd", "-f", str(self.conf), "-N", node],
                    self.root / f"slurmd-{node}.pid",
                    f"slurmd {node}",
                )
        finally:
            self.state_file.write_text(json.dumps(started))
        self._wait_nodes_idle(timeout)
        return self

    def running(self) -> bool:
        pids = self._started()
        if not pids or not all(_pid_alive(p) for p in pids.values()):
            return False
        try:
            return self._node_states() and all(
                s.startswith("idle") or s.startswith("alloc") or s.startswith("mix")
                for s in self._node_states().values()
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def stop(self) -> None:
        """Stop the daemons this directory's `start` launched (by pid) — never any other process."""
        pids = self._started()
        order = [k for k in pids if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            pid = pids.get(name)
            if pid and _pid_alive(pid) and self._is_ours(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        for name in order:
            pid = pids.get(name)
            while pid and _pid_alive(pid) and self._is_ours(pid) and time.time() < deadline:
                time.sleep(0.1)
            if pid and _pid_alive(pid) and self._is_ours(pid):
                os.kill(pid, signal.SIGKILL)
        if self.state_file.exists():
            self.state_file.unlink()

    def _started(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def _is_ours(self, pid: int) -> bool:
        """The pid still runs one of our daemons with our config (pids are reused)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return False
        return str(self.conf) in cmdline or str(self.munge_socket) in cmdline

    # -- daemons ---------------------------------------------------------------------------

    def _start_munged(self) -> int:
        pid_file = self.root / "munge" / "munged.pid"
        cmd = [
            "munged",
            "--force",
            f"--socket={self.munge_socket}",
            f"--pid-file={pid_file}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            f"--key-file={MUNGE_KEY}",
        ]
        return self._start_daemon(cmd, pid_file, "munged")

    def _start_daemon(self, cmd: list[str], pid_file: Path, name: str) -> int:
        pid_file.unlink(missing_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name} did not start: {proc.stderr.strip() or proc.stdout.strip()} "
                f"(log in {self.root / 'log'})"
            )
        deadline = time.time() + 20
        while time.time() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip().isdigit():
                pid = int(pid_file.read_text().strip())
                if _pid_alive(pid):
                    return pid
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not write {pid_file} (log in {self.root / 'log'})")

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "# Written by cluster/local_slurm.py: a two-node Slurm cluster on one machine (for tests).",
            "ClusterName=orchestrator-local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SchedulerParameters=bf_interval=5,sched_interval=5",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MaxJobCount=1000",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def _ensure_hosts(self) -> None:
        missing = []
        for node in self.nodes:
            try:
                socket.gethostbyname(node)
            except OSError:
                missing.append(node)
        if missing:
            try:
                with open("/etc/hosts", "a") as f:
                    f.write(
                        f"127.0.0.1 {' '.join(missing)}  # added by orchestrator cluster/local_slurm.py\n"
                    )
            except OSError as e:
                raise SlurmUnavailable(
                    f"node names {missing} do not resolve and /etc/hosts is not writable ({e})"
                ) from e

    def _node_states(self) -> dict[str, str]:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, timeout=15).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            try:
                states = self._node_states()
            except (RuntimeError, subprocess.TimeoutExpired):
                states = {}
            if states and all(states.get(n, "").startswith("idle") for n in self.nodes):
                return
            for node, state in states.items():
                if state.startswith(("down", "drain")):
                    _run(
                        ["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                        env=self.env,
                        check=False,
                    )
            time.sleep(0.5)
        raise RuntimeError(
            f"nodes did not become idle within {timeout:.0f}s: {states} (logs in {self.root / 'log'})"
        )

    # -- jobs ------------------------------------------------------------------------------

    def sbatch(
        self, args: list[str], env: dict | None = None, cwd: str | Path | None = None
    ) -> str:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**self.env, **(env or {})},
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} when Slurm forgot it."""
        proc = _run(
            ["scontrol", "-o", "show", "job", job_id], env=self.env, check=False, timeout=15
        )
        if proc.returncode != 0:
            return {}
        fields = {}
        for item in proc.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    def wait(
        self,
        job_id: str,
        until: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
        ),
        timeout: float = 300,
        poll: float = 0.5,
    ) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not in {until} after {timeout:.0f}s: {info.get('JobState')} {info}"
        )

    def cancel(self, job_id: str, signal_name: str | None = None) -> None:
        args = ["scancel", *([f"--signal={signal_name}"] if signal_name else []), job_id]
        _run(args, env=self.env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--dir", default=str(DEFAULT_DIR), help="directory for config, state and logs"
    )
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.dir, nodes=args.nodes)
    try:
        if args.action == "up":
            started = time.perf_counter()
            cluster.start()
            print(
                f"Slurm is up ({', '.join(cluster.nodes)}) in {time.perf_counter() - started:.1f}s; use it with:"
            )
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.stop()
            print(f"stopped the daemons started from {cluster.root}")
        else:
            print("running" if cluster.running() else "not running")
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
