"""`orchestrator fit`: loss vs parameters and vs compute as power laws over finished runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrator.commands.options import add_json
from orchestrator.tools import scaling


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit loss vs parameters and vs compute as power laws over finished runs, one fit per "
        "model family (model.arch); PNG plot",
    )
    p.add_argument("runs", nargs="+", help="run dirs (config.yaml + metrics.jsonl or tensorboard/)")
    p.add_argument(
        "--metric",
        default="val_loss",
        choices=["val_loss", "loss"],
        help="validation loss (default) or training loss",
    )
    p.add_argument(
        "--non-embedding", action="store_true", help="N without embedding and output head (Kaplan)"
    )
    p.add_argument(
        "--compute",
        default="flops",
        choices=scaling.COMPUTE_MODES,
        help="training compute C: `flops` (default) = models/flops.py's training FLOPs per token at "
        "the run's seq_len x tokens seen, the same axis for decoders and encoder-decoders; `6nd` = 6 N D",
    )
    p.add_argument(
        "--plot", default="scaling_fit.png", help="PNG to write (every family on one figure)"
    )
    add_json(p, "also write the fits (per family) to this JSON file")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    runs = [
        scaling.read_run(
            path, metric=args.metric, non_embedding=args.non_embedding, compute=args.compute
        )
        for path in scaling.expand_studies(args.runs)  # a sweep's study dir: its runs that trained
    ]
    families = scaling.fit_families(runs)  # one fit per model.arch
    print(scaling.report(families, args.compute))
    print(f"Plot: {scaling.plot(families, args.plot, args.compute)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(scaling.results_dict(families, args.compute), indent=2)
        )
        print(f"Fit written to {args.json}")
    return 0
