"""`orchestrator train`: pretrain; every argument goes to orchestrator/train.py."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain (args: --config FILE and --section.key value overrides)",
        add_help=False,
    )
    p.set_defaults(fn=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    # imported on use: loads torch/lightning (seconds)
    from orchestrator.train import main as train_main

    return train_main(rest)
