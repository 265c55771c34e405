"""The `orchestrator` subcommands, one module each: `register(subparsers)` adds the subcommand's
parser, `run(args)` (or `run(args, rest)` where it takes `--section.key value` overrides) runs it.
The table of them is orchestrator/cli.py; the options several share are options.py's."""

from __future__ import annotations

import sys


def error(message: object) -> int:
    """Say `error: MESSAGE` on stderr; the exit status of a command that refuses (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2
