"""The GPU suite: what only a GPU can check or measure, in one run on one H100/H200, in at most
6 minutes (a fixed rerun then still fits a 15-minute device lease).

Here (a machine with PyPI), once: the wheels the GPU machine lacks (litdata and what it imports
there, zstandard, liger-kernel; pinned to this environment's versions, built for Python 3.12) and
the sample corpus's token chunks, under one directory to carry (about 27 MB, botocore most):
    PYTHON=.venv/bin/python benchmarks/gpu_suite.sh fetch [--assets .cache/gpu-suite]
There (repository root, ASSETS carried; torch, lightning, transformers and pytest preinstalled):
    benchmarks/gpu_suite.sh [OUT_DIR] [--assets .cache/gpu-suite]     # OUT_DIR: $OUT or gpu-out
Here, every step on the CPU with a tiny model, through the same paths (tests/benchmarks):
    SMOKE=1 PYTHON=.venv/bin/python benchmarks/gpu_suite.sh OUT_DIR   # its own wheels, this Python
DRY_RUN=1 prints the steps, their time limits and commands.

Steps, in this order, each under its own time limit; BUDGET_S (default 340 s) caps the whole run,
a step that would start with too little of it left is skipped and says so, and a step that fails
or times out is recorded and the next one runs:
  env           the carried wheels this Python lacks installed into a fresh directory (never in
                front of the machine's own packages); GPU, driver, torch, CUDA, cuDNN; which SDPA
                backend our model's shapes get (plain causal, grouped-query, document mask); which
                kernel libraries import and whether their compiled ops load (xformers on CUDA 13:
                its C++ ops are built for CUDA 12 and it falls back to PyTorch); the kernels `auto`
                resolves to.
  parity        every `gpu`-marked test (pytest -m gpu tests/) with the machine's own pytest, its
                plugins not auto-loaded; ok only if no case failed and no case of a library that
                imports with its ops loaded was skipped for that library.
  trainer_fsdp, trainer_ddp
                `python -m orchestrator train` on one GPU with litdata from the carried wheels:
                tinyllama-1.1b, seq 2048, bf16-mixed, 20 steps with a checkpoint at 10, then a copy
                of the run resumed from step 10 to 20; the per-step losses compared (bitwise, else
                the largest difference) and the tokens/s, MFU and memory the trainer writes to
                metrics.jsonl.
  compare       benchmarks/throughput.py: our default kernels beside transformers'
                LlamaForCausalLM, tinyllama-1.1b, seq 2048, bf16-mixed, one run.
  sweep, kernels, curve   only with time left: the largest micro-batch without activation
                checkpointing, the kernel sets that really run here (a library whose ops fell back
                is left out), the loss curve of the default kernels against eager.
Wheels put into ASSETS/wheels by hand (e.g. xformers 0.0.35) are installed too where this Python
lacks them. Results, in OUT_DIR (3 files: all come back from a device run): summary.json and
summary.txt (per step: ok / failed / skipped, why, and its figures) and suite.log (every command
and its output). Run directories, the installed wheels and raw reports go to --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# What the suite promises: a 15-minute device lease holds it twice (a fixed rerun), with starts.
HARD_CAP_S = 360
# The steps' share of it; the rest is for the interpreter's start, a killed step's last seconds
# and the summary.
BUDGET_S = 340

# What `orchestrator train` imports that the GPU machine lacks (it has torch, lightning with
# lightning_fabric, numpy, requests, sentencepiece, tensorboard, pyyaml, safetensors, ...):
# litdata, boto3 and its own dependencies (litdata.streaming.client imports boto3 at import time),
# zstandard (data/shards.py); liger-kernel, pure-Python Triton kernels, is what `auto` picks on CUDA.
CARRIED = ("litdata", "boto3", "botocore", "s3transfer", "jmespath", "zstandard", "liger-kernel")
# Packages not installed in this environment: the release fetched (liger-kernel's newest, 2026-12).
UNINSTALLED_SPECS = {"liger-kernel": "liger-kernel==0.8.5"}
GPU_PYTHON = "3.12"  # the GPU machine's Python (/opt/torch/.venv)
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip

# Kernel libraries (models/kernels.py names): how a test id or a skip message names each one.
LIBRARY_NAMES = {
    "flash_attn": ("flash_attn", "flash-attn"),
    "xformers": ("xformers",),
    "liger": ("liger",),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model and run sizes of one mode: the real one on a GPU, a tiny one on the CPU (SMOKE)."""

    model: str
    bench_model: list[str]  # throughput.py's --model / --override / --device arguments
    trainer_model: list[str]  # `orchestrator train` overrides of configs/tinyllama-1.1b.yaml
    device: str
    precision: str
    seq_len: int
    micro_batch: int
    steps: int
    save_at: int
    data_workers: int
    bench_steps: list[str]  # compare's --warmup / --steps
    curve_steps: int
    curve_seq: int
    max_batch: int


GPU_SIZES = Sizes(
    model="tinyllama-1.1b",
    bench_model=["--model", "tinyllama-1.1b"],
    trainer_model=[],
    device="cuda",
    precision="bf16-mixed",
    seq_len=2048,
    micro_batch=4,  # 8,192 tokens per step: activations fit beside FSDP's and DDP's 18 GB of state
    steps=20,
    save_at=10,
    data_workers=2,
    bench_steps=["--warmup", "3", "--steps", "20"],
    curve_steps=40,
    curve_seq=1024,
    max_batch=32,
)
SMOKE_SIZES = Sizes(
    model="tiny",
    bench_model="--model tiny --override n_layers=1 --override vocab_size=256 --device cpu".split(),
    trainer_model="--model.name tiny --model.n_layers 1 --model.vocab_size 1024 --model.max_seq_len 64".split(),
    device="cpu",
    precision="32-true",
    seq_len=32,
    micro_batch=2,
    steps=4,
    save_at=2,
    data_workers=0,
    bench_steps=["--warmup", "1", "--steps", "2"],
    curve_steps=6,
    curve_seq=16,
    max_batch=2,
)


class StepSkipped(Exception):
    """The step did not run (or stopped early) for a reason that is no fault of what it checks."""


class StepFailed(Exception):
    """What the step checks failed."""


@dataclasses.dataclass
class Step:
    name: str
    limit_s: int
    # Returns the step's one-line result; raises StepFailed / StepSkipped.
    run: Callable[[Suite, Context], str]
    optional: bool = False  # runs only with time left over (min_s at least)
    min_s: int = 20


@dataclasses.dataclass
class Context:
    """One step's deadline, its log and its figures (kept also when it fails or times out)."""

    deadline: float
    log: Any
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list[str], env: dict[str, str], check: bool = True) -> int:
        """ARGV in the repository root, its output appended to the log, killed (with its children,
        e.g. data-loader workers) at the step's deadline; a non-zero exit is StepFailed if `check`."""
        left = self.left()
        if left < 2:
            raise StepFailed(f"time limit reached before `{short(argv)}`")
        self.log.write(f"\n$ {shlex.join(argv)}\n")
        self.log.flush()
        start = os.path.getsize(self.log.name)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            stop(proc)
            self.details["output_tail"] = tail(self.log.name, start)
            raise StepFailed(f"timed out (step limit) in `{short(argv)}`") from None
        except BaseException:  # interrupted: nothing it started outlives the suite
            stop(proc)
            raise
        if rc != 0:
            self.details["output_tail"] = tail(self.log.name, start)
            if check:
                raise StepFailed(f"`{short(argv)}` exited {rc}")
        return rc


def stop(proc: subprocess.Popen) -> None:
    """End a command and everything it started (its own process group). SIGTERM gets a few seconds
    only: the trainer answers it with a checkpoint, 13 GB at 1.1B, which the suite has no time for."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: str, start: int, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        f.seek(start)
        return "\n".join(f.read().splitlines()[-lines:])


def short(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------
# Wheels: fetched here, installed there into a fresh directory
# --------------------------------------------------------------------------------------------


def carried_specs() -> list[str]:
    """name==version of every carried package: this environment's version (what its tests ran)."""
    from importlib.metadata import PackageNotFoundError, version

    specs = []
    for name in CARRIED:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs.append(UNINSTALLED_SPECS[name])
    return specs


def fetch_wheels(dest: Path, python_version: str | None) -> list[str]:
    """The carried wheels in DEST for Python X.Y on x86-64 Linux (python_version None: this
    interpreter); a wheel already there is not downloaded again. Returns the wheel file names."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    dest.mkdir(parents=True, exist_ok=True)
    have = {(canonicalize_name(n), str(v)) for n, v, _, _ in map(parse_wheel_filename,
                                                                   (f.name for f in dest.glob("*.whl")))}  # fmt: skip
    missing = [s for s in carried_specs() if
               (canonicalize_name(s.split("==")[0]), s.split("==")[1]) not in have]  # fmt: skip
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "-d", str(dest)]  # fmt: skip
        if python_version:
            cmd += ["--python-version", python_version, "--implementation", "cp"]
            for p in GPU_PLATFORMS:
                cmd += ["--platform", p]
        subprocess.run(cmd + missing, check=True)
    return sorted(f.name for f in dest.glob("*.whl"))


def fetch_sample(dest: Path) -> None:
    """The sample corpus of `make sample-data` (prepared in .cache/sample if not yet): its token
    chunks and tokenizer, copied to DEST (about 3 MB)."""
    sys.path.insert(0, str(REPO))
    from orchestrator.demo import prepare_sample

    tokens, tokenizer = prepare_sample(REPO / ".cache" / "sample")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tokens, dest / "tokens")
    shutil.copy(tokenizer, dest / "tokenizer.model")


def cmd_fetch(args: argparse.Namespace) -> int:
    assets = REPO / args.assets  # relative to the repository, as the suite reads it
    wheels = fetch_wheels(assets / "wheels", args.python_version)
    if not args.no_sample:
        fetch_sample(assets / "sample")
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    (assets / "manifest.json").write_text(json.dumps(
        {"python": args.python_version or platform.python_version(), "wheels": wheels}, indent=1))  # fmt: skip
    print(f"{assets}: {len(wheels)} wheels, {size / 2**20:.1f} MiB in all (carry this directory)")
    return 0


def wheel_modules(wheel: Path) -> list[str]:
    """The top-level modules a wheel installs (its top_level.txt, else its RECORD's paths)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top:
            return [m for m in z.read(top[0]).decode().split() if m]
    found = set()
    for n in names:
        first = n.split("/")[0]
        if first.endswith((".dist-info", ".data")) or first == "__pycache__":
            continue
        found.add(first.split(".")[0])
    return sorted(found)


def install_wheels(wheels: Path, site: Path, only_missing: bool) -> dict[str, Any]:
    """Install into SITE (emptied first; put on PYTHONPATH) the wheels of WHEELS that fit this
    Python, and with `only_missing` only those whose modules this Python cannot import already:
    the machine's own packages (pytest, numpy, ...) are never shadowed."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    supported = set(sys_tags())
    chosen: dict[str, Path] = {}
    report: dict[str, Any] = {"installed": [], "present": [], "unfit": []}
    for wheel in sorted(wheels.glob("*.whl")):
        name, ver, _, tags = parse_wheel_filename(wheel.name)
        if not tags & supported:
            report["unfit"].append(wheel.name)
        elif name not in chosen:
            chosen[name] = wheel
    for name, wheel in list(chosen.items()):
        modules = wheel_modules(wheel)
        if only_missing and modules and all(importlib.util.find_spec(m) for m in modules):
            report["present"].append(name)
            del chosen[name]
    if chosen:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", str(site), *map(str, chosen.values())]  # fmt: skip
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip install --target {site} failed: {done.stderr.strip()[-500:]}")
    report["installed"] = [
        w.name.split("-")[0] + "==" + w.name.split("-")[1] for w in chosen.values()
    ]
    return report


# --------------------------------------------------------------------------------------------
# env: the probe (run in a child process with the carried wheels on its path)
# --------------------------------------------------------------------------------------------

SDPA_BACKENDS = {  # profiler op name (stem; the backward ops add `_backward`) -> SDPA backend
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backend_of(event_names: set[str]) -> list[str]:
    """The SDPA backends among profiler event names (forward and backward ops alike)."""
    found = []
    for name in sorted(event_names):
        stem = name.removesuffix("_backward")
        if stem in SDPA_BACKENDS and SDPA_BACKENDS[stem] not in found:
            found.append(SDPA_BACKENDS[stem])
    return found


def probe(out: Path, smoke: bool) -> None:
    """Write OUT (JSON): versions, the GPU, the SDPA backend of each of our attention shapes, the
    kernel libraries and whether their ops load, and the kernels `auto` resolves to."""
    sys.path.insert(0, str(REPO))
    import torch

    from models import fused, kernels
    from models.config import model_config
    from models.llama import Llama

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not smoke else "cpu")
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "device": str(device),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count}  # fmt: skip
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)  # fmt: skip
            report["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 else None
    for module in ("lightning_fabric", "litdata", "transformers", "triton", "pytest"):
        try:
            mod = __import__(module)
            report[module] = {"version": getattr(mod, "__version__", "?"), "path": mod.__file__}
        except Exception as e:  # noqa: BLE001 - absent or broken: say which
            report[module] = {"missing": f"{type(e).__name__}: {e}".splitlines()[0][:200]}

    # Our model's attention, one layer at TinyLlama's width (SMOKE: tiny) with SDPA, its backward
    # too; which backend ran is read off the profiler's ops.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name, seq = ("tiny", 64) if smoke else ("tinyllama-1.1b", 2048)
    eager = dict(rmsnorm_kernel="eager", swiglu_kernel="eager", rope_kernel="eager",
                 loss_kernel="cross_entropy")  # fmt: skip
    base = model_config(name, n_layers=1, vocab_size=512, attention="sdpa", **eager)
    docs = torch.zeros(1, seq, dtype=torch.long)
    for start in (seq // 8, seq // 3, seq // 2):
        docs[:, start:] += 1
    cases = {
        "plain causal": (dataclasses.replace(base, n_kv_heads=base.n_heads), None),
        "grouped-query": (base, None),
        "document mask": (base, docs),
    }
    sdpa = {}
    for case, (cfg, doc_ids) in cases.items():
        try:
            torch.manual_seed(0)
            model = Llama(cfg).to(device)
            tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32
                ):
                    loss = model(tokens[:, :-1], targets=tokens[:, 1:],
                                 doc_ids=None if doc_ids is None else doc_ids.to(device))  # fmt: skip
                loss.backward()
            sdpa[case] = sdpa_backend_of({e.name for e in prof.events()}) or ["none seen"]
        except Exception as e:  # noqa: BLE001 - reported, the other cases still probed
            sdpa[case] = [f"error: {type(e).__name__}: {e}".splitlines()[0][:200]]
    report["sdpa"] = {"shape": f"{cfg.n_heads} heads of {cfg.head_dim}, seq {seq}, {dtype}", **sdpa}

    libraries = {}
    for lib in kernels.installed():
        libraries[lib] = probe_library(lib, kernels, fused, torch, device)
    report["libraries"] = libraries
    chosen = kernels.choose_kernels(model_config(GPU_SIZES.model), device, dtype)
    report["auto_kernels"] = dataclasses.asdict(chosen)
    out.write_text(json.dumps(report, indent=1, default=str))


def probe_library(lib: str, kernels, fused, torch, device) -> dict[str, Any]:
    """importable, version, and ops: loaded (a small call ran on the GPU), fell back (imports, but its
    compiled ops did not load, so its functions run PyTorch fallbacks), failed (a call raised),
    absent, or not checked (no GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"flash_attn": "flash-attn", "xformers": "xformers", "liger": "liger-kernel"}[lib]
    out: dict[str, Any] = {"package": package}
    try:
        out["version"] = version(package)
    except PackageNotFoundError:
        out["version"] = None
    problem = kernels.library_problem(lib)
    out["importable"] = problem is None
    if problem is not None:
        return {**out, "ops": "absent", "why": problem}
    if lib == "xformers":  # C++/CUDA ops built for another CUDA: it warns and runs fallbacks
        import xformers

        cpp = getattr(xformers, "_cpp_lib", None)
        error = getattr(cpp, "_cpp_library_load_exception", None)
        meta = getattr(cpp, "_build_metadata", None)
        out["built_for"] = getattr(meta, "metadata", {}).get("version") if meta else None
        if error is not None or not getattr(xformers, "_has_cpp_library", False):
            why = str(error).strip().splitlines()[0] if error else "no compiled ops in this build"
            return {**out, "ops": "fell back", "why": why}
    if device.type != "cuda":
        return {**out, "ops": "not checked (no CUDA)"}
    try:
        x = torch.randn(2, 128, 4, 64, device=device, dtype=torch.bfloat16)
        if lib in ("flash_attn", "xformers"):
            fused.attention(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2), lib)
        else:
            fused.rms_norm(x, torch.ones(64, device=device, dtype=torch.bfloat16), 1e-5, lib)
        torch.cuda.synchronize()
        out["ops"] = "loaded"
    except Exception as e:  # noqa: BLE001 - a library that imports but cannot run here
        out.update(ops="failed", why=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    return out


# --------------------------------------------------------------------------------------------
# parity: judging the cases
# --------------------------------------------------------------------------------------------


def read_junit(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """(cases, modules that failed to collect) from pytest's JUnit XML: each case's nodeid, outcome
    (passed / failed / error / skipped) and message."""
    cases, broken = [], []
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message", "") or (child.text or "")[:300]
                break
        if not classname and outcome == "error" and "collection" in message:
            broken.append(name)  # a module that failed to import (pytest names it tests.x.y)
            continue
        path_part = classname.replace(".", "/")
        cases.append({"nodeid": f"{path_part}.py::{name}", "outcome": outcome, "message": message})
    return cases, broken


def gpu_test_modules(root: Path = REPO / "tests") -> set[str]:
    """Dotted names of the test modules that hold gpu-marked tests."""
    return {
        ".".join(p.relative_to(root.parent).with_suffix("").parts)
        for p in root.rglob("test_*.py")
        if "mark.gpu" in p.read_text(errors="replace")
    }


def case_libraries(case: dict[str, str], by: str) -> set[str]:
    """The kernel libraries a case is about: named in its test id (`by="id"`) or in its skip
    message (`by="message"`, i.e. it was skipped because of that library)."""
    text = case["nodeid"].split("::", 1)[-1] if by == "id" else case["message"]
    return {lib for lib, names in LIBRARY_NAMES.items() if any(n in text for n in names)}


def judge_parity(cases: list[dict[str, str]], broken: list[str], gpu_modules: set[str],
                 libraries: dict[str, dict], cuda: bool) -> tuple[str, str, dict]:  # fmt: skip
    """(status, why, details) of the parity step. ok: no case failed, no module with gpu tests failed
    to collect, and no case was skipped because of a library that imports with its ops loaded.
    A library whose ops fell back is reported as such (its cases ran on PyTorch fallbacks)."""
    outcomes = Counter(c["outcome"] for c in cases)
    must_run = {
        lib
        for lib, info in libraries.items()
        if info.get("importable") and info.get("ops") != "fell back"
    }
    per_library: dict[str, dict[str, Any]] = {}
    for lib, info in libraries.items():
        mine = [c for c in cases if lib in case_libraries(c, "id") | case_libraries(c, "message")]
        per_library[lib] = {"ops": info.get("ops"), **Counter(c["outcome"] for c in mine)}
    skip_reasons = Counter(c["message"][:160] for c in cases if c["outcome"] == "skipped")
    details: dict[str, Any] = {"cases": len(cases), **outcomes, "libraries": per_library,
                               "skip_reasons": dict(skip_reasons.most_common(12))}  # fmt: skip
    if broken:
        details["not_collected"] = broken
    problems = []
    bad = [c["nodeid"] for c in cases if c["outcome"] in ("failed", "error")]
    if bad:
        problems.append(f"{len(bad)} failed: {', '.join(bad[:4])}")
        details["failed_cases"] = bad
    lost = sorted(set(broken) & gpu_modules)
    if lost:
        problems.append(f"gpu tests not collected (import failed): {', '.join(lost)}")
    for lib in sorted(must_run):
        skipped = [
            c for c in cases if c["outcome"] == "skipped" and lib in case_libraries(c, "message")
        ]
        if skipped:
            problems.append(f"{lib} imports with its ops loaded but {len(skipped)} of its cases skipped "
                            f"({skipped[0]['message'][:100]})")  # fmt: skip
    fell_back = sorted(lib for lib, info in libraries.items() if info.get("ops") == "fell back")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
    if problems:
        return "failed", "; ".join(problems), details
    if not cases:
        return "failed", "no gpu-marked case was collected", details
    if not cuda:
        why = f"no CUDA device: {len(cases)} gpu cases collected ({counts}), none can run here"
        return "skipped", why, details
    ran = sorted(must_run)
    absent = sorted(lib for lib, info in libraries.items() if not info.get("importable"))
    why = f"{counts}; ran: sdpa/eager{''.join(', ' + lib for lib in ran)}"
    if absent:
        why += f"; absent (skipped): {', '.join(absent)}"
    if fell_back:
        why += f"; fell back to PyTorch (ran, left out of timing): {', '.join(fell_back)}"
    return "ok", why, details


# --------------------------------------------------------------------------------------------
# trainer: metrics.jsonl
# --------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


def compare_losses(straight: dict[int, float], resumed: dict[int, float]) -> dict[str, Any]:
    """The resumed run's losses against the straight run's at the same steps."""
    steps = sorted(resumed)
    common = [s for s in steps if s in straight]
    diffs = [abs(straight[s] - resumed[s]) for s in common]
    return {
        "steps": [steps[0], steps[-1]] if steps else [],
        "bitwise": bool(common)
        and common == steps
        and all(straight[s] == resumed[s] for s in common),
        "max_abs_diff": max(diffs) if diffs else None,
    }


def run_figures(records: list[dict[str, Any]], skip_first: int = 2) -> dict[str, Any]:
    """What the trainer itself reported: the median over steps of tokens/s, MFU and step time (the
    first steps and the step after each checkpoint left out: warm-up and the save are in them), its
    peak memory, and each checkpoint's write time."""
    steps = [r for r in records if "loss" in r and "tokens_per_sec" in r]
    saved = {r["step"] for r in records if "checkpoint" in r}
    timed = [r for r in steps if r["step"] > skip_first and r["step"] - 1 not in saved] or steps

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    peak = [r.get("memory_peak_allocated_gib", r.get("memory_peak_rss_gib")) for r in steps]
    return {
        "tokens_per_s": median("tokens_per_sec"),
        "mfu": median("perf_mfu"),
        "tflops_per_device": median("perf_tflops_per_device"),
        "step_ms": median("perf_step_time_ms"),
        "data_wait_ms": median("perf_data_wait_ms"),
        "peak_memory_gib": max((p for p in peak if p is not None), default=None),
        "memory_kind": "cuda peak allocated" if any("memory_peak_allocated_gib" in r for r in steps) else "rss",
        "checkpoints": [{k: round(r[k], 2) for k in ("step", "write_seconds", "size_mb") if k in r}
                        for r in records if "checkpoint" in r],
        "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
    }  # fmt: skip


def resume_copy(run_dir: Path, resumed_dir: Path, step: int) -> None:
    """A copy of the run whose newest checkpoint is the one at STEP, as after a crash there
    (benchmarks/scale.py); hard links where the filesystem allows: a 1.1B checkpoint is 13 GB."""
    shutil.rmtree(resumed_dir, ignore_errors=True)
    (resumed_dir / "checkpoints").mkdir(parents=True)
    source = run_dir / "checkpoints" / f"step-{step:08d}"

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, resumed_dir / "checkpoints" / source.name, copy_function=link)
    shutil.copy(run_dir / "config.yaml", resumed_dir / "config.yaml")


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.dry_run = args.dry_run
        self.sizes = SMOKE_SIZES if self.smoke else GPU_SIZES
        self.out = Path(args.out_dir).resolve()
        self.work = Path(args.work).resolve()
        self.assets = Path(
            args.assets or (".cache/gpu-suite-smoke" if self.smoke else ".cache/gpu-suite")
        )
        self.assets = (
            (REPO / self.assets).resolve() if not self.assets.is_absolute() else self.assets
        )
        self.site = self.work / "site"
        self.budget = args.budget
        if args.data:
            self.tokens, self.tokenizer = (Path(p).resolve() for p in args.data)
        else:
            self.tokens, self.tokenizer = (
                self.assets / "sample" / "tokens",
                self.assets / "sample" / "tokenizer.model",
            )
        self.env_report: dict[str, Any] = {}
        self.wheels: dict[str, Any] = {}
        self.steps = [
            # Required: 320 s of limits. The trainer's are the largest: each strategy writes three
            # 13 GB checkpoints (with their SHA-256) and reads one back.
            Step("env", 25, step_env),
            Step("parity", 75, step_parity),
            Step("trainer_fsdp", 90, lambda s, c: step_trainer(s, c, "fsdp")),
            Step("trainer_ddp", 80, lambda s, c: step_trainer(s, c, "ddp")),
            Step("compare", 50, step_compare),
            Step("sweep", 50, step_sweep, optional=True, min_s=35),
            Step("kernels", 50, step_kernels, optional=True, min_s=35),
            Step("curve", 60, step_curve, optional=True, min_s=40),
        ]
        for item in args.limit:
            name, _, value = item.partition("=")
            step = next((s for s in self.steps if s.name == name), None)
            if step is None or not value.isdigit():
                raise SystemExit(
                    f"--limit {item!r}: expected STEP=SECONDS, STEP one of {[s.name for s in self.steps]}"
                )
            step.limit_s = int(value)

    # --- the commands ---------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        if self.smoke:
            env["OMP_NUM_THREADS"] = "1"
        env.pop("SLURM_JOB_ID", None)  # the trainer must not think a Slurm job launched it
        env.pop("SLURM_NTASKS", None)
        return env

    def probe_cmd(self) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_probe", str(self.work / "env.json")]
        return cmd + (["--smoke"] if self.smoke else [])

    def parity_cmd(self) -> list[str]:
        # Only the modules that hold gpu tests: collecting all of tests/ costs ~10 s more.
        files = sorted(m.replace(".", "/") + ".py" for m in gpu_test_modules())
        return [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-m", "gpu",
                "--continue-on-collection-errors", f"--junitxml={self.work / 'parity.xml'}", *files]  # fmt: skip

    def trainer_args(self, strategy: str, run_dir: Path) -> list[str]:
        z = self.sizes
        return [
            "--config", "configs/tinyllama-1.1b.yaml", *z.trainer_model, "--run.dir", str(run_dir),
            "--data.dir", str(self.tokens), "--data.tokenizer", str(self.tokenizer),
            "--data.num_workers", str(z.data_workers),
            "--strategy.name", strategy, "--strategy.accelerator", z.device, "--strategy.devices", "1",
            "--strategy.num_nodes", "1", "--strategy.precision", z.precision,
            "--train.seq_len", str(z.seq_len), "--train.micro_batch_size", str(z.micro_batch),
            "--train.global_batch_tokens", str(z.micro_batch * z.seq_len),
            "--train.max_steps", str(z.steps), "--train.log_interval", "1",
            "--schedule.warmup_steps", str(z.steps // 4),  # the lr reaches its peak: the loss moves
            "--eval.interval", "0", "--eval.at_start", "false", "--eval.max_batches", "2",
            "--checkpoint.interval", str(z.save_at), "--checkpoint.keep_last", "0",
            "--logging.sample_interval", "0",
        ]  # fmt: skip

    def trainer_cmd(self, strategy: str, run_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "orchestrator",
            "train",
            *self.trainer_args(strategy, run_dir),
        ]

    def bench_cmd(self, *extra: str) -> list[str]:
        z = self.sizes
        return [sys.executable, "benchmarks/throughput.py", *z.bench_model, "--precision", z.precision,
                *extra]  # fmt: skip

    def compare_cmd(self) -> list[str]:
        z = self.sizes
        return self.bench_cmd("--seq-len", str(z.seq_len), "--batch", str(z.micro_batch),
                              *z.bench_steps, "--ours", "default", "--peers", "hf",
                              "--json", str(self.work / "compare.json"))  # fmt: skip

    def sweep_cmd(self) -> list[str]:
        return self.bench_cmd("--seq-len", str(self.sizes.seq_len), "--sweep", "--no-kernel-search",
                              "--max-batch", str(self.sizes.max_batch), "--warmup", "2", "--steps", "8",
                              "--json", str(self.work / "sweep.json"))  # fmt: skip

    def kernel_sets(self) -> str:
        """default and baseline, and each library set that really runs here (imports, ops loaded)
        and `auto` does not already pick; at most three sets where the GPU holds under 100 GiB (a
        1.1B set with fp32 AdamW stays resident: about 18 GB)."""
        sets = ["default", "baseline"]
        libs = self.env_report.get("libraries", {})
        if (
            libs.get("flash_attn", {}).get("ops") == "loaded"
            and self.env_report.get("auto_kernels", {}).get("attention") != "flash_attn"
        ):
            sets.append("attention=flash_attn")
        if libs.get("xformers", {}).get("ops") == "loaded":
            sets.append("attention=xformers")
        sets.append("loss_kernel=chunked")
        room = self.env_report.get("gpu", {}).get("memory_gib", 0) >= 100 or self.smoke
        return ";".join(sets if room else sets[:3])  # fmt: skip

    def kernels_cmd(self) -> list[str]:
        z = self.sizes
        return self.bench_cmd("--seq-len", str(z.seq_len), "--batch", str(z.micro_batch), "--warmup", "2",
                              "--steps", "8", "--peers", "none", "--skip-unavailable", "--ours", self.kernel_sets(),
                              "--json", str(self.work / "kernels.json"))  # fmt: skip

    def curve_cmd(self) -> list[str]:
        z = self.sizes
        return self.bench_cmd("--seq-len", str(z.curve_seq), "--batch", "2", "--curve", str(z.curve_steps),
                              "--ours", "default", "--json", str(self.work / "curve.json"))  # fmt: skip

    def describe(self, step: Step) -> str:
        return {
            "env": lambda: f"install {self.assets / 'wheels'} (what this Python lacks) into "
            f"{self.site}; {shlex.join(self.probe_cmd())}",
            "parity": lambda: "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 " + shlex.join(self.parity_cmd()),
            "trainer_fsdp": lambda: shlex.join(self.trainer_cmd("fsdp", self.work / "runs" / "fsdp")),
            "trainer_ddp": lambda: shlex.join(self.trainer_cmd("ddp", self.work / "runs" / "ddp")),
            "compare": lambda: shlex.join(self.compare_cmd()),
            "sweep": lambda: shlex.join(self.sweep_cmd()),
            "kernels": lambda: shlex.join(self.kernels_cmd()),
            "curve": lambda: shlex.join(self.curve_cmd()),
        }[step.name]()  # fmt: skip

    # --- running --------------------------------------------------------------------------------
    def main(self) -> int:
        required = sum(s.limit_s for s in self.steps if not s.optional)
        if self.dry_run:
            print(
                f"budget {self.budget}s (hard cap {HARD_CAP_S}s); required steps' limits {required}s"
            )
            for step in self.steps:
                print(
                    f"step {step.name} limit {step.limit_s}s{' optional' if step.optional else ''}: "
                    f"{self.describe(step)}"
                )
            return 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        results = []
        (self.out / "suite.log").write_text("")
        # Appending, line-buffered: the commands write to the same file between the suite's lines.
        with open(self.out / "suite.log", "a", buffering=1) as log:
            for step in self.steps:
                left = self.budget - (time.monotonic() - started)
                limit = min(step.limit_s, int(left) - 3)
                if limit < step.min_s:
                    why = (f"{int(left)}s of the {self.budget}s budget left, needs {step.min_s}s"
                           + (" (runs only with time left over)" if step.optional else ""))  # fmt: skip
                    results.append(self.record(step, "skipped", why, 0.0, limit, {}))
                    continue
                ctx = Context(time.monotonic() + limit, log)
                log.write(f"\n===== {step.name} (limit {limit}s) =====\n")
                log.flush()
                print(f"=== {step.name} (limit {limit}s)", flush=True)
                t0 = time.monotonic()
                try:
                    status, why = "ok", step.run(self, ctx)
                except StepSkipped as e:
                    status, why = "skipped", str(e)
                except StepFailed as e:
                    status, why = "failed", str(e)
                except Exception as e:  # noqa: BLE001 - a bug in a step must not stop the others
                    status, why = "failed", f"{type(e).__name__}: {e}"
                results.append(
                    self.record(step, status, why, time.monotonic() - t0, limit, ctx.details)
                )
                if status == "failed" and "output_tail" in ctx.details:
                    print(ctx.details["output_tail"], flush=True)
        total = time.monotonic() - started
        self.write_summary(results, total)
        return 0

    def record(self, step, status, why, seconds, limit, details) -> dict[str, Any]:
        print(f"{step.name:<13} {status:<8} {seconds:6.1f}s  {why}", flush=True)
        return {"step": step.name, "status": status, "why": why, "seconds": round(seconds, 1),
                "limit_s": limit, "optional": step.optional, "details": details}  # fmt: skip

    def write_summary(self, results: list[dict[str, Any]], total: float) -> None:
        gpu = self.env_report.get("gpu", {}).get("name") or self.env_report.get("device", "?")
        summary = {
            "suite": "benchmarks/gpu_suite.py",
            "mode": "smoke (CPU, tiny model)" if self.smoke else "gpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": gpu,
            "budget_s": self.budget,
            "hard_cap_s": HARD_CAP_S,
            "total_s": round(total, 1),
            "steps": results,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        lines = [
            f"GPU suite, {summary['mode']}, on {gpu}: {total:.0f}s of a {self.budget}s budget "
            f"({summary['date']})",
            "",
            f"{'step':<13} {'status':<8} {'seconds':>7} {'limit':>6}  why",
        ]
        for r in results:
            lines.append(
                f"{r['step']:<13} {r['status']:<8} {r['seconds']:>7.1f} {r['limit_s']:>6}  {r['why']}"
            )
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        print("\n" + "\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------


def step_env(s: Suite, ctx: Context) -> str:
    wheels = s.assets / "wheels"
    if s.smoke and not any(wheels.glob("*.whl")):  # CPU machines have PyPI: fetch the set once
        fetch_wheels(wheels, None)
    if s.smoke and not s.tokens.is_dir():  # the `make sample-data` corpus, prepared once
        fetch_sample(s.tokens.parent)
    if any(wheels.glob("*.whl")):
        # SMOKE: every wheel, so that litdata is imported from them, not from this environment.
        s.wheels = install_wheels(wheels, s.site, only_missing=not s.smoke)
    else:
        s.site.mkdir(parents=True, exist_ok=True)
        s.wheels = {
            "installed": [],
            "missing": f"no wheels in {wheels} (run `benchmarks/gpu_suite.sh fetch` here)",
        }
    ctx.details["wheels"] = s.wheels
    ctx.run(s.probe_cmd(), s.env())
    s.env_report = json.loads((s.work / "env.json").read_text())
    ctx.details.update(s.env_report)
    r = s.env_report
    if not r["cuda_available"] and not s.smoke:
        raise StepFailed("torch sees no CUDA device")
    libs = ", ".join(f"{n} {i['ops']}" for n, i in r["libraries"].items())
    sdpa = "; ".join(f"{k}: {'+'.join(v)}" for k, v in r["sdpa"].items() if k != "shape")
    where = f"{r['gpu']['name']}, driver {r.get('driver')}, " if r.get("gpu") else "CPU, "
    return (f"{where}torch {r['torch']}, CUDA {r['cuda']}, cuDNN {r['cudnn']}; SDPA {sdpa}; {libs}; "
            f"carried: {', '.join(s.wheels['installed']) or 'none'}")  # fmt: skip


def step_parity(s: Suite, ctx: Context) -> str:
    need_env(s)  # which libraries load decides which skips are allowed
    junit = s.work / "parity.xml"
    junit.unlink(missing_ok=True)
    rc = ctx.run(s.parity_cmd(), s.env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"), check=False)
    ctx.details["pytest_exit"] = rc
    # 1: failures or modules that did not import (judged below); 2-4: interrupted, internal or
    # usage error; 5: nothing collected.
    if rc not in (0, 1) or not junit.is_file():
        raise StepFailed(f"pytest exited {rc}" + ("" if junit.is_file() else " without a report"))
    cases, broken = read_junit(junit)
    cuda = bool(s.env_report.get("cuda_available"))  # what the tests themselves see
    status, why, details = judge_parity(
        cases, broken, gpu_test_modules(), s.env_report.get("libraries", {}), cuda
    )
    ctx.details.update(details)
    if status == "failed":
        raise StepFailed(why)
    if status == "skipped":
        raise StepSkipped(why)
    return why


def step_trainer(s: Suite, ctx: Context, strategy: str) -> str:
    if not s.tokens.is_dir() or not s.tokenizer.is_file():
        raise StepSkipped(
            f"no sample corpus at {s.tokens.parent} (run `benchmarks/gpu_suite.sh fetch` here)"
        )
    need_gpu(s)
    env = s.env()
    # Where litdata comes from: the carried wheels (SMOKE: required, the path under test).
    where = subprocess.run([sys.executable, "-c", "import litdata; print(litdata.__file__)"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    litdata = where.stdout.strip() or (where.stderr.strip().splitlines() or ["?"])[-1]
    ctx.details["litdata"] = litdata
    ctx.details["kernels"] = s.env_report.get("auto_kernels")  # what the config's `auto` runs here
    if where.returncode != 0:
        raise StepFailed(f"litdata does not import: {litdata}")
    if s.smoke and not str(litdata).startswith(str(s.site)):
        raise StepFailed(f"litdata came from {litdata}, not the carried wheels in {s.site}")
    z = s.sizes
    runs = s.work / "runs"
    run_dir, resumed_dir = runs / strategy, runs / f"{strategy}-resumed"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(resumed_dir, ignore_errors=True)
    try:
        t0 = time.monotonic()
        ctx.run(s.trainer_cmd(strategy, run_dir), env)
        records = read_metrics(run_dir)
        straight = step_losses(records)
        figures = run_figures(records)
        ctx.details.update(
            straight_wall_s=round(time.monotonic() - t0, 1), losses=straight, **figures
        )
        if sorted(straight) != list(range(1, z.steps + 1)):
            raise StepFailed(f"the run logged steps {sorted(straight)}, expected 1..{z.steps}")
        # The final checkpoint goes before the resume starts: disk for one 13 GB copy less.
        shutil.rmtree(run_dir / "checkpoints" / f"step-{z.steps:08d}", ignore_errors=True)
        resume_copy(run_dir, resumed_dir, z.save_at)
        t0 = time.monotonic()
        ctx.run(s.trainer_cmd(strategy, resumed_dir), env)
        resumed_records = read_metrics(resumed_dir)
        resumed = step_losses(resumed_records)
        check = compare_losses(straight, resumed)
        ctx.details["resume"] = {"wall_s": round(time.monotonic() - t0, 1), "losses": resumed, **check,
                                 "val_loss": run_figures(resumed_records)["val_loss"]}  # fmt: skip
    finally:  # 13 GB per checkpoint at 1.1B: never left on the machine's disk
        for d in (run_dir, resumed_dir):
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
    if sorted(resumed) != list(range(z.save_at + 1, z.steps + 1)):
        raise StepFailed(
            f"the resumed run logged steps {sorted(resumed)}, expected {z.save_at + 1}..{z.steps}"
        )
    f = figures
    perf = (f"{f['tokens_per_s']:,.0f} tok/s" + (f", MFU {100 * f['mfu']:.1f}%" if f["mfu"] else "")
            + (f", peak {f['peak_memory_gib']:.1f} GiB" if f["peak_memory_gib"] else ""))  # fmt: skip
    resume = (
        "bitwise" if check["bitwise"] else f"largest |loss difference| {check['max_abs_diff']:.3g}"
    )
    why = f"{strategy}, {z.steps} steps: {perf}; resumed {z.save_at}->{z.steps}: {resume}"
    # Not bitwise: kernels with atomics (some Triton backward passes) may round differently from
    # run to run; beyond bf16 noise it is a resume bug.
    if not check["bitwise"] and (check["max_abs_diff"] is None or check["max_abs_diff"] > 1e-2):
        raise StepFailed(why)
    return why


def need_env(s: Suite) -> None:
    if not s.env_report:
        raise StepSkipped("no environment report: the env step did not complete")


def need_gpu(s: Suite) -> None:
    """The measuring steps run at the GPU sizes only on a GPU (SMOKE: tiny, on the CPU)."""
    need_env(s)
    if not s.smoke and not s.env_report.get("cuda_available"):
        raise StepSkipped("no CUDA device")


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def step_compare(s: Suite, ctx: Context) -> str:
    need_gpu(s)
    if "missing" in s.env_report.get("transformers", {}):
        raise StepSkipped(f"transformers (the LlamaForCausalLM peer) is not installed here: "
                          f"{s.env_report['transformers']['missing']}")  # fmt: skip
    ctx.run(s.compare_cmd(), s.env())
    report = load_json(s.work / "compare.json")
    rows = [{k: r.get(k) for k in ("name", "tokens_per_s", "mfu", "peak_mem_mib", "step_s_median", "initial_loss")}
            | {"kernels": r.get("info", {}).get("kernels")} for r in report.get("results", [])]  # fmt: skip
    ctx.details.update(results=rows, ratios=report.get("ratios"), skipped=report.get("skipped_peers"),
                       config=report.get("config"), versions=report.get("versions"))  # fmt: skip
    text = "; ".join(f"{r['name']} {r['tokens_per_s']:,.0f} tok/s" + (f" MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
                     for r in rows)  # fmt: skip
    ratio = (report.get("ratios") or {}).get("ours[default] / hf LlamaForCausalLM")
    return text + (f"; ours/hf {ratio:.2f}x" if ratio else "")


def step_sweep(s: Suite, ctx: Context) -> str:
    need_gpu(s)
    ctx.run(s.sweep_cmd(), s.env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    r = load_json(s.work / "sweep.json")
    ctx.details.update(
        {
            k: r.get(k)
            for k in ("micro_batches", "largest_micro_batch", "best_tokens_per_s", "best_mfu")
        }
    )
    best = r.get("best_tokens_per_s") or 0
    return f"largest micro-batch without checkpointing: {r.get('largest_micro_batch')} ({best:,.0f} tok/s)"


def step_kernels(s: Suite, ctx: Context) -> str:
    need_gpu(s)
    fell_back = sorted(
        n for n, i in s.env_report.get("libraries", {}).items() if i.get("ops") == "fell back"
    )
    ctx.run(s.kernels_cmd(), s.env())
    r = load_json(s.work / "kernels.json")
    rows = [{"name": x["name"], "tokens_per_s": x["tokens_per_s"], "kernels": x.get("info", {}).get("kernels")}
            for x in r.get("results", [])]  # fmt: skip
    ctx.details.update(results=rows, skipped=r.get("skipped_peers"), left_out_fell_back=fell_back)
    return "; ".join(f"{x['name']} {x['tokens_per_s']:,.0f} tok/s" for x in rows) + (
        f"; left out (ops fell back): {', '.join(fell_back)}" if fell_back else ""
    )


def step_curve(s: Suite, ctx: Context) -> str:
    need_gpu(s)
    ctx.run(s.curve_cmd(), s.env())
    r = load_json(s.work / "curve.json")
    ctx.details.update(results=r.get("results"), noise=r.get("noise"))
    rows = [x for x in r.get("results", []) if "within_noise" in x]
    return "; ".join(f"{x['name']} ({', '.join(f'{k}={v}' for k, v in (x.get('kernels') or {}).items())}): "
                     f"mean |gap| {x['mean_abs_gap']:.4f}, {'within' if x['within_noise'] else 'OUTSIDE'} noise"
                     for x in rows)  # fmt: skip


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch"]:
        p = argparse.ArgumentParser(
            prog="gpu_suite.sh fetch", description="the wheel set and sample corpus to carry"
        )
        p.add_argument("--assets", default=".cache/gpu-suite")
        p.add_argument(
            "--python-version",
            default=GPU_PYTHON,
            help="wheels for this Python (default: the GPU machine's)",
        )
        p.add_argument("--no-sample", action="store_true", help="wheels only")
        args = p.parse_args(argv[1:])
        args.command = "fetch"
        return args
    if argv[:1] == ["_probe"]:
        return argparse.Namespace(command="_probe", out=Path(argv[1]), smoke="--smoke" in argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir", nargs="?", default=os.environ.get("OUT") or "gpu-out",
                   help="summary.json, summary.txt, suite.log (default: $OUT, else gpu-out)")  # fmt: skip
    p.add_argument(
        "--assets",
        default=None,
        help="the fetched wheels/ and sample/ (default .cache/gpu-suite; SMOKE: .cache/gpu-suite-smoke)",
    )
    p.add_argument(
        "--work",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpu-suite-work"),
        help="run directories, the installed wheels, raw reports",
    )
    p.add_argument(
        "--data",
        nargs=2,
        metavar=("TOKENS", "TOKENIZER"),
        help="prepared token chunks (default: ASSETS/sample)",
    )
    p.add_argument("--budget", type=int, default=int(os.environ.get("BUDGET_S", BUDGET_S)),
                   help=f"seconds for all steps ($BUDGET_S, else {BUDGET_S}; at most {HARD_CAP_S})")  # fmt: skip
    p.add_argument(
        "--limit", action="append", default=[], metavar="STEP=SECONDS", help="a step's time limit"
    )
    args = p.parse_args(argv)
    args.command = "run"
    args.smoke = os.environ.get("SMOKE", "0") == "1"
    args.dry_run = os.environ.get("DRY_RUN", "0") == "1"
    if args.budget > HARD_CAP_S:
        raise SystemExit(f"--budget {args.budget}: the suite promises at most {HARD_CAP_S}s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "fetch":
        return cmd_fetch(args)
    if args.command == "_probe":
        probe(args.out, args.smoke)
        return 0
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
