"""`orchestrator plan`: compute-optimal model size and tokens for a budget, and the wall time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.util import parse_count
from orchestrator.commands.options import add_json, pick


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="compute-optimal model size and tokens (C = 6ND, 20 tokens/parameter) and wall time",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--gpu-hours", type=float, default=None, help="compute budget in GPU-hours (with --device)"
    )
    what.add_argument("--params", default=None, help="target model size, e.g. 1.1B, 400M")
    what.add_argument("--model", default=None, help="a named size (see `orchestrator models`)")
    what.add_argument("--flops", default=None, help="compute budget in FLOPs, e.g. 1.2e20")
    p.add_argument(
        "--device",
        default=None,
        help="h100, h100-pcie, h200, a100 (peak bf16 FLOP/s for budgets and MFU)",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (wall time)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node (default 8): the strategy comparison's node boundary",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches per GPU and step (gradient accumulation) in the strategy comparison",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation to assume (default: measured for the device in the "
        "--results table, else 0.40)",
    )
    p.add_argument(
        "--tokens-per-sec", type=float, default=None, help="measured training tokens/s per GPU"
    )
    p.add_argument(
        "--tokens-per-param", type=float, default=20.0, help="tokens per parameter at the optimum"
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="measured-throughput table to read (markdown, as benchmarks/RESULTS.md; default: the one "
        "shipped with the package, orchestrator/resources/throughput.md)",
    )
    add_json(p, "also write the plan to this JSON file")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch (orchestrator.devices; seconds)
    from orchestrator.tools.plan import DEFAULT_RESULTS, format_plan, make_plan

    plan = make_plan(
        flops=parse_count(args.flops) if args.flops else None,
        results=args.results or DEFAULT_RESULTS,
        **pick(args, "gpu_hours", "device", "params", "model", "gpus", "gpus_per_node"),
        **pick(args, "micro_batches", "mfu", "tokens_per_sec", "tokens_per_param"),
    )
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0
