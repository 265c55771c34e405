"""`orchestrator config`: the resolved config, or the reference of every key (docs/config.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from orchestrator.config import Config, load_config
from orchestrator.schema import reference, to_dict

REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"
# The page whose marked block is the reference (`orchestrator config --reference --write`).
REFERENCE_PAGE = "docs/config.md"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("--reference", action="store_true", help="markdown table of every key")
    p.add_argument(
        "--write",
        metavar="FILE",
        default=None,
        help=f"with --reference: fill the marked block of FILE ({REFERENCE_PAGE})",
    )
    p.set_defaults(fn=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    if args.reference:
        table = reference_table()
        if args.write:
            replace_marked_block(Path(args.write), table)
            print(f"Config reference written into {args.write}")
        else:
            print(table, end="")
        return 0
    print(yaml.safe_dump(to_dict(load_config(rest)), sort_keys=False), end="")
    return 0


def reference_table() -> str:
    """Markdown table of every config key (docs/config.md's reference is this, verbatim)."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, tp, default, help in reference(Config):
        lines.append(f"| `{key}` | {tp.replace('|', '/')} | `{default}` | {help} |")
    return "\n".join(lines) + "\n"


def replace_marked_block(path: Path, body: str) -> None:
    text = path.read_text()
    if REFERENCE_START not in text or REFERENCE_END not in text:
        raise ValueError(f"{path} has no {REFERENCE_START} ... {REFERENCE_END} block to fill")
    head, rest = text.split(REFERENCE_START, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    path.write_text(f"{head}{REFERENCE_START}\n{body}{REFERENCE_END}{tail}")
