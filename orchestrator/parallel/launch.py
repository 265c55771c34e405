"""Building the Fabric object, agreeing with the launcher, and the few collective helpers.

Who starts the processes decides how many there are:
  * `orchestrator train` / `python orchestrator/train.py`: Fabric starts strategy.devices processes;
  * `fabric run --devices=N ...`: torchrun has started them; Fabric's flags (accelerator, devices,
    num_nodes, strategy, precision) override the config's, and each override is printed;
  * `srun` (cluster/pretrain.slurm): Slurm has started them; devices and num_nodes come from
    the job (tasks per node, nodes), again printed when they differ from the config;
  * `torchrun` (TorchElastic: Kubernetes PyTorchJob / JobSet, SkyPilot, bare metal; docs/torchrun.md):
    its agents have started them; devices and num_nodes come from the rendezvous (processes per
    agent, agents), printed the same way. It wins over Slurm, as in Fabric: torchrun inside srun.
The resolved values are written back into the config, so `config.yaml` of the run and of every
checkpoint records what actually ran. Values that cannot be honoured stop the run with an error,
and a config the launcher changed is validated again (`fabric run --precision=16` is refused with
the same reason as `strategy.precision: 16-mixed`). `build_fabric` also applies the process-wide
device settings that must precede Fabric: strategy.matmul_precision on CUDA.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from orchestrator.devices import apply_matmul_precision
from orchestrator.parallel.strategy import build_strategy
from orchestrator.schema import ConfigError

T = TypeVar("T")

# `fabric run --strategy X` -> (strategy.name, strategy.zero_stage, offload_optimizer, offload_params)
CLI_STRATEGIES: dict[str, tuple[str, int | None, bool | None, bool | None]] = {
    "ddp": ("ddp", None, None, None),
    "fsdp": ("fsdp", None, None, None),
    "deepspeed": ("deepspeed", None, None, None),
    "deepspeed_stage_1": ("deepspeed", 1, False, False),
    "deepspeed_stage_2": ("deepspeed", 2, False, False),
    "deepspeed_stage_2_offload": ("deepspeed", 2, True, False),
    "deepspeed_stage_3": ("deepspeed", 3, False, False),
    "deepspeed_stage_3_offload": ("deepspeed", 3, True, True),
    "auto": ("auto", None, None, None),
    "single_device": ("single", None, None, None),
}
CLI_PRECISION = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
}
CLI_ACCELERATOR = {"cpu": "cpu", "cuda": "cuda", "gpu": "cuda", "auto": "auto"}
_LT_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "precision")

_current: Fabric | None = None  # the run's Fabric, for fail_fast


def launched_by_fabric_cli() -> bool:
    """`fabric run` has already created the processes and passes its settings in LT_* variables."""
    return os.environ.get("LT_CLI_USED", "0") == "1"


def in_slurm_step() -> bool:
    """Started by `srun` inside a Slurm allocation (Slurm created the processes)."""
    return SLURMEnvironment.detect()


def launched_by_torchrun() -> bool:
    """Started by a torchrun agent (TORCHELASTIC_RUN_ID ...). `fabric run` is torchrun underneath;
    callers check launched_by_fabric_cli() first."""
    return TorchElasticEnvironment.detect()


def torchrun_restart() -> tuple[int, int] | None:
    """(restart, max restarts) of a worker group that a torchrun agent restarted, else None."""
    restart = _env_int("TORCHELASTIC_RESTART_COUNT")
    if not launched_by_torchrun() or restart == 0:
        return None
    return restart, _env_int("TORCHELASTIC_MAX_RESTARTS")


def _env_int(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


def resolve_launch(cfg) -> list[str]:
    """Make cfg.strategy match how the processes were launched; returns the overrides to report."""
    s = cfg.strategy
    notes: list[str] = []

    def override(key: str, value: Any, source: str) -> None:
        old = getattr(s, key)
        if value != old:
            notes.append(f"{source} sets strategy.{key}={value} (the config says {old})")
            setattr(s, key, value)

    if launched_by_fabric_cli():
        cli = {k: os.environ.get(f"LT_{k.upper()}") for k in _LT_KEYS}
        if cli["accelerator"] is not None:
            if cli["accelerator"] not in CLI_ACCELERATOR:
                raise ConfigError(
                    f"fabric run --accelerator={cli['accelerator']} is not supported (cpu or cuda)"
                )
            override(
                "accelerator",
                CLI_ACCELERATOR[cli["accelerator"]],
                f"fabric run --accelerator={cli['accelerator']}",
            )
        if cli["strategy"] is not None:
            if cli["strategy"] not in CLI_STRATEGIES:
                raise ConfigError(
                    f"fabric run --strategy={cli['strategy']} is not supported by this trainer; use one of "
                    f"{', '.join(CLI_STRATEGIES)} (or set strategy.name in the config)"
                )
            name, stage, off_opt, off_par = CLI_STRATEGIES[cli["strategy"]]
            source = f"fabric run --strategy={cli['strategy']}"
            override("name", name, source)
            for key, value in (
                ("zero_stage", stage),
                ("offload_optimizer", off_opt),
                ("offload_params", off_par),
            ):
                if value is not None:
                    override(key, value, source)
        if cli["precision"] is not None:
            if cli["precision"] not in CLI_PRECISION:
                raise ConfigError(
                    f"fabric run --precision={cli['precision']} is not supported; use one of {', '.join(CLI_PRECISION)}"
                )
            override(
                "precision",
                CLI_PRECISION[cli["precision"]],
                f"fabric run --precision={cli['precision']}",
            )
        # The processes exist: their count is a fact (torchrun's LOCAL_WORLD_SIZE / number of nodes).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _parse_devices(cli["devices"])
        override("devices", local, f"fabric run --devices={cli['devices']}")
        override(
            "num_nodes", int(cli["num_nodes"] or 1), f"fabric run --num-nodes={cli['num_nodes']}"
        )
        # Fabric would compare its LT_* variables with our (resolved, equivalent) objects and refuse.
        for key in _LT_KEYS:
            os.environ.pop(f"LT_{key.upper()}", None)
    elif launched_by_torchrun():
        # The rendezvous decided: LOCAL_WORLD_SIZE workers on this agent, GROUP_WORLD_SIZE agents
        # (with --nnodes MIN:MAX, the agents that joined this round).
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        world = int(os.environ["WORLD_SIZE"])
        nodes = int(os.environ.get("GROUP_WORLD_SIZE") or max(1, world // local))
        if local * nodes != world:
            raise ConfigError(
                f"torchrun started {world} workers on {nodes} nodes, which is not {local} per node: "
                "give every agent the same --nproc-per-node"
            )
        override("devices", local, f"torchrun (--nproc-per-node={local})")
        override("num_nodes", nodes, f"torchrun (--nnodes={nodes})")
    elif in_slurm_step():
        nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
        tasks = int(os.environ["SLURM_NTASKS"])
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
        if per_node.isdigit():
            local = int(per_node)
        elif tasks % nodes == 0:
            local = tasks // nodes
        else:
            raise ConfigError(
                f"Slurm started {tasks} tasks on {nodes} nodes, which is not the same number per node: "
                "use --ntasks-per-node (one task per GPU)"
            )
        override("devices", local, f"Slurm (--ntasks-per-node={local})")
        override("num_nodes", nodes, f"Slurm (--nodes={nodes})")
    if s.name == "single" and s.devices * s.num_nodes > 1:
        raise ConfigError(
            f"strategy.name=single runs one process, but {s.devices * s.num_nodes} were requested or launched: "
            "use ddp, fsdp or deepspeed"
        )
    if notes:  # the launcher changed the config after load_config validated it
        cfg.validate()
    return notes


def _parse_devices(devices: str | None) -> int:
    if devices is None or devices == "auto":
        return 1
    if "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return int(devices) if devices.lstrip("-").isdigit() and int(devices) > 0 else 1


def resolve_accelerator(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "strategy.accelerator=cuda but no CUDA GPU is visible (use cpu, or check CUDA_VISIBLE_DEVICES)"
        )
    return requested


def build_fabric(cfg, loggers: list | None = None) -> Fabric:
    """A Fabric for cfg.strategy, agreeing with `fabric run` / Slurm (see the module docstring)."""

    global _current
    notes = resolve_launch(cfg)
    s = cfg.strategy
    accelerator = resolve_accelerator(s.accelerator)
    # Before Fabric (whose CUDA set-up warns about fp32 matmuls without TF32); CPU: untouched.
    apply_matmul_precision(accelerator, s.matmul_precision)
    fabric = _Fabric(
        accelerator=accelerator,
        strategy=build_strategy(cfg, accelerator),
        devices=1 if s.name == "single" else s.devices,
        num_nodes=s.num_nodes,
        precision=s.precision,
        loggers=loggers,
    )
    _current = fabric
    for note in notes:
        if fabric.global_rank == 0:
            print(f"note: {note}", flush=True)
    if (
        launched_by_torchrun()
        and fabric.global_rank == 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and _env_int("TORCHELASTIC_MAX_RESTARTS") > 0
    ):
        # Measured: a restarted worker read a dead worker's address from the agents' store and
        # failed to connect, costing a restart (pytorch/pytorch#135712).
        print(
            "warning: torchrun shares its rendezvous store with the workers: after a restart they "
            "can read the previous workers' addresses and fail again; set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the agents (docs/torchrun.md)",
            flush=True,
        )
    restart = torchrun_restart()
    if restart is not None and fabric.local_rank == 0:
        # Per node (a pod's own log): an agent counts only the restarts its own workers' failures
        # caused; it also restarts them, uncounted, when another node's workers failed.
        print(
            f"torchrun restart {restart[0]} of at most {restart[1]} (node {fabric.node_rank}): "
            "every worker of the job was restarted",
            flush=True,
        )
    return fabric


class _Fabric(Fabric):
    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print on global rank 0 only (Fabric's prints once per node: N copies in a multi-node job log)."""
        if self.global_rank == 0:
            print(*args, **kwargs)


def on_rank_zero(fabric: Fabric, fn: Callable[[], T]) -> T | None:
    """Run `fn` on global rank 0 only (file writes, prints, logging); the one place that decides."""
    if fabric.is_global_zero:
        return fn()
    return None


def gather_object(fabric: Fabric, obj: Any, group=None) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (of `group`: default all)."""
    if fabric.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# glibc's mallopt parameter: allocations of at least this many bytes are served by mmap.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_host_allocator() -> None:
    """glibc: serve every allocation of 1 MiB or more from mmap and return it to the system when
    freed, as MALLOC_MMAP_THRESHOLD_=1048576 would (which, when set, wins).

    By default glibc raises that threshold, up to 32 MiB, each time such a block is freed; from
    then on training's large temporaries come from the heap, fragment it, and a rank's resident
    memory ends far above what it holds (measured at TinyLlama-1.1B under FSDP2 on 2 CPU
    processes: 11.7 GiB per rank with the defaults; benchmarks/RESULTS.md). Per process, so every
    launcher (Fabric, srun, torchrun) gets it; a no-op where libc is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc (musl, ...): its allocator has no such threshold to pin


def threads_per_process(devices: int) -> None:
    """On CPU, N processes on C cores each get C/N threads unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, devices)))


# --------------------------------------------------------------------------------------------
# A failing or vanished rank ends the job
# --------------------------------------------------------------------------------------------

_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl",
    "gloo",
    "socket",
    "watchdog",
    "dist_backend",
    "distbackenderror",
    "connection refused",
)


def is_peer_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or (
        isinstance(exc, RuntimeError) and any(k in text for k in _PEER_LOST)
    )


def fail_fast(exc: BaseException, timeout_s: int | None = None) -> None:
    """Report a fatal error on this rank clearly, stop the processes this one launched, and exit
    now (os._exit: never wait in atexit handlers or process-group teardown for peers that are gone).
    In a single-process run it returns and the caller re-raises. An error with an `exit_code`
    (an expected failure, e.g. checkpoint/remote.py's StoreUnavailableError) is reported by its
    message alone and exits with that code."""
    launcher = (
        getattr(getattr(_current, "strategy", None), "launcher", None)
        if _current is not None
        else None
    )
    distributed = (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ) or bool(getattr(launcher, "procs", None))
    if not distributed:
        return  # one process: the caller re-raises, with the usual traceback
    rank, world = process_rank()
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    code = getattr(exc, "exit_code", None)
    if code is not None:
        message = (
            f"error: rank {rank}/{world}: {exc}\nerror: stopping the whole job (exit code {code})"
        )
    elif is_peer_failure(exc):
        bound = f" (collectives wait at most strategy.timeout_s={timeout_s}s)" if timeout_s else ""
        message = (
            f"error: rank {rank}/{world} lost contact with another rank: {type(exc).__name__}: {first_line[:300]}\n"
            f"error: a rank crashed, was killed, or its node failed{bound}; the first error is in that rank's "
            "output. Stopping the whole job; it resumes from the latest checkpoint when restarted."
        )
    else:
        traceback.print_exception(exc)
        message = f"error: rank {rank}/{world} failed: {type(exc).__name__}: {first_line[:500]}; stopping the whole job"
    print(message, file=sys.stderr, flush=True)
    _kill_launched_children()
    sys.stdout.flush()
    os._exit(1 if code is None else code)


def process_rank() -> tuple[int | str, int | str]:
    """This process's global rank and the world size: the process group's (every launcher, also
    Fabric's own, which sets no RANK), else the launcher's variables (before the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    return rank, world


def _kill_launched_children() -> None:
    """Rank 0 of a Fabric-launched run started the other local ranks: do not leave them behind."""
    launcher = (
        getattr(getattr(_current, "strategy", None), "launcher", None)
        if _current is not None
        else None
    )
    for proc in getattr(launcher, "procs", []) or []:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        except OSError:
            pass
