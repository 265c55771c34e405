"""Plan a compute-optimal run (Chinchilla, arXiv 2203.15556).

    orchestrator plan --gpu-hours 2000 --device h100 [--gpus 8] [--mfu 0.4]
    orchestrator plan --params 1.1B --device h100 --gpus 8
    orchestrator plan --model llama-400m --device a100 --tokens-per-sec 60000

C ~= 6 N D and D ~= 20 N, the nearest named decoder size, the wall time from the measured
throughput (orchestrator/resources/throughput.md, or `--results FILE`), and with `--gpus` > 1 the
strategy comparison (`strategy_costs`): docs/studies.md and docs/distributed.md.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from data.util import parse_count
from models.config import SIZES, model_config, paired_size
from models.flops import flops_per_token
from orchestrator.devices import device_names, device_peak_flops

DEFAULT_RESULTS = files("orchestrator") / "resources" / "throughput.md"  # package data
TOKENS_PER_PARAM = 20.0
DEFAULT_MFU = 0.40
PLAN_SEQ_LEN = 2048


def compute_optimal(
    flops: float, tokens_per_param: float = TOKENS_PER_PARAM
) -> tuple[float, float]:
    """(N, D) with 6 N D = flops and D = tokens_per_param x N."""
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def decoder_sizes() -> list[str]:
    """The named sizes of the decoder-only family (model.arch decoder), in ladder order."""
    return [name for name in SIZES if model_config(name).arch == "decoder"]


def named_sizes() -> dict[str, int]:
    """Parameter count of every named decoder size with Llama-2's vocabulary (the sample corpus's
    `tiny` and `micro-*`, 1,024 tokens, left out: no plan trains those on a cluster)."""
    return {
        name: model_config(name).num_params()
        for name in decoder_sizes()
        if model_config(name).vocab_size >= 32000
    }


def nearest_size(params: float) -> str:
    sizes = named_sizes()
    return min(sizes, key=lambda name: abs(math.log(sizes[name] / params)))


def training_flops_per_token(name: str, seq_len: int = PLAN_SEQ_LEN) -> float:
    """Training FLOPs per token of a named size, with attention (models/flops.py)."""
    return flops_per_token(model_config(name), seq_len)["training"]


@dataclass
class Measured:
    model: str
    device: str
    tokens_per_sec: float  # per GPU
    source: str


def _number(cell: str) -> float | None:
    """'45,455' -> 45455; '44,000-46,000' -> 45000; '41.8%' -> 41.8; '-' -> None."""
    values = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", cell)]
    return sum(values) / len(values) if values else None


def read_results(path: str | Path | Traversable = DEFAULT_RESULTS) -> list[Measured]:
    """Throughput rows of the markdown tables in a results file: a table whose header has a model
    column, a device / GPU column and a tokens/s column (per GPU, or a total with a GPU count).
    A file that does not exist has none."""
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
    if not path.is_file():
        return []
    rows: list[Measured] = []
    header: list[str] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator line
        cols = dict(zip(header, cells, strict=False))
        model = next((v for k, v in cols.items() if "model" in k or k in ("size", "name")), None)
        device = next(
            (v for k, v in cols.items() if "device" in k or "gpu" == k or k.startswith("hardware")),
            None,
        )
        tps_key = next((k for k in cols if re.search(r"tok\w*\s*/\s*s", k)), None)
        if model is None or device is None or tps_key is None:
            continue
        tps = _number(cols[tps_key])
        if tps is None:
            continue
        if (
            "gpu" not in tps_key and "device" not in tps_key
        ):  # a total: divide by the GPU count if given
            gpus = next(
                (_number(v) for k, v in cols.items() if k in ("gpus", "devices", "world size")),
                None,
            )
            tps /= gpus or 1
        rows.append(Measured(model=model, device=device, tokens_per_sec=tps, source=str(path)))
    return rows


def size_of(model_cell: str) -> str | None:
    """The named size a results row is about: its name appears in the cell as a whole word, not
    inside another name ("tiny" is not in "redllm-tiny" or "tinyllama-1.1b"). Of both families;
    see `decoder_size_of`."""
    cell = model_cell.lower()
    matches = [
        name
        for name in SIZES
        if re.search(rf"(?<![\w.-]){re.escape(name.lower())}(?![\w]|\.\d)", cell)
    ]
    return max(matches, key=len) if matches else None


def decoder_size_of(model_cell: str) -> str | None:
    """The named decoder size a results row is about (None for an encoder-decoder's row)."""
    name = size_of(model_cell)
    return name if name is not None and model_config(name).arch == "decoder" else None


def throughput(
    name: str,
    device: str | None,
    tokens_per_sec: float | None = None,
    mfu: float | None = None,
    results: str | Path | Traversable = DEFAULT_RESULTS,
) -> tuple[float | None, str]:
    """Tokens/s per GPU for named size `name` on `device`, and where the figure comes from."""
    if tokens_per_sec:
        return tokens_per_sec, "given on the command line"
    peak = device_peak_flops(device) if device else None
    fpt = training_flops_per_token(name)
    if device and mfu is None:
        rows = [
            r
            for r in read_results(results)
            if device.lower().replace("-", " ") in r.device.lower().replace("-", " ")
        ]
        same = [r for r in rows if decoder_size_of(r.model) == name]
        if same:
            r = same[0]
            return r.tokens_per_sec, f"measured, {Path(r.source).name}: {r.model} on {r.device}"
        other = [r for r in rows if decoder_size_of(r.model)]
        if other and peak:
            r = other[0]
            measured_mfu = (
                r.tokens_per_sec * training_flops_per_token(decoder_size_of(r.model)) / peak
            )
            return (
                measured_mfu * peak / fpt,
                f"MFU {100 * measured_mfu:.0f}% measured with {r.model} on {r.device} ({Path(r.source).name})",
            )
    if peak:
        use = DEFAULT_MFU if mfu is None else mfu
        how = "given" if mfu is not None else "assumed, no measurement for this device"
        return use * peak / fpt, f"MFU {100 * use:.0f}% ({how}) x {peak / 1e12:.0f} TFLOP/s peak"
    return None, "unknown device and no --tokens-per-sec: no wall time"


def make_plan(
    gpu_hours: float | None = None,
    device: str | None = None,
    params: float | None = None,
    model: str | None = None,
    flops: float | None = None,
    gpus: int = 1,
    gpus_per_node: int | None = None,
    micro_batches: int = 1,
    mfu: float | None = None,
    tokens_per_sec: float | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    results: str | Path | Traversable = DEFAULT_RESULTS,
) -> dict[str, Any]:
    """The plan as a dict (see `format_plan`). Give exactly one of gpu_hours (with device), params,
    model and flops."""
    given = [x is not None for x in (gpu_hours, params, model, flops)]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of --gpu-hours (with --device), --params, --model, --flops"
        )
    if model is not None and model_config(model).arch != "decoder":
        pair = paired_size(model)
        raise ValueError(
            f"--model {model} is an encoder-decoder (model.arch {model_config(model).arch}): "
            "`orchestrator plan` sizes decoder-only runs (Chinchilla's 6 N D, D = 20 N)"
            + (f"; plan its decoder partner instead: --model {pair}" if pair else "")
        )
    plan: dict[str, Any] = {"tokens_per_param": tokens_per_param, "device": device, "gpus": gpus}
    if gpu_hours is not None:
        peak = device_peak_flops(device) if device else None
        if peak is None:
            raise ValueError(
                f"--gpu-hours needs a --device with a known peak ({', '.join(device_names())}); "
                "or give --flops"
            )
        use_mfu = mfu
        source = "given" if mfu is not None else "assumed"
        if mfu is None and not tokens_per_sec:
            rows = [
                r
                for r in read_results(results)
                if device.lower() in r.device.lower() and decoder_size_of(r.model)
            ]
            if rows:
                r = rows[0]
                use_mfu = (
                    r.tokens_per_sec * training_flops_per_token(decoder_size_of(r.model)) / peak
                )
                source = f"measured with {r.model} ({Path(r.source).name})"
        use_mfu = DEFAULT_MFU if use_mfu is None else use_mfu
        flops = gpu_hours * 3600 * peak * use_mfu
        plan.update(
            budget=f"{gpu_hours:,.0f} {device.upper()} GPU-hours at {100 * use_mfu:.0f}% MFU ({source})"
        )
    if flops is not None:
        n, d = compute_optimal(flops, tokens_per_param)
        plan.setdefault("budget", f"{flops:.3g} FLOPs")
        plan.update(flops=flops, optimal_params=n, optimal_tokens=d)
    else:
        n = float(model_config(model).num_params()) if model else parse_count(params)
        d = tokens_per_param * n
        plan.update(
            flops=6 * n * d,
            optimal_params=n,
            optimal_tokens=d,
            budget=f"model size {model or f'{n:,.0f} parameters'}",
        )
    name = model or nearest_size(plan["optimal_params"])
    n_named = model_config(name).num_params()
    tps, tps_source = throughput(name, device, tokens_per_sec, mfu, results)
    plan.update(tokens_per_sec_per_gpu=tps, throughput_source=tps_source)
    # A budget: the named size spends all of it (GPU-hours x its throughput, or FLOPs / 6N).
    # A size: its own tokens_per_param x N.
    if gpu_hours is not None and tps:
        d_named = gpu_hours * 3600 * tps
    elif params is None and model is None:
        d_named = plan["flops"] / (6 * n_named)
    else:
        d_named = tokens_per_param * n_named
    plan.update(
        model=name, model_params=n_named, model_tokens=d_named, model_flops=6 * n_named * d_named
    )
    ratio = plan["optimal_params"] / n_named
    if ratio > 1.5 or ratio < 1 / 1.5:
        plan["note"] = (
            f"the compute-optimal size is {ratio:.1f}x {name}; the nearest named size is "
            f"{'over' if ratio > 1 else 'under'}-trained for this budget (define a custom size with "
            "--model.n_layers / --model.d_model / ... to match it)"
        )
    if tps:
        seconds = d_named / (tps * gpus)
        plan.update(wall_seconds=seconds, gpu_hours_needed=seconds * gpus / 3600)
    if gpus > 1:
        per_node = min(gpus_per_node or 8, gpus)
        plan.update(
            gpus_per_node=per_node,
            micro_batches=micro_batches,
            strategies=[vars(c) for c in strategy_costs(n_named, gpus, per_node, micro_batches)],
            strategy=recommend_strategy(n_named, gpus, per_node, device, micro_batches),
        )
    return plan


# Training state per parameter under bf16-mixed with AdamW, as each strategy holds it: fp32
# weights (4 B), fp32 gradients (4 B), Adam's two fp32 moments (8 B) = 16 B, replicated or
# sharded. DDP adds its gradient buckets (4 B: gradients are copied into them to be all-reduced).
# DeepSpeed keeps bf16 weights and gradients beside fp32 master weights and moments (the ZeRO
# paper's 2 + 2 + 12 B). Activations come on top (the same under every strategy).
# GPU memory of the tabulated devices (data sheets; A100: the 80 GB part).
GPU_MEMORY_GB = {
    "H100": 80, "H100 PCIe": 80, "H100 NVL": 94, "H200": 141, "H200 NVL": 141,
    "B200": 180, "GB200": 186, "L40S": 48, "A100": 80,
}  # fmt: skip
STATE_SHARE = 0.5  # DDP is advised while its state takes at most half the GPU (activations)


@dataclass
class StrategyCost:
    name: str  # as configured: "ddp", "fsdp", "fsdp, fsdp_shard_size G (HSDP ...)", "deepspeed ZeRO-n"
    state_bytes: float  # per GPU: weights, gradients and optimizer state
    gpu_bytes: float  # sent by each GPU per step, all its collectives
    node_bytes: float  # sent by each node to the other nodes per step (0 on one node)
    memory: str  # the formulas
    traffic: str


def strategy_costs(
    params: float, gpus: int, gpus_per_node: int, micro_batches: int = 1
) -> list[StrategyCost]:
    """Per-GPU training state and per-step traffic of each strategy for `params` parameters on
    `gpus` GPUs, `gpus_per_node` per node (HSDP: shard groups of one node), `micro_batches` per
    GPU and step (gradient accumulation: gradients are reduced once per step, except by ZeRO-2/3,
    weights are gathered for every micro-batch).

    Ring collectives over k ranks: an all-gather or a reduce-scatter of X bytes sends X (k-1)/k per
    rank, an all-reduce 2 X (k-1)/k. A ring over ranks laid out node after node crosses each node
    boundary once, carrying what one rank sends: a node sends V (the per-rank volume) to other
    nodes for each ring of its ranks that spans nodes (HSDP: G rings, one per local rank)."""
    p, w, a = float(params), gpus, micro_batches
    g = min(gpus_per_node, w)
    spans = w > g

    def frac(k: int) -> float:
        return (k - 1) / k

    def world(per_rank: float) -> tuple[float, float]:  # one collective over all W ranks
        return per_rank, per_rank if spans else 0.0

    rows = [
        StrategyCost(
            "ddp", 20 * p, *world(8 * p * frac(w)),
            "20 B x N (16 + 4 of gradient buckets)", "all-reduce of fp32 grads: 2 x 4N (W-1)/W",
        ),
        # FSDP2: bf16 weights all-gathered in forward and again in backward (reshard_after_forward)
        # for every micro-batch; fp32 gradients reduce-scattered once per step.
        StrategyCost(
            "fsdp", 16 * p / w, *world((4 * a + 4) * p * frac(w)),
            "16 B x N / W", "2 all-gathers of bf16 weights per micro-batch + reduce-scatter of "
            "fp32 grads: (4A + 4) N (W-1)/W",
        ),
    ]  # fmt: skip
    if spans and w % g == 0:
        # HSDP over nodes: FSDP's collectives inside the node; across nodes, each rank all-reduces
        # its fp32 gradient shard (N/G parameters) with the R-1 other replicas' (G rings per node).
        r = w // g
        across = 8 * p / g * frac(r)
        rows.append(
            StrategyCost(
                f"fsdp, fsdp_shard_size {g} (HSDP {r} x {g})", 16 * p / g,
                (4 * a + 4) * p * frac(g) + across, g * across,
                "16 B x N / G", "FSDP's inside the node, (4A + 4) N (G-1)/G; across nodes, "
                "all-reduce of the fp32 grad shard, 2 x 4N/G (R-1)/R per GPU = 8N (R-1)/R per node",
            )
        )  # fmt: skip
    # ZeRO (DeepSpeed, bf16): 1 and 2 reduce-scatter bf16 gradients and all-gather the updated bf16
    # weights (the ZeRO paper: DDP's element count); 2 reduces every micro-batch (its gradients are
    # partitioned as they are produced); 3 gathers weights twice per micro-batch as FSDP does.
    for stage, state, memory, per_rank, traffic in (
        (1, (4 + 12 / w) * p, "(2 + 2 + 12/W) B x N", 4 * p * frac(w),
         "reduce-scatter of bf16 grads + all-gather of bf16 weights: 2 x 2N (W-1)/W"),
        (2, (2 + 14 / w) * p, "(2 + 14/W) B x N", (2 * a + 2) * p * frac(w),
         "reduce-scatter of bf16 grads per micro-batch + all-gather of bf16 weights: (2A + 2) N (W-1)/W"),
        (3, 16 * p / w, "16 B x N / W", 6 * a * p * frac(w),
         "per micro-batch, 2 all-gathers of bf16 weights + reduce-scatter of bf16 grads: 6A N (W-1)/W"),
    ):  # fmt: skip
        rows.append(
            StrategyCost(f"deepspeed ZeRO-{stage}", state, *world(per_rank), memory, traffic)
        )
    return rows


def recommend_strategy(
    params: float, gpus: int, gpus_per_node: int, device: str | None, micro_batches: int = 1
) -> str:
    """Which strategy to configure, and why (the reasoning: docs/distributed.md)."""
    if gpus <= 1:
        return "single (one GPU)"
    memory = gpu_memory_gb(device) or 80  # an 80 GB GPU unless the device says otherwise
    budget = STATE_SHARE * memory * 1e9
    ddp, fsdp, *rest = strategy_costs(params, gpus, gpus_per_node, micro_batches)
    g = min(gpus_per_node, gpus)
    if gpus <= g:
        if ddp.state_bytes <= budget:
            return (
                f"ddp: its {ddp.state_bytes / 1e9:.1f} GB of state per GPU fit in half of {memory} GB; "
                f"fsdp ({fsdp.state_bytes / 1e9:.1f} GB) when activations need the room"
            )
        return f"fsdp: DDP's {ddp.state_bytes / 1e9:.1f} GB per GPU leave too little of {memory} GB"
    hsdp = rest[0] if rest and "HSDP" in rest[0].name else None
    if hsdp is not None and hsdp.state_bytes <= budget:
        return (
            f"fsdp with strategy.fsdp_shard_size {g} (HSDP): {hsdp.state_bytes / 1e9:.1f} GB of "
            f"state per GPU; across nodes only a gradient all-reduce per step, "
            f"{hsdp.node_bytes / 1e9:.2f} GB per node that overlaps backward, where FSDP sends "
            f"{fsdp.node_bytes / 1e9:.2f} GB, its weight all-gathers in the forward's path"
        )
    return (
        "fsdp (full sharding): a node's GPUs cannot hold the state with room for activations"
        if gpus % g == 0
        else f"fsdp (full sharding): {gpus} GPUs are not whole nodes of {g} (HSDP needs that)"
    )


def gpu_memory_gb(device: str | None) -> float | None:
    if not device:
        return None
    name = device.lower().replace("-", " ").replace("_", " ")
    matches = [k for k in GPU_MEMORY_GB if k.lower() in name]
    return GPU_MEMORY_GB[max(matches, key=len)] if matches else None


def format_strategies(plan: dict[str, Any]) -> list[str]:
    rows = plan.get("strategies")
    if not rows:
        return []
    lines = [
        f"Strategies:      {plan['model']} on {plan['gpus']} GPU(s), {plan['gpus_per_node']} per node, "
        f"{plan['micro_batches']} micro-batch(es) per GPU and step; state = weights + grads + AdamW "
        "(activations extra); docs/distributed.md",
        f"  {'strategy':<37} {'state/GPU':>9} {'sent/GPU/step':>14} {'node->nodes/step':>17}",
    ]
    for r in rows:
        lines.append(
            f"  {r['name']:<37} {r['state_bytes'] / 1e9:>7.1f}GB {r['gpu_bytes'] / 1e9:>12.2f}GB "
            f"{r['node_bytes'] / 1e9:>15.2f}GB"
        )
    lines.append(f"Strategy:        {plan['strategy']}")
    return lines


def human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_duration_long(seconds: float) -> str:
    days, rem = divmod(seconds, 86400)
    hours = rem / 3600
    return f"{int(days)}d {hours:.1f}h" if days else f"{hours:.1f}h"


def format_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"Budget:          {plan['budget']} -> C = {plan['flops']:.3g} FLOPs",
        f"Compute-optimal: N = {human(plan['optimal_params'])} parameters, D = {human(plan['optimal_tokens'])} tokens "
        f"(C = 6 N D, D = {plan['tokens_per_param']:g} N)",
        f"Named size:      {plan['model']} ({plan['model_params']:,} parameters): train on "
        f"{human(plan['model_tokens'])} tokens ({plan['model_tokens'] / plan['model_params']:.1f} tokens/parameter, "
        f"{plan['model_flops']:.3g} FLOPs)",
    ]
    tps = plan.get("tokens_per_sec_per_gpu")
    if tps:
        lines.append(f"Throughput:      {tps:,.0f} tokens/s per GPU ({plan['throughput_source']})")
        lines.append(
            f"Wall time:       {format_duration_long(plan['wall_seconds'])} on {plan['gpus']} GPU(s) "
            f"({plan['gpu_hours_needed']:,.0f} GPU-hours)"
        )
    else:
        lines.append(f"Wall time:       ? ({plan['throughput_source']})")
    if plan.get("note"):
        lines.append(f"Note:            {plan['note']}")
    lines.extend(format_strategies(plan))
    return "\n".join(lines)
