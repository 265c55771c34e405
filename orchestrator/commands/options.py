"""Options that several subcommands share, declared once."""

from __future__ import annotations

import argparse

from data.shards import RecordFilter

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def add_checkpoint(
    p: argparse.ArgumentParser, *, required: bool = False, positional: bool = False
) -> None:
    """The checkpoint to read: a checkpoint dir, or a run dir (its latest checkpoint)."""
    help = "checkpoint dir (or run dir: its latest checkpoint)"
    if positional:
        p.add_argument("checkpoint", help=help)
    else:
        p.add_argument("--checkpoint", required=required, default=None, help=help)


def add_run_tokenizer(p: argparse.ArgumentParser) -> None:
    """--tokenizer for commands that read a checkpoint (default: the run's own)."""
    p.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model (default: data.tokenizer of the run)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def add_dtype(
    p: argparse.ArgumentParser,
    help: str | None = None,
    *,
    default: str = "auto",
    choices: list[str] = DTYPES,
) -> None:
    p.add_argument("--dtype", default=default, choices=choices, help=help)


def add_overwrite(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_json(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--json", default=None, help=help)


def add_record_filter(p: argparse.ArgumentParser) -> None:
    """Which records of a raw corpus count as documents (tokenizer, prepare)."""
    p.add_argument(
        "--text-field",
        default="text",
        help="JSON key / Parquet column holding the document (SlimPajama: text, StarCoder: content)",
    )
    p.add_argument(
        "--exclude-set",
        action="append",
        metavar="NAME",
        help="drop documents whose meta.redpajama_set_name is NAME (repeatable), e.g. RedPajamaGithub",
    )
    p.add_argument(
        "--min-chars", type=int, default=0, help="drop documents shorter than this (characters)"
    )


def record_filter(args: argparse.Namespace) -> RecordFilter:
    """The RecordFilter of add_record_filter's options."""
    return RecordFilter(
        text_field=args.text_field,
        exclude_sets=frozenset(args.exclude_set or ()),
        min_chars=args.min_chars,
    )


def pick(args: argparse.Namespace, *names: str) -> dict:
    """The options `names` of `args`, as keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}
