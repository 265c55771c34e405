"""Training throughput of our model beside transformers' LlamaForCausalLM (and LitGPT's GPT), one run.

    .venv/bin/python benchmarks/throughput.py                                   # CPU: llama-20m, 4 x 256, fp32
    .venv/bin/python benchmarks/throughput.py --model tinyllama-1.1b --batch 8 --seq-len 2048 \\
        --precision bf16-mixed --json tinyllama.json                            # one H100
    .venv/bin/python benchmarks/throughput.py --sweep --model tinyllama-1.1b --seq-len 2048 --precision bf16-mixed
    .venv/bin/python benchmarks/throughput.py --curve 200 --model tinyllama-1.1b --batch 4 --ours 'default;eager'

One training step = forward to the mean next-token loss, backward, gradient clipping (1.0), AdamW
step, zero_grad: what orchestrator/train.py does per micro-batch (the optimizer as the trainer
builds it). Every contender trains the same model size, batch, sequence length and precision on
fresh random tokens (a pool of batches, rotated); our model and LlamaForCausalLM start from the
same weights, so their first losses agree (printed, as a check that they are the same model).

Timing: each contender first runs --warmup steps (torch.compile compiles there), then the timed
steps are taken in --rounds rounds that interleave the contenders (by default one step of each per
round, the order rotating every round), so that a machine shared with other work slows all of them
alike; besides the ratio of median tokens/s, the median over rounds of the per-round ratio (paired)
is reported. Per step: CUDA events on a GPU,
the wall clock (and the process's CPU time) on a CPU. Reported: the median step time and
tokens/s = batch x seq_len / median, per device (one process, one device); MFU = tokens/s x the
analytical training FLOPs per token (models/flops.py: 6N + attention, not counting recomputation)
/ the device's dense bf16/fp16 peak (orchestrator/devices.py: H100, H200, A100; unknown elsewhere,
and for fp32);
peak memory ("peak MiB"): each contender's own peak, over one training step, of the memory it
holds: its parameters, gradients and optimizer state, activations and temporaries. Every contender
stays resident during the run, so on a GPU it is torch.cuda.max_memory_allocated over that step
minus what the others hold (the allocated memory before the step less this contender's own
resident tensors), as if it ran alone (the shared input batches and library workspaces already
allocated aside); the process-wide figure is reported beside it. On a CPU (no
allocator statistics there): the peak of the tensors torch's MemTracker follows through one
forward + backward with the optimizer state resident, by kind (parameters, gradients, optimizer
state, activations, temporaries).

--sweep (for a GPU; runs anywhere): the largest micro-batch that trains without activation
checkpointing (doubling until out of memory, with the default kernels), then, at that micro-batch,
the best kernel set: one op at a time, every kernel that can run on this device, keeping the fastest,
then torch.compile on and off (--no-kernel-search: the micro-batch only).

--skip-unavailable: an --ours set naming a kernel that cannot run here (library missing, CPU) is
reported as skipped instead of stopping the comparison (benchmarks/gpu_suite.py uses it).

--curve N (for a GPU; runs anywhere): trains each --ours kernel set for N steps from the same
weights on the same learnable token stream (a fixed random successor table, 10% noise tokens), with
the trainer's optimizer and 20 warm-up steps, plus the all-eager model in --curve-reference
precision (default 32-true) as the yardstick of rounding noise. Reported per kernel set: the kernels
that ran (resolved on this device: `auto` names none), the loss at the end and the mean and largest
|loss - eager loss| over the last quarter of the steps, beside the same figures for
eager-in-the-reference-precision vs eager: a fused set "matches within bf16 noise" when its gap to
eager is no larger than twice that precision gap.

--json PATH writes every figure (with device, versions, the command and the ratios) for tools.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models import kernels  # noqa: E402
from models.config import KERNEL_FIELDS, model_config  # noqa: E402
from models.flops import flops_per_token  # noqa: E402
from models.llama import Llama  # noqa: E402
from orchestrator.config import Config  # noqa: E402
from orchestrator.devices import device_peak_flops, pick_device  # noqa: E402
from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from orchestrator.parallel.compile import compile_blocks  # noqa: E402
from orchestrator.training.optim import build_optimizer  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")

# Kernel sets for our model. `default`: the config defaults (what a run that sets nothing gets);
# `baseline`: the training path before fused kernels (SDPA, eager norms/RoPE/SwiGLU, logits + F.cross_entropy).
KERNEL_SETS = {
    "default": {},
    "baseline": dict(attention="sdpa", rmsnorm_kernel="eager", swiglu_kernel="eager", rope_kernel="eager",
                     loss_kernel="cross_entropy", compile=False),
    "eager": dict(attention="eager", rmsnorm_kernel="eager", swiglu_kernel="eager", rope_kernel="eager",
                  loss_kernel="cross_entropy", compile=False),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Contenders: something that builds a model and runs one training step
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Contender:
    name: str
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> mean loss
    optimizer: torch.optim.Optimizer
    info: dict[str, Any]


def parse_kernel_set(spec: str) -> dict[str, Any]:
    """`default`, `baseline`, `eager`, or `key=value,...` over the model's kernel fields (on top of default)."""
    if spec in KERNEL_SETS:
        return dict(KERNEL_SETS[spec])
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().removeprefix("model.")
        if key not in KERNEL_FIELDS:
            raise SystemExit(
                f"--ours {spec!r}: {key!r} is not a kernel field ({', '.join(KERNEL_FIELDS)})"
            )
        out[key] = value.strip().lower() == "true" if key == "compile" else value.strip()
    return out


def set_label(kernel_set: dict[str, Any]) -> str:
    for name, values in KERNEL_SETS.items():
        if values == kernel_set:
            return name
    return ",".join(f"{k}={v}" for k, v in kernel_set.items())


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimizer (orchestrator/training/optim.py build_optimizer) with its default settings."""
    return build_optimizer(model, Config())


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def build_ours(cfg, kernel_set: dict, device, precision, ac: str) -> Contender:
    mcfg = dataclasses.replace(cfg, **kernel_set)
    torch.manual_seed(0)
    with device:
        model = Llama(mcfg)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    apply_activation_checkpointing(model, ac)
    if mcfg.compile:
        compile_blocks(model)
    resolved = kernels.choose_kernels(
        mcfg, device, torch.bfloat16 if precision != "32-true" else torch.float32
    )

    def loss_fn(inputs, targets):
        with autocast(device, precision):
            return model(inputs, targets=targets)

    info = {
        "kernels": dataclasses.asdict(resolved),
        "compile": mcfg.compile,
        "activation_checkpointing": ac,
    }
    return Contender(f"ours[{set_label(kernel_set)}]", model, loss_fn, adamw(model), info)


def hf_available() -> str | None:
    try:  # transformers: an optional peer (the dev extra)
        import transformers

        return transformers.__version__
    except Exception:  # noqa: BLE001
        return None


def build_hf(cfg, device, precision, weights_from: torch.nn.Module | None) -> Contender:
    # transformers: an optional peer; orchestrator.tools.hf needs the data stack (sentencepiece,
    # safetensors), which this script does not otherwise require
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.tools.hf import hf_config, to_hf_state_dict

    fields = hf_config(cfg, torch.float32)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key, None)
    hf_cfg = LlamaConfig(
        **fields, attn_implementation="sdpa"
    )  # transformers' default where torch has SDPA
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(hf_cfg)
    if weights_from is not None:
        state = {k: v.float() for k, v in weights_from.state_dict().items()}
        model.load_state_dict(to_hf_state_dict(state, cfg), strict=False)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.train()

    def loss_fn(inputs, targets):
        with autocast(device, precision):
            # labels are already shifted: shift_labels tells transformers not to shift them again.
            return model(input_ids=inputs, labels=targets, shift_labels=targets).loss

    info = {"attn_implementation": "sdpa", "version": transformers.__version__}
    return Contender("hf LlamaForCausalLM", model, loss_fn, adamw(model), info)


def litgpt_available() -> str | None:
    try:  # litgpt: an optional peer
        import litgpt.model  # noqa: F401

        return version("litgpt")
    except Exception:  # noqa: BLE001
        return None


def build_litgpt(cfg, device, precision, seq_len: int) -> Contender:
    # litgpt: an optional peer
    from litgpt.config import Config as LitConfig
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    lit_cfg = LitConfig(
        name=f"llama-like-{cfg.name}", block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.d_model,
        n_query_groups=cfg.n_kv_heads, head_size=cfg.head_dim, rotary_percentage=1.0, parallel_residual=False,
        bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.ffn_hidden, rope_base=int(cfg.rope_base),
    )  # fmt: skip
    torch.manual_seed(0)
    with device:
        model = GPT(lit_cfg)
    model.max_seq_length = seq_len
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)

    def loss_fn(inputs, targets):
        with autocast(device, precision):
            return chunked_cross_entropy(model(inputs), targets)  # LitGPT's pretraining loss

    return Contender("litgpt GPT", model, loss_fn, adamw(model), {"version": litgpt_available()})


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(c: Contender, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = c.loss_fn(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), 1.0)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def tracked_peak(
    c: Contender, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, float | None]:
    """Peak tensor memory of one forward + backward (optimizer state resident), by kind, from torch's
    MemTracker (a dispatch mode that follows every tensor; works on CPUs, which have no allocator
    statistics): MiB of parameters, gradients, optimizer state, activations and temporaries at the
    peak, and the total."""
    try:  # torch's private API: absent from some builds
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return {"peak_mem_mib": None}
    tracker = MemTracker()
    tracker.track_external(c.model, c.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its module tracker warns about modules it cannot name
        with tracker:
            c.loss_fn(inputs, targets).backward()
    c.optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(peak.values()), {})
    out = {
        f"peak_{str(k).split('.')[-1].lower()}_mib": v / 2**20
        for k, v in per_device.items()
        if k != "Total"
    }
    out["peak_mem_mib"] = per_device.get("Total", 0) / 2**20
    return out


def measure(
    contenders: list[Contender],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    warmup: int,
    steps: int,
    rounds: int,
    log=print,
) -> dict[str, dict]:
    """Warm every contender up, then time `steps` steps of each in `rounds` interleaved rounds."""
    results: dict[str, dict] = {}
    for c in contenders:
        started = time.perf_counter()
        first = None
        for i in range(warmup):
            loss = train_step(c, *batches[i % len(batches)])
            first = float(loss) if first is None else first
        sync(device)
        results[c.name] = {"initial_loss": first, "warmup_s": time.perf_counter() - started,
                           "wall": [], "cpu": [], "losses": [], "round_wall": []}  # fmt: skip
        log(
            f"  warmed up {c.name}: {warmup} steps in {results[c.name]['warmup_s']:.1f} s, first loss {first:.4f}"
        )
    per_round = max(1, -(-steps // rounds))
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            timings = []
            for s in range(per_round):
                inputs, targets = batches[(r * per_round + s) % len(batches)]
                if device.type == "cuda":
                    start, end = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    start.record()
                    loss = train_step(c, inputs, targets)
                    end.record()
                    timings.append((start, end, None, loss))
                else:
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    loss = train_step(c, inputs, targets)
                    timings.append(
                        (time.perf_counter() - wall0, None, time.process_time() - cpu0, loss)
                    )
            sync(device)
            for a, b, cpu, loss in timings:
                results[c.name]["wall"].append(
                    a.elapsed_time(b) / 1e3 if device.type == "cuda" else a
                )
                if cpu is not None:
                    results[c.name]["cpu"].append(cpu)
                results[c.name]["losses"].append(float(loss))
            results[c.name]["round_wall"].append(
                statistics.median(results[c.name]["wall"][-per_round:])
            )
        if rounds <= 12 or (r + 1) % max(1, rounds // 8) == 0 or r + 1 == rounds:
            log(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{c.name} {results[c.name]['round_wall'][-1] * 1e3:.1f} ms" for c in contenders
                )
            )
    return results


MEMORY_DEFINITION = (
    "peak MiB: each contender's own peak over one training step (its parameters, gradients, "
    "optimizer state, activations, temporaries), the other contenders' resident memory excluded"
)


def resident_bytes(c: Contender) -> int:
    """Bytes of what the contender keeps between steps: parameters, buffers, gradients and optimizer
    state, each storage counted once (tied weights, views)."""
    tensors = [*c.model.parameters(), *c.model.buffers()]
    tensors += [p.grad for p in c.model.parameters() if p.grad is not None]
    for state in c.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def own_peak_bytes(process_peak: int, allocated_before: int, own_resident: int) -> int:
    """A contender's own peak: the process's peak over its step less what the others hold then
    (everything allocated before the step except the contender's own resident tensors)."""
    return process_peak - (allocated_before - own_resident)


def peak_memory(
    c: Contender, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> dict:
    """GPU: the contender's own peak over one step (see MEMORY_DEFINITION); CPU: MemTracker's peak
    over forward + backward (it follows this contender's tensors only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        sync(device)
        before, own = torch.cuda.memory_allocated(device), resident_bytes(c)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(c, *batch)
        sync(device)
        process_peak = torch.cuda.max_memory_allocated(device)
        return {
            "peak_mem_mib": own_peak_bytes(process_peak, before, own) / 2**20,
            "resident_mib": own / 2**20,
            "others_resident_mib": (before - own) / 2**20,
            "process_peak_mib": process_peak / 2**20,
            "memory_source": "cuda allocator (own peak: process peak - others' resident)",
        }
    return {**tracked_peak(c, *batch), "memory_source": "torch MemTracker"}


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s of this GPU, its name); None where unknown (CPUs, other GPUs, fp32)."""
    if device.type != "cuda":
        return None, platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device)
    if precision == "32-true":
        return None, name
    return device_peak_flops(name), name


def summarise(
    name: str, raw: dict, tokens_per_step: int, train_flops: float, peak: float | None
) -> dict:
    wall = sorted(raw["wall"])
    median = statistics.median(wall)
    q = statistics.quantiles(wall, n=10) if len(wall) >= 2 else [median] * 9
    out = {
        "name": name,
        "steps_timed": len(wall),
        "step_s_median": median,
        "step_s_p10": q[0],
        "step_s_p90": q[-1],
        "tokens_per_s": tokens_per_step / median,
        "mfu": tokens_per_step / median * train_flops / peak if peak else None,
        "initial_loss": raw["initial_loss"],
        "last_loss": raw["losses"][-1] if raw["losses"] else None,
        "warmup_s": raw["warmup_s"],
    }
    if raw["cpu"]:
        cpu = statistics.median(raw["cpu"])
        out.update(cpu_s_median=cpu, tokens_per_cpu_s=tokens_per_step / cpu)
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}  # fmt: skip
    for pkg in (
        "transformers",
        "litgpt",
        "lightning",  # the GPU machine's (lightning.fabric is lightning_fabric there too)
        "lightning-fabric",
        "flash-attn",
        "xformers",
        "liger-kernel",
        "triton",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def report_header(mode: str, device: torch.device, device_name: str) -> dict[str, Any]:
    """What every report (compare, sweep, curve) starts with: when, how, where, with what."""
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": device.type,
        "device_name": device_name,
        "versions": versions(),
        "kernel_libraries": kernels.installed(),
    }


def make_batches(cfg, batch: int, seq_len: int, device: torch.device, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def model_cfg(args):
    overrides: dict[str, Any] = {}
    base = model_config(args.model)
    for item in args.override:
        key, _, value = item.partition("=")
        if not hasattr(base, key):
            raise SystemExit(f"--override {item!r}: model has no field {key!r}")
        kind = type(getattr(base, key))
        overrides[key] = value.lower() == "true" if kind is bool else kind(value)
    cfg = model_config(args.model, **overrides)
    if args.seq_len > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=args.seq_len)
    return cfg


def run_compare(args, device, log=print) -> dict:
    cfg = model_cfg(args)
    tokens_per_step = args.batch * args.seq_len
    train_flops = flops_per_token(cfg, args.seq_len)["training"]
    peak, device_name = peak_flops(device, args.precision)
    batches = make_batches(cfg, args.batch, args.seq_len, device)

    contenders: list[Contender] = []
    skipped = {}
    for spec in args.ours.split(";"):
        try:
            contenders.append(
                build_ours(cfg, parse_kernel_set(spec), device, args.precision, args.ac)
            )
        except kernels.KernelUnavailable as e:  # a kernel this machine cannot run, named in the set
            if not args.skip_unavailable:
                raise
            skipped[f"ours[{spec}]"] = str(e)
            log(f"  ours[{spec}]: skipped ({e})")
    if not contenders:
        raise SystemExit(f"no --ours kernel set can run here: {skipped}")
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if "hf" in peers:
        if hf_available():
            try:
                contenders.append(
                    build_hf(cfg, device, args.precision, weights_from=contenders[0].model)
                )
            except ImportError as e:  # orchestrator.tools.hf's own imports (sentencepiece, ...)
                skipped["hf"] = f"{type(e).__name__}: {e}"
        else:
            skipped["hf"] = "transformers is not installed"
    if "litgpt" in peers:
        if litgpt_available():
            contenders.append(build_litgpt(cfg, device, args.precision, args.seq_len))
        else:
            skipped["litgpt"] = "litgpt is not installed"

    log(f"{cfg.name}: {cfg.num_params():,} parameters | batch {args.batch} x seq {args.seq_len} | {args.precision} | "
        f"{device_name} ({device.type}, {torch.get_num_threads()} threads)")  # fmt: skip
    raw = measure(contenders, batches, device, args.warmup, args.steps, args.rounds, log=log)
    rows = []
    for c in contenders:
        row = summarise(c.name, raw[c.name], tokens_per_step, train_flops, peak)
        row.update(peak_memory(c, batches[0], device))
        row["info"] = c.info
        rows.append(row)
    ratios = {}
    by_name = {r["name"]: r for r in rows}
    for peer in ("hf LlamaForCausalLM", "litgpt GPT"):
        if peer in by_name:
            for r in rows:
                if r["name"].startswith("ours"):
                    key = f"{r['name']} / {peer}"
                    ratios[key] = r["tokens_per_s"] / by_name[peer]["tokens_per_s"]
                    ratios[key + " (paired per round)"] = statistics.median(
                        b / a for a, b in zip(raw[r["name"]]["round_wall"], raw[peer]["round_wall"])
                    )
                    if "tokens_per_cpu_s" in r:
                        ratios[key + " (cpu time)"] = (
                            r["tokens_per_cpu_s"] / by_name[peer]["tokens_per_cpu_s"]
                        )
    return {
        **report_header("compare", device, device_name),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "config": {"model": cfg.name, "params": cfg.num_params(), "batch": args.batch, "seq_len": args.seq_len,
                   "precision": args.precision, "activation_checkpointing": args.ac, "warmup": args.warmup,
                   "steps": args.steps, "rounds": args.rounds,
                   "model_fields": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in KERNEL_FIELDS}},
        "train_flops_per_token": train_flops,
        "peak_flops": peak,
        "results": rows,
        "memory_definition": MEMORY_DEFINITION,
        "ratios": ratios,
        "skipped_peers": skipped,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def print_table(report: dict, out=print) -> None:
    rows = report["results"]
    peer = next((r for r in rows if r["name"] == "hf LlamaForCausalLM"), None)
    out("")
    out(f"{'contender':<34} {'tokens/s':>10} {'step ms (p10-p90)':>24} {'MFU':>7} {'peak MiB':>9} {'act MiB':>9} "
        f"{'loss0':>7} {'vs HF':>6}")  # fmt: skip
    for r in rows:
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "unknown"
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        span = f"{r['step_s_median'] * 1e3:.1f} ({r['step_s_p10'] * 1e3:.0f}-{r['step_s_p90'] * 1e3:.0f})"
        act = f"{r['peak_act_mib']:.0f}" if r.get("peak_act_mib") is not None else "-"
        out(f"{r['name']:<34} {r['tokens_per_s']:>10,.0f} {span:>24} {mfu:>7} {mem:>9} {act:>9} "
            f"{r['initial_loss']:>7.3f} {ratio:>6}")  # fmt: skip
    out(f"  {report.get('memory_definition', MEMORY_DEFINITION)}")
    for key, value in report["ratios"].items():
        out(f"  ratio {key}: {value:.3f}")
    for peer_name, why in report.get("skipped_peers", {}).items():
        out(f"  {peer_name}: skipped ({why})")


# --------------------------------------------------------------------------------------------
# Sweep: largest micro-batch without activation checkpointing, then the best kernel set
# --------------------------------------------------------------------------------------------


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(c: Contender | None = None) -> None:
    del c
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokens_per_s(cfg, kernel_set, device, args, batch, steps) -> float:
    c = build_ours(cfg, kernel_set, device, args.precision, "none")
    batches = make_batches(cfg, batch, args.seq_len, device, n=2)
    try:
        raw = measure([c], batches, device, args.warmup, steps, 1, log=lambda *_: None)
        return batch * args.seq_len / statistics.median(raw[c.name]["wall"])
    finally:
        c.model.zero_grad(set_to_none=True)
        _free(c)


def run_sweep(args, device, log=print) -> dict:
    cfg = model_cfg(args)
    tried_batches = {}
    best_batch = None
    batch = 1
    while batch <= args.max_batch:
        try:
            tps = tokens_per_s(cfg, {}, device, args, batch, steps=max(2, args.steps // 4))
            tried_batches[batch] = tps
            best_batch = batch
            log(f"  micro-batch {batch}: fits, {tps:,.0f} tokens/s")
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                raise
            tried_batches[batch] = None
            log(f"  micro-batch {batch}: out of memory")
            break
        batch *= 2
    _free()  # the out-of-memory attempt's model is unreachable only now (its traceback held it)
    if best_batch is None:
        raise SystemExit("not even micro-batch 1 fits without activation checkpointing")
    peak, device_name = peak_flops(device, args.precision)
    train_flops = flops_per_token(cfg, args.seq_len)["training"]
    header = {
        **report_header("sweep", device, device_name),
        "config": {"model": cfg.name, "seq_len": args.seq_len, "precision": args.precision},
        "micro_batches": {str(k): v for k, v in tried_batches.items()},
        "largest_micro_batch": best_batch,
    }
    if args.no_kernel_search:
        best = tried_batches[best_batch]
        return {**header, "best_kernels": {}, "best_tokens_per_s": best,
                "best_mfu": best * train_flops / peak if peak else None, "tried": []}  # fmt: skip
    dtype = torch.bfloat16 if args.precision != "32-true" else torch.float32
    options = {
        "attention": ["sdpa", "flash_attn", "xformers"],
        "rmsnorm_kernel": ["eager", "liger", "flash_attn"],
        "swiglu_kernel": ["eager", "liger", "flash_attn", "xformers"],
        "rope_kernel": ["eager", "liger", "flash_attn"],
        "loss_kernel": ["cross_entropy", "chunked", "liger_fused", "liger", "flash_attn"],
    }
    op_of = {"attention": "attention", "rmsnorm_kernel": "rmsnorm", "swiglu_kernel": "swiglu",
             "rope_kernel": "rope", "loss_kernel": "loss"}  # fmt: skip
    current = dict(KERNEL_SETS["baseline"])
    tried: list[dict] = []
    best = tokens_per_s(cfg, current, device, args, best_batch, args.steps)
    tried.append({"kernels": dict(current), "tokens_per_s": best})
    log(f"  baseline {set_label(current)}: {best:,.0f} tokens/s")
    for field, choices in options.items():
        for choice in choices:
            if (
                choice == current[field]
                or kernels.why_not(op_of[field], choice, device.type, dtype) is not None
            ):
                continue
            candidate = dict(current, **{field: choice})
            try:
                tps = tokens_per_s(cfg, candidate, device, args, best_batch, args.steps)
            except Exception as e:  # noqa: BLE001 - a kernel that fails here is reported, not chosen
                if not _oom(e):
                    log(f"  {field}={choice}: failed ({type(e).__name__}: {str(e)[:120]})")
                    tried.append({"kernels": candidate, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                tps = 0.0
            tried.append({"kernels": candidate, "tokens_per_s": tps})
            log(f"  {field}={choice}: {tps:,.0f} tokens/s")
            if tps > best:
                best, current = tps, candidate
    if not args.no_compile_in_sweep:
        candidate = dict(current, compile=True)
        tps = tokens_per_s(cfg, candidate, device, args, best_batch, args.steps)
        tried.append({"kernels": candidate, "tokens_per_s": tps})
        log(f"  compile=true: {tps:,.0f} tokens/s")
        if tps > best:
            best, current = tps, candidate
    return {
        **header,
        "best_kernels": current,
        "best_tokens_per_s": best,
        "best_mfu": best * train_flops / peak if peak else None,
        "tried": tried,
    }


# --------------------------------------------------------------------------------------------
# Loss curves: do the fused kernels train like the eager reference?
# --------------------------------------------------------------------------------------------


def successor_batches(
    vocab: int, batch: int, seq_len: int, steps: int, device: torch.device, seed: int = 7
):
    """`steps` batches of a learnable stream: each token is followed by its fixed random successor,
    except 10% of positions, which are uniform noise (the loss can fall from ln V to about
    0.33 + 0.1 ln V, 1.36 for V = 32000)."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        noisy = torch.rand(batch, seq_len, generator=g) < 0.1
        noise = torch.randint(0, vocab, (batch, seq_len), generator=g)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.where(noisy[:, t], noise[:, t], successor[tokens[:, t]])
        yield tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def train_curve(c: Contender, cfg, args, device, log=print) -> list[float]:
    warmup = torch.optim.lr_scheduler.LambdaLR(c.optimizer, lambda step: min(1.0, (step + 1) / 20))
    losses = []
    for step, (inputs, targets) in enumerate(successor_batches(cfg.vocab_size, args.batch, args.seq_len,
                                                               args.curve, device)):  # fmt: skip
        losses.append(float(train_step(c, inputs, targets)))
        warmup.step()
        if step % max(1, args.curve // 8) == 0 or step + 1 == args.curve:
            log(f"  {c.name} step {step}: loss {losses[-1]:.4f}")
    return losses


def curve_gap(losses: list[float], reference: list[float]) -> dict[str, float]:
    """Mean and largest |losses - reference| over the last quarter of the steps."""
    tail = max(1, len(losses) // 4)
    gaps = [abs(a - b) for a, b in zip(losses[-tail:], reference[-tail:])]
    return {"mean_abs_gap": statistics.fmean(gaps), "max_abs_gap": max(gaps)}


def run_curve(args, device, log=print) -> dict:
    cfg = model_cfg(args)
    specs = args.ours.split(";")
    if "eager" not in specs:
        specs.append("eager")
    curves: dict[str, list[float]] = {}
    ran: dict[str, dict] = {}  # each curve's kernels as resolved here (`auto` names none of them)
    for spec in specs:
        c = build_ours(cfg, parse_kernel_set(spec), device, args.precision, args.ac)
        curves[c.name] = train_curve(c, cfg, args, device, log)
        ran[c.name] = {"kernels": c.info["kernels"], "compile": c.info["compile"]}
        _free(c)
    reference_name = f"ours[eager] {args.curve_reference}"
    c = build_ours(cfg, KERNEL_SETS["eager"], device, args.curve_reference, args.ac)
    c.name = reference_name
    curves[reference_name] = train_curve(c, cfg, args, device, log)
    ran[reference_name] = {"kernels": c.info["kernels"], "compile": c.info["compile"]}
    _free(c)
    eager = curves["ours[eager]"]
    noise = curve_gap(curves[reference_name], eager)
    rows = []
    for name, losses in curves.items():
        row = {"name": name, "first_loss": losses[0], "final_loss": losses[-1], **ran[name]}
        if name not in ("ours[eager]", reference_name):
            row.update(curve_gap(losses, eager))
            row["within_noise"] = row["mean_abs_gap"] <= 2 * noise["mean_abs_gap"]
        rows.append(row)
    return {
        **report_header("curve", device, peak_flops(device, args.precision)[1]),
        "config": {
            "model": cfg.name,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "precision": args.precision,
            "steps": args.curve,
            "reference_precision": args.curve_reference,
        },  # fmt: skip
        "noise": {"vs": f"{reference_name} vs ours[eager]", **noise},
        "results": rows,
        "losses": curves,
    }


def print_curve(report: dict, out=print) -> None:
    noise = report["noise"]
    out("")
    out(
        f"{'kernel set':<44} {'first':>8} {'final':>8} {'mean |gap|':>11} {'max |gap|':>10}  verdict"
    )
    for r in report["results"]:
        gaps = (
            (
                f"{r['mean_abs_gap']:>11.4f} {r['max_abs_gap']:>10.4f}  "
                + ("within noise" if r["within_noise"] else "OUTSIDE noise")
            )
            if "mean_abs_gap" in r
            else ""
        )
        out(f"{r['name']:<44} {r['first_loss']:>8.4f} {r['final_loss']:>8.4f} {gaps}")
        if "kernels" in r:
            ran = ", ".join(f"{op}={k}" for op, k in r["kernels"].items())
            out(f"    ran: {ran}" + (", compiled" if r.get("compile") else ""))
    out(
        f"  noise yardstick ({noise['vs']}, last quarter): mean |gap| {noise['mean_abs_gap']:.4f}, "
        f"max {noise['max_abs_gap']:.4f}; within noise = mean |gap| <= 2 x that"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="named size (default: tinyllama-1.1b on a GPU, llama-20m on a CPU)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="model field override, e.g. n_layers=4 (repeatable)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="micro-batch (default: 8 on a GPU, 4 on a CPU)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length (default: 2048 on a GPU, 256 on a CPU)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="default: bf16-mixed on a GPU, 32-true on a CPU",
    )
    p.add_argument(
        "--ours",
        default="default",
        help="our kernel sets, ';'-separated: default | baseline | eager | key=value,... "
        "(e.g. 'default;baseline' or 'attention=sdpa,loss_kernel=chunked,compile=true')",
    )
    p.add_argument(
        "--ac",
        choices=("none", "selective", "full"),
        default="none",
        help="activation checkpointing",
    )
    p.add_argument("--peers", default="hf,litgpt", help="comma list of hf, litgpt (or none)")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per contender (compilation happens here)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per contender (default: 50 GPU, 12 CPU)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (default: --steps, one step each)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument(
        "--sweep", action="store_true", help="find the largest micro-batch and the best kernel set"
    )
    p.add_argument("--max-batch", type=int, default=64, help="sweep: largest micro-batch to try")
    p.add_argument(
        "--no-compile-in-sweep", action="store_true", help="sweep: do not try torch.compile"
    )
    p.add_argument(
        "--no-kernel-search",
        action="store_true",
        help="sweep: stop after the largest micro-batch (default kernels), no kernel search",
    )
    p.add_argument(
        "--skip-unavailable",
        action="store_true",
        help="compare: report an --ours set naming a kernel that cannot run here as skipped "
        "instead of failing",
    )
    p.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="N",
        help="train each --ours set (and eager) N steps on a learnable stream and compare loss curves",
    )
    p.add_argument(
        "--curve-reference",
        choices=PRECISIONS,
        default="32-true",
        help="curve: precision of the eager run that measures rounding noise",
    )
    args = p.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    args.model = args.model or ("tinyllama-1.1b" if gpu else "llama-20m")
    args.batch = args.batch or (8 if gpu else 4)
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.steps = args.steps or (50 if gpu else 12)
    args.rounds = args.rounds or args.steps
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not args.curve:  # the curve's fp32 yardstick stays true fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.curve:
        report = run_curve(args, device)
        print_curve(report)
    elif args.sweep:
        report = run_sweep(args, device)
        print(
            f"\nlargest micro-batch without activation checkpointing: {report['largest_micro_batch']}"
        )
        label = "default kernels at that micro-batch" if args.no_kernel_search else (
            f"best kernel set: {report['best_kernels']}")  # fmt: skip
        print(f"{label} -> {report['best_tokens_per_s']:,.0f} tokens/s"
              + (f", MFU {100 * report['best_mfu']:.1f}%" if report["best_mfu"] else ""))  # fmt: skip
    else:
        report = run_compare(args, device)
        print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nfigures written to {args.json}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
