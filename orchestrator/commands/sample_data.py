"""`orchestrator sample-data`: the built-in sample corpus, its tokenizer and token chunks."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.demo import prepare_sample


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-data", help="build the built-in sample corpus, tokenizer and token chunks"
    )
    p.add_argument("--out", default=".cache/sample")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    prepare_sample(Path(args.out))
    return 0
