"""Studies as one command: a grid (and/or a ladder of sizes) of ordinary training runs.

    orchestrator sweep --config BASE.yaml --study-dir runs/study-lr \\
        --grid optimizer.lr=1e-3,3e-3,1e-2 [--ladder llama-20m,llama-60m --tokens-per-param 20] \\
        [--executor local|slurm] [--parallel N] [--match-params] [--dry-run] [--wait]

Each point is one `orchestrator train` run in `<study-dir>/<name>`; `<study-dir>/study.json`
records runs, statuses and attempts. Runs, ladders, `--match-params` and the executors:
docs/studies.md, "Sweeps and ladders".
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from orchestrator.config import Config, load_config
from orchestrator.schema import ConfigError, parse_overrides

STUDY_FILE = "study.json"
LR_KEY = "optimizer.lr"
LADDER_KEY = "model.name"
TERMINAL = ("finished", "diverged")  # never run again
MATCH_TOLERANCE = 0.005  # --match-params: parameter counts within 0.5% of the baseline's
# What roll_back() (orchestrator/train.py) raises when the guard gives up on a run.
DIVERGED = re.compile(
    r"step (\d+): \d+ bad steps in a row (?:after \d+ rollbacks; stopping instead of diverging"
    r"|and no checkpoint to roll back to)"
)
REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Planning: grids, ladders, names, parameter matching
# --------------------------------------------------------------------------------------------


@dataclass
class Axis:
    key: str  # dotted config key
    values: list[str]  # as given (YAML scalars, parsed by the trainer's override parser)


def parse_grid(spec: str) -> Axis:
    """`optimizer.lr=1e-3,3e-3` -> Axis('optimizer.lr', ['1e-3', '3e-3'])."""
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("--").replace("-", "_")
    if not sep or "." not in key or not values:
        raise ConfigError(
            f"--grid {spec!r} must look like SECTION.KEY=V1,V2,... (e.g. optimizer.lr=1e-3,3e-3)"
        )
    items = [v.strip() for v in values.split(",")]
    if any(not v for v in items):
        raise ConfigError(f"--grid {spec!r} has an empty value")
    if len(set(items)) != len(items):
        raise ConfigError(f"--grid {spec!r} repeats a value")
    return Axis(key, items)


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        keys.extend(dotted_keys(v, key) if isinstance(v, dict) else [key])
    return keys


def short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (`optimizer.lr` -> `lr`), the whole key where two clash;
    the ladder's model.name is `model`."""
    last = [("model" if k == LADDER_KEY else k.rsplit(".", 1)[-1]) for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def run_name(overrides: dict[str, str], short: dict[str, str]) -> str:
    """`lr=3e-3,attn_gate=headwise`: readable and filesystem-safe."""
    name = ",".join(f"{safe(short[k])}={safe(v)}" for k, v in overrides.items())
    if len(name) > 200:  # file names stop at 255 bytes
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:180]}-{digest}"
    return name


def tokens_per_step(cfg: Config) -> int:
    """Tokens of one optimizer step over all processes (what the trainer computes at start)."""
    world = cfg.strategy.devices * cfg.strategy.num_nodes
    if cfg.strategy.name == "single":
        world = 1
    return cfg.train.micro_batch_size * cfg.seq_len * cfg.gradient_accumulation(world) * world


def ladder_steps(params: int, tokens_per_param: float, step_tokens: int) -> int:
    """Optimizer steps that train tokens_per_param x params tokens (at least 1)."""
    return max(1, math.ceil(tokens_per_param * params / step_tokens))


def match_ffn_hidden(
    model: ModelConfig, target_params: int, tolerance: float = MATCH_TOLERANCE, multiple: int = 1
) -> int:
    """The model.ffn_hidden (a multiple of `multiple`) whose parameter count is closest to
    `target_params`; ConfigError when even that is not within `tolerance` (relative).

    The count is linear in ffn_hidden (3 x d_model weights per unit and block: gate, up, down),
    so the exact solution is rounded; models/config.py's ModelConfig.num_params() counts."""
    per_unit = 3 * model.d_model * model.n_layers
    exact = model.ffn_hidden + (target_params - model.num_params()) / per_unit
    candidates = {
        max(multiple, multiple * math.floor(exact / multiple)),
        max(multiple, multiple * math.ceil(exact / multiple)),
    }
    best = min(
        candidates,
        key=lambda f: (
            abs(dataclasses.replace(model, ffn_hidden=f).num_params() - target_params),
            f,
        ),
    )
    got = dataclasses.replace(model, ffn_hidden=best).num_params()
    if abs(got - target_params) > tolerance * target_params:
        raise ConfigError(
            f"model.ffn_hidden cannot match {target_params:,} parameters within {100 * tolerance:g}%: the "
            f"closest, ffn_hidden={best}, gives {got:,} ({100 * (got / target_params - 1):+.2f}%)"
        )
    return best


@dataclass
class StudyRun:
    """One run of the study, resolved."""

    name: str
    overrides: dict[str, str]
    args: list[str]  # trainer arguments (`orchestrator train ARGS`)
    run_dir: str
    max_steps: int
    tokens_per_step: int
    params: int
    ffn_hidden: int
    devices: int
    num_nodes: int
    accelerator: str
    baseline_params: int | None = None
    baseline_ffn_hidden: int | None = None
    unmatched_params: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "overrides": self.overrides,
            "run_dir": self.run_dir,
            "args": self.args,
            "max_steps": self.max_steps,
            "tokens_per_step": self.tokens_per_step,
            "params": self.params,
            "ffn_hidden": self.ffn_hidden,
            "baseline_params": self.baseline_params,
            "baseline_ffn_hidden": self.baseline_ffn_hidden,
            "unmatched_params": self.unmatched_params,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "accelerator": self.accelerator,
        }


def _resolve(name: str, args: list[str]) -> Config:
    try:
        return load_config(args)
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from e


def resolve_study(
    study_dir: Path,
    configs: list[str],
    overrides: list[str],
    grid: list[Axis],
    ladder: list[str] | None = None,
    tokens_per_param: float | None = None,
    match_params: bool = False,
    ffn_multiple: int = 1,
    preflight: bool = True,
) -> list[StudyRun]:
    """Every run of the study, its config resolved and checked; nothing is started."""
    if not grid and not ladder:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,... or a --ladder")
    if ladder and tokens_per_param is None:
        raise ConfigError("--ladder needs --tokens-per-param (e.g. 20, Chinchilla's optimum)")
    if tokens_per_param is not None and not tokens_per_param > 0:
        raise ConfigError(f"--tokens-per-param must be positive, got {tokens_per_param}")
    if not configs:
        raise ConfigError("a sweep needs a base config: --config BASE.yaml")
    base = [a for path in configs for a in ("--config", str(Path(path).absolute()))]
    common = dotted_keys(parse_overrides(overrides))
    axes = ([Axis(LADDER_KEY, list(ladder))] if ladder else []) + list(grid)
    keys = [a.key for a in axes]
    owned = {"run.dir": "the sweep gives every run its own run dir"}
    if ladder:
        owned[LADDER_KEY] = "--ladder sets it per run"
        owned["train.max_steps"] = "--ladder sets it from --tokens-per-param"
    for key in [a.key for a in grid] + common:
        if key in owned:
            raise ConfigError(f"{key} cannot be given to this sweep: {owned[key]}")
    if match_params and "model.ffn_hidden" in keys:
        raise ConfigError(
            "model.ffn_hidden cannot be a --grid key with --match-params, which sets it per run "
            "(an override of every run sets the baseline's)"
        )
    for key in set(keys):
        if keys.count(key) > 1:
            raise ConfigError(f"--grid {key} is given twice")
        if key in common:
            raise ConfigError(f"{key} is both a --grid key and an override of every run")
    short = short_keys(keys)
    baseline_of = {a.key: a.values[0] for a in grid}  # the ladder size stays the run's own
    runs: list[StudyRun] = []
    names: dict[str, dict] = {}
    said: set[str] = set()  # the preflight's notes and warnings, each printed once
    for point in itertools.product(*(a.values for a in axes)):
        values = dict(zip(keys, point, strict=True))
        name = run_name(values, short)
        if name in names:
            raise ConfigError(f"runs {names[name]} and {values} would share the run dir {name}")
        names[name] = values
        run_dir = str((study_dir / name).absolute())
        args = [*base, *overrides, *(f"--{k}={v}" for k, v in values.items())]
        cfg = _resolve(name, [*args, "--run.dir", run_dir])
        baseline_params = baseline_ffn = unmatched = None
        if match_params:
            unmatched = cfg.model.num_params()
            base_values = {**values, **baseline_of}
            base_args = [*base, *overrides, *(f"--{k}={v}" for k, v in base_values.items())]
            baseline = _resolve(f"{name} (its baseline)", [*base_args, "--run.dir", run_dir])
            baseline_params, baseline_ffn = baseline.model.num_params(), baseline.model.ffn_hidden
            if unmatched != baseline_params:
                try:
                    ffn = match_ffn_hidden(cfg.model, baseline_params, multiple=ffn_multiple)
                except ConfigError as e:
                    raise ConfigError(f"run {name!r}: {e}") from e
                args.append(f"--model.ffn_hidden={ffn}")
                cfg = _resolve(name, [*args, "--run.dir", run_dir])
        step_tokens = tokens_per_step(cfg)
        if ladder:
            steps = ladder_steps(cfg.model.num_params(), tokens_per_param, step_tokens)
            args.append(f"--train.max_steps={steps}")
            cfg = _resolve(name, [*args, "--run.dir", run_dir])
        args += ["--run.dir", run_dir]
        if any("\n" in a for a in args):
            raise ConfigError(f"run {name!r}: an argument holds a newline")
        runs.append(
            StudyRun(
                name=name,
                overrides=values,
                args=args,
                run_dir=run_dir,
                max_steps=cfg.train.max_steps,
                tokens_per_step=step_tokens,
                params=cfg.model.num_params(),
                ffn_hidden=cfg.model.ffn_hidden,
                devices=cfg.strategy.devices,
                num_nodes=cfg.strategy.num_nodes,
                accelerator=cfg.strategy.accelerator,
                baseline_params=baseline_params,
                baseline_ffn_hidden=baseline_ffn,
                unmatched_params=unmatched,
            )
        )
        if preflight:
            _preflight(name, cfg, said)
    if ladder:
        sizes: dict[int, str] = {}
        for p in runs:
            other = sizes.setdefault(p.params, p.overrides[LADDER_KEY])
            if other != p.overrides[LADDER_KEY]:
                raise ConfigError(
                    f"--ladder sizes {other} and {p.overrides[LADDER_KEY]} resolve to the same model "
                    f"({p.params:,} parameters): the base config or the overrides set the model's shape"
                )
    return runs


def _preflight(name: str, cfg: Config, said: set[str]) -> None:
    """The trainer's own checks of data, tokenizer and resume (orchestrator/training/preflight.py);
    what they print is printed once for the whole study."""
    # imported on use: the data checks load the data stack (seconds, once)
    from orchestrator.training.preflight import check_inputs

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            check_inputs(cfg)
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from e
    finally:
        for line in out.getvalue().splitlines():
            if line not in said:
                said.add(line)
                print(line, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# study.json and what a run dir says about a run
# --------------------------------------------------------------------------------------------


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def load_study(study_dir: str | Path) -> dict | None:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def save_study(study_dir: str | Path, study: dict) -> None:
    path = Path(study_dir) / STUDY_FILE
    study["updated"] = now()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(study, indent=2) + "\n")
    tmp.replace(path)


def merge_study(study_dir: Path, study: dict | None, runs: list[StudyRun], meta: dict) -> dict:
    """study.json's runs with this invocation's (resolve_study): known runs keep their status and
    attempts (and must have the same arguments), new ones are appended."""
    study = study or {"version": 1, "study_dir": str(study_dir.absolute()), "runs": []}
    study.update(meta)
    by_name = {r["name"]: r for r in study["runs"]}
    for run in runs:
        record = run.record()
        known = by_name.get(run.name)
        if known is None:
            record.update(index=len(study["runs"]), status="pending", attempts=[])
            study["runs"].append(record)
            by_name[run.name] = record
        elif known["args"] != run.args:
            changed = sorted(set(known["args"]) ^ set(run.args))
            raise ConfigError(
                f"run {run.name!r} of {study_dir / STUDY_FILE} was planned with other arguments "
                f"(differing: {' '.join(changed)}): use another --study-dir for a different study"
            )
        else:
            known.update({k: v for k, v in record.items() if k != "args"})
    return study


def run_outcome(run: dict) -> tuple[str | None, int | None]:
    """('finished', None) when the run dir's summary.json reached max_steps, ('diverged', step)
    when a log of the run holds the guard's give-up error, else (None, None)."""
    run_dir = Path(run["run_dir"])
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("steps", 0) >= run["max_steps"]:
                return "finished", None
        except (json.JSONDecodeError, OSError):
            pass
    for log in [run_dir / "train.log", *sorted((run_dir / "logs").glob("*.log"))]:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        found = DIVERGED.findall(text)
        if found:
            return "diverged", int(found[-1])
    return None, None


def settle(run: dict, outcome: str | None, step: int | None, fallback: str) -> None:
    run["status"] = outcome or fallback
    if outcome == "diverged":
        run["diverged_at_step"] = step


def slurm_task_exits(study_dir: Path, index: int) -> dict[str, int]:
    """Exit status per Slurm job of task `index`, as cluster/sweep.slurm records them."""
    exits: dict[str, int] = {}
    path = study_dir / "tasks" / f"{index}.status"
    if path.is_file():
        for line in path.read_text().splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "array" in fields and fields.get("exit", "").lstrip("-").isdigit():
                exits[fields["array"]] = int(fields["exit"])
    return exits


def slurm_queue(array_ids: set[str]) -> dict[str, str] | None:
    """State of every queued task of these array jobs ({'123_4': 'RUNNING'}); None without squeue."""
    if not array_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted(array_ids))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every job of the list has left Slurm's memory
            return {}
        return None
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())


def reconcile(study_dir: Path, study: dict) -> None:
    """Bring every non-terminal run's status up to date from its run dir (and Slurm's queue)."""
    submitted = [r for r in study["runs"] if r["status"] == "submitted" and r.get("job_id")]
    queue = slurm_queue({r["job_id"].split("_")[0] for r in submitted}) if submitted else {}
    for run in study["runs"]:
        if run["status"] in TERMINAL:
            continue
        outcome, step = run_outcome(run)
        attempt = run["attempts"][-1] if run["attempts"] else None
        if run["status"] == "submitted":
            if outcome is None and (queue is None or run["job_id"] in queue):
                continue  # still queued or running (or Slurm cannot be asked)
            code = slurm_task_exits(study_dir, run["index"]).get(run["job_id"])
            if attempt is not None and attempt.get("ended") is None:
                attempt.update(ended=now(), exit_code=code)
            fallback = "failed" if code is None or code != 0 else "stopped"
            settle(run, outcome, step, fallback)
            if attempt is not None:
                attempt["status"] = run["status"]
        elif outcome is not None:
            settle(run, outcome, step, run["status"])
        elif run["status"] == "running":  # the sweep that ran it was killed
            run["status"] = "interrupted"
            if attempt is not None and attempt.get("ended") is None:
                attempt.update(ended=None, status="interrupted")


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def study_lock(study_dir: Path):
    """One `orchestrator sweep` per study at a time (released by the OS if the process dies)."""
    lock = (study_dir / ".sweep.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(
            f"another `orchestrator sweep` is running the study {study_dir}"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def visible_gpus() -> list[str]:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES, else torch's count)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch  # imported on use: only --parallel on a machine that may have GPUs needs it

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs to pin
        return []


def device_slots(runs: list[dict], parallel: int) -> list[dict[str, str]]:
    """Environment per concurrent slot: its own GPUs (CUDA), or a share of the cores (CPU)."""
    env: list[dict[str, str]] = [{} for _ in range(parallel)]
    if parallel <= 1:
        return env
    per_run = max(r["devices"] * r["num_nodes"] for r in runs)
    gpus = [] if all(r["accelerator"] == "cpu" for r in runs) else visible_gpus()
    if gpus:
        if parallel * per_run > len(gpus):
            raise ConfigError(
                f"--parallel {parallel} runs of {per_run} GPU(s) need {parallel * per_run} GPUs, "
                f"{len(gpus)} are visible: lower --parallel or strategy.devices"
            )
        for i, slot in enumerate(env):
            slot["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * per_run : (i + 1) * per_run])
    elif "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // (parallel * per_run))
        for slot in env:
            slot["OMP_NUM_THREADS"] = str(threads)
    return env


def train_command(run: dict) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "train", *run["args"]]


def run_local(study_dir: Path, study: dict, todo: list[dict], parallel: int = 1) -> int:
    """Run `todo` as trainer subprocesses, `parallel` at a time; study.json follows every change.
    SIGTERM / SIGINT: the running trainers are asked to save and stop (SIGTERM), nothing new starts."""
    slots = device_slots(todo, parallel)
    free = list(range(parallel))
    queue = list(todo)
    running: dict[int, tuple[subprocess.Popen, dict, int, Any, float]] = {}
    stopping: list[int] = []
    total = len(todo)
    done = 0

    def stop(signum, frame) -> None:
        stopping.append(signum)
        for proc, *_ in running.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (queue and not stopping):
            while queue and free and not stopping:
                run = queue.pop(0)
                slot = free.pop(0)
                run_dir = Path(run["run_dir"])
                run_dir.mkdir(parents=True, exist_ok=True)
                log = (run_dir / "train.log").open("a")
                attempt = {
                    "attempt": len(run["attempts"]) + 1,
                    "executor": "local",
                    "started": now(),
                }
                log.write(
                    f"=== orchestrator sweep: attempt {attempt['attempt']} of run {run['name']} "
                    f"({attempt['started']})\n{shlex.join(train_command(run))}\n"
                )
                log.flush()
                env = dict(os.environ, PYTHONUNBUFFERED="1", **slots[slot])
                if parallel > 1:
                    env.pop("MASTER_PORT", None)  # each run's launcher picks a free port
                proc = subprocess.Popen(
                    train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env
                )
                attempt["pid"] = proc.pid
                run["attempts"].append(attempt)
                run["status"] = "running"
                save_study(study_dir, study)
                running[proc.pid] = (proc, run, slot, log, time.perf_counter())
                print(f"started  {run['name']} (log {run_dir / 'train.log'})", flush=True)
            for pid, (proc, run, slot, log, started) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[pid]
                free.append(slot)
                done += 1
                outcome, step = run_outcome(run)
                fallback = "stopped" if code in (0, 143, -signal.SIGTERM) else "failed"
                settle(run, outcome, step, fallback)
                run["attempts"][-1].update(ended=now(), exit_code=code, status=run["status"])
                save_study(study_dir, study)
                detail = f" at step {step}" if run["status"] == "diverged" else ""
                print(
                    f"[{done}/{total}] {run['name']}: {run['status']}{detail} "
                    f"(exit {code}, {time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
            if running:
                time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopping:
        return 128 + stopping[0]
    return 0


def sbatch_defaults(script: Path) -> list[str]:
    """pretrain.slurm's `#SBATCH` lines (nodes, tasks, GPUs, CPUs, time, signal, requeue), so that
    a sweep's tasks get what a single run gets; job name and output are the sweep's."""
    flags = []
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+(\S+)", line)
        if m and not m.group(1).startswith(("--job-name", "--output", "-J", "-o")):
            flags.append(m.group(1))
    return flags


def merge_flags(*groups: list[str]) -> list[str]:
    """sbatch flags, a later `--name[=value]` replacing an earlier one in place (the last group,
    --slurm-args, is kept as written: it may hold `--name value` pairs and short flags)."""
    *known, last = groups
    given = {f.split("=", 1)[0] for f in last if f.startswith("--")}
    merged: dict[str, str] = {}
    for flags in known:
        for flag in flags:
            merged[flag.split("=", 1)[0]] = flag
    return [f for k, f in merged.items() if k not in given] + list(last)


def cluster_script(name: str) -> Path:
    for root in (REPO_ROOT, Path.cwd()):
        path = root / "cluster" / name
        if path.is_file():
            return path.absolute()
    raise ConfigError(f"cluster/{name} not found (next to the package or in the working directory)")


def submit_slurm(
    study_dir: Path, study: dict, todo: list[dict], parallel: int, slurm_args: str
) -> str:
    """One `sbatch --array` of cluster/sweep.slurm over `todo`; returns the array job id."""
    sweep_script, pretrain_script = cluster_script("sweep.slurm"), cluster_script("pretrain.slurm")
    shapes = {(r["num_nodes"], r["devices"], r["accelerator"] == "cpu") for r in todo}
    if len(shapes) > 1:
        raise ConfigError(
            "the runs differ in strategy.num_nodes / strategy.devices / accelerator: one job array "
            "holds one shape; sweep them in separate studies"
        )
    nodes, devices, cpu = shapes.pop()
    tasks = study_dir / "tasks"
    tasks.mkdir(exist_ok=True)
    (study_dir / "slurm").mkdir(exist_ok=True)
    for run in todo:
        (tasks / f"{run['index']}.args").write_text("".join(a + "\n" for a in run["args"]))
        Path(run["run_dir"]).mkdir(parents=True, exist_ok=True)
    indices = ",".join(str(r["index"]) for r in todo)
    name = safe(study_dir.absolute().name)
    flags = merge_flags(
        sbatch_defaults(pretrain_script),
        # the shape of the runs' config: one task per device (pretrain.slurm's rule)
        [
            f"--nodes={nodes}",
            f"--ntasks-per-node={devices}",
            f"--gpus-per-node={0 if cpu else devices}",
        ],
        [f"--job-name=sweep-{name}", f"--output={study_dir.absolute() / 'slurm' / '%x-%A_%a.out'}"],
        shlex.split(slurm_args or ""),
    )
    command = [
        "sbatch", "--parsable", f"--array={indices}" + (f"%{parallel}" if parallel else ""),
        *flags, str(sweep_script), str(study_dir.absolute()),
    ]  # fmt: skip
    env = dict(os.environ, PRETRAIN_SLURM=str(pretrain_script))
    env.setdefault("PYTHON", sys.executable)
    print("Submitting:", shlex.join(command), flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    except OSError as e:
        raise ConfigError(f"sbatch could not be run ({e}): is this a Slurm login node?") from e
    if proc.returncode != 0:
        raise ConfigError(f"sbatch failed: {(proc.stderr or proc.stdout).strip()}")
    job = proc.stdout.strip().split(";")[0]
    for run in todo:
        run["job_id"] = f"{job}_{run['index']}"
        run["status"] = "submitted"
        run["attempts"].append(
            {
                "attempt": len(run["attempts"]) + 1,
                "executor": "slurm",
                "job_id": run["job_id"],
                "started": now(),
            }
        )
    save_study(study_dir, study)
    print(
        f"Submitted job array {job} ({len(todo)} task(s)); logs: <run dir>/logs/job-<id>.log",
        flush=True,
    )
    return job


def wait_slurm(study_dir: Path, study: dict, poll: float = 5.0) -> None:
    """Until no run of the study is queued or running in Slurm."""
    if shutil.which("squeue") is None:
        raise ConfigError("--wait needs squeue (run it where Slurm's commands are)")
    seen: dict[str, str] = {}
    while True:
        reconcile(study_dir, study)
        save_study(study_dir, study)
        for run in study["runs"]:
            if seen.get(run["name"]) != run["status"]:
                seen[run["name"]] = run["status"]
                print(f"{run['name']}: {run['status']}", flush=True)
        if not any(r["status"] == "submitted" for r in study["runs"]):
            return
        time.sleep(poll)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def format_runs(study: dict, names: set[str] | None = None) -> str:
    runs = [r for r in study["runs"] if names is None or r["name"] in names]
    width = max([len(r["name"]) for r in runs] + [4])
    lines = [f"{'#':>3}  {'run':<{width}}  {'status':<11} {'steps':>7} {'params':>12}  notes"]
    for r in runs:
        notes = []
        if r.get("baseline_params") is not None and r["ffn_hidden"] != r.get("baseline_ffn_hidden"):
            off = 100 * (r["params"] / r["baseline_params"] - 1)
            notes.append(
                f"ffn_hidden {r['baseline_ffn_hidden']}->{r['ffn_hidden']} "
                f"(baseline {r['baseline_params']:,} parameters, {off:+.3f}%)"
            )
        if r["status"] == "diverged":
            notes.append(f"diverged at step {r.get('diverged_at_step')}")
        if r["attempts"]:
            notes.append(f"{len(r['attempts'])} attempt(s)")
        lines.append(
            f"{r['index']:>3}  {r['name']:<{width}}  {r['status']:<11} {r['max_steps']:>7,} "
            f"{r['params']:>12,}  {'; '.join(notes)}"
        )
    return "\n".join(lines)


def sweep(
    study_dir: str | Path,
    configs: list[str],
    overrides: list[str],
    grid: list[str],
    ladder: str | None = None,
    tokens_per_param: float | None = None,
    executor: str = "local",
    parallel: int = 1,
    slurm_args: str = "",
    match_params: bool = False,
    ffn_multiple: int = 1,
    dry_run: bool = False,
    wait: bool = False,
) -> int:
    """`orchestrator sweep`: resolve and check every run, record the study, run what is left.
    Returns 0 when every run of this invocation is finished or diverged (or was submitted / planned)."""
    study_dir = Path(study_dir)
    axes = [parse_grid(g) for g in grid]
    sizes = [s.strip() for s in ladder.split(",") if s.strip()] if ladder else None
    if parallel < 0 or (executor == "local" and parallel < 1):
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    runs = resolve_study(
        study_dir, configs, overrides, axes, sizes, tokens_per_param, match_params, ffn_multiple
    )
    study_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(study_dir):
        command = ["orchestrator", "sweep", *(a for c in configs for a in ("--config", c))]
        command += ["--study-dir", str(study_dir), *(a for g in grid for a in ("--grid", g))]
        if ladder:
            command += ["--ladder", ladder, "--tokens-per-param", f"{tokens_per_param:g}"]
        command += ["--match-params"] * match_params + list(overrides)
        meta = {
            "command": shlex.join(command),
            "configs": [str(Path(c).absolute()) for c in configs],
            "overrides": overrides,
            "grid": [dataclasses.asdict(a) for a in axes],
            "ladder": sizes,
            "tokens_per_param": tokens_per_param,
            "match_params": match_params,
            "executor": executor,
        }
        study = merge_study(study_dir, load_study(study_dir), runs, meta)
        reconcile(study_dir, study)
        save_study(study_dir, study)
        names = {r.name for r in runs}
        mine = [r for r in study["runs"] if r["name"] in names]
        todo = [r for r in mine if r["status"] not in (*TERMINAL, "submitted")]
        print(f"Study {study_dir}: {len(mine)} run(s), {len(todo)} to run", flush=True)
        print(format_runs(study, names), flush=True)
        if dry_run:
            print(f"Dry run: nothing started; the plan is in {study_dir / STUDY_FILE}")
            return 0
        code = 0
        if executor == "local":
            code = run_local(study_dir, study, todo, parallel)
        elif todo:
            submit_slurm(study_dir, study, todo, parallel, slurm_args)
            if wait:
                wait_slurm(study_dir, study)
        elif wait:
            wait_slurm(study_dir, study)
        print("", flush=True)
        print(format_runs(study, names), flush=True)
        pending = [r for r in mine if r["status"] not in (*TERMINAL, "submitted")]
        if pending:
            print(
                f"{len(pending)} run(s) not finished ({', '.join(sorted({r['status'] for r in pending}))}): "
                "run the same command again to resume them",
                flush=True,
            )
        print(f"Report: orchestrator report {study_dir}", flush=True)
        if code:
            return code
        return 1 if pending else 0
