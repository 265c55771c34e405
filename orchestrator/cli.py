"""`orchestrator` command line (also `python -m orchestrator`): the table of subcommands.

Each subcommand is a module of orchestrator/commands/ (`register(subparsers)`, `run(args)`);
`orchestrator --help` lists them, and the docs/ pages show each in use.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.commands import (
    config,
    consolidate,
    demo,
    error,
    evaluate,
    export,
    fit,
    generate,
    import_,
    models,
    plan,
    prepare,
    report,
    sample_data,
    sweep,
    tokenizer,
    train,
)

# Re-exported: what tests read through this module (the README reference, the demo's settings).
from orchestrator.commands.config import REFERENCE_END, REFERENCE_START, reference_table
from orchestrator.demo import FINETUNE_PRETRAIN_STEPS, QUICKSTART_CONFIG
from orchestrator.schema import ConfigError

__all__ = [
    "FINETUNE_PRETRAIN_STEPS",
    "QUICKSTART_CONFIG",
    "REFERENCE_END",
    "REFERENCE_START",
    "build_parser",
    "main",
    "reference_table",
]

# The subcommands, in the order `orchestrator --help` lists them: each module's register() adds
# its parser, whose `fn` default is its run().
COMMANDS = (
    tokenizer,
    prepare,
    sample_data,
    train,
    demo,
    config,
    models,
    export,
    consolidate,
    import_,
    generate,
    evaluate,
    plan,
    fit,
    sweep,
    report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Pretrain 1B-scale Llama models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_rest", False):  # `--section.key value` overrides pass through
            return args.fn(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return error(e)
