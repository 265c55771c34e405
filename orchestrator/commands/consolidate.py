"""`orchestrator consolidate`: a checkpoint of any strategy -> one full state dict file."""

from __future__ import annotations

import argparse

from orchestrator.checkpoint.layout import resolve_checkpoint
from orchestrator.commands.options import add_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate",
        help="checkpoint of any strategy (DDP file, FSDP shards, DeepSpeed ZeRO) -> "
        "one full state dict file",
    )
    add_checkpoint(p, positional=True)
    p.add_argument(
        "--output",
        default=None,
        help="file to write (default CKPT_DIR/consolidated.pt); torch.load(FILE, weights_only=True)['model']",
    )
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.checkpoint.consolidate import consolidate

    consolidate(resolve_checkpoint(args.checkpoint), args.output)
    return 0
