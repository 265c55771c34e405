"""`orchestrator prepare`: tokenize a corpus into token chunks; `prepare --verify DIR` checks them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data.integrity import verify_dataset
from data.prepare import PrepareOptions, prepare_dataset
from data.tokenizer import Tokenizer
from orchestrator.commands import error
from orchestrator.commands.options import add_overwrite, add_record_filter, pick


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into litdata token chunks (train/ and val/)"
    )
    p.add_argument(
        "--input",
        help="raw corpus: SlimPajama layout (train/, validation/) or a folder/file of *.jsonl, *.jsonl.zst, "
        "*.jsonl.gz, *.parquet (validation then held out by content hash, see --val-every)",
    )
    p.add_argument("--output", help="output directory or object-store URL (s3://...)")
    p.add_argument(
        "--tokenizer",
        help="sentencepiece .model file (--verify: ids checked against its vocabulary)",
    )
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check a prepared dataset (prepare output, split or s3:// URL) instead: every chunk's "
        "size, checksum and token ids (within the tokenizer's vocabulary); exit 1 if damaged",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="on a finished output: tokenize again the parts whose chunks are damaged (same "
        "--input, --tokenizer and settings) and put their chunks back",
    )
    p.add_argument(
        "--format",
        default="text",
        choices=["text", "instruction"],
        help="text: pretraining documents (default); instruction: finetuning examples "
        "({input, target}, {instruction, input, output} or {messages}) stored with a "
        "response-only loss mask (data/instructions.py)",
    )
    p.add_argument(
        "--instruction-format",
        default="auto",
        choices=["auto", "input_target", "alpaca", "chat"],
        help="--format instruction: the records' format (default: detected per record from its keys)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="--format instruction: skip (as too_long) examples of more tokens, BOS and EOS "
        "included (e.g. train.seq_len + 1; default 0: no limit)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=max(1, (os.cpu_count() or 1)),
        help="processes (default: cores)",
    )
    p.add_argument(
        "--separator",
        default="bos+eos",
        choices=["bos+eos", "eos", "bos"],
        help="tokens around each document (default: [BOS] text [EOS], as Llama)",
    )
    p.add_argument(
        "--min-tokens", type=int, default=0, help="drop documents with fewer tokens than this"
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=100,
        help="without a validation/ folder: hold out 1 in N documents (by content hash)",
    )
    p.add_argument("--chunk-bytes", default="64MB", help="litdata chunk size")
    p.add_argument(
        "--work-dir",
        default=None,
        help="staging folder (default: OUTPUT/.prepare_work; for URLs "
        "~/.cache/orchestrator/prepare/...)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    add_overwrite(p, "redo a completed output directory")
    add_record_filter(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    if args.verify:
        return verify(args)
    needed = [f"--{k}" for k in ("input", "output", "tokenizer") if not getattr(args, k)]
    if needed:
        return error(
            f"prepare needs {', '.join(needed)} (or --verify DIR to check a prepared dataset)"
        )
    options = PrepareOptions(
        args.input,
        args.output,
        args.tokenizer,
        exclude_sets=args.exclude_set or (),
        progress=not args.no_progress,
        **pick(args, "num_workers", "overwrite", "chunk_bytes", "val_every", "text_field"),
        **pick(args, "min_chars", "min_tokens", "separator", "work_dir", "format"),
        **pick(args, "instruction_format", "max_tokens", "repair"),
    )
    try:
        stats = prepare_dataset(options)
    except PermissionError as e:  # an unwritable output: say so, no traceback
        return error(e)
    if args.repair:
        repaired = stats.get("repaired", [])
        print(
            f"Repaired {len(repaired)} damaged chunks"
            + (f": {', '.join(repaired)}" if repaired else "")
        )
    print_prepare_stats(stats, args.output)
    if stats.get("format") == "instruction":  # documents are examples; the loss counts responses
        for split, s in stats["splits"].items():
            print(
                f"{split}: {s['docs']:,} instruction examples, {s['loss_tokens']:,} of their "
                f"{s['tokens']:,} tokens in the loss (responses and EOS)"
            )
    return 0


def print_prepare_stats(stats: dict, output: str | Path) -> None:
    if stats.get("finished") is False:
        print(
            f"Prepare unfinished ({stats['parts_done']}/{stats['parts']} parts done); run it again to finish"
        )
        return
    for split, s in stats.get("splits", stats).items():
        if isinstance(s, dict) and "docs" in s:
            skipped = {k: v for k, v in s.get("skipped", {}).items() if v}
            skipped_total = sum(skipped.values())
            print(
                f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens, {skipped_total:,} records skipped"
                + (f" {skipped}" if skipped_total else "")
            )
    for reason, where in stats.get("skip_locations", {}).items():
        print(f"  {reason}: {', '.join(where[:5])}{' ...' if len(where) > 5 else ''}")
    print(f"Prepared data in {output} (details per file in {output}/prepare_stats.json)")


def verify(args: argparse.Namespace) -> int:
    """`orchestrator prepare --verify DIR`: sizes, checksums and token ids of every chunk."""
    vocab = Tokenizer(args.tokenizer).vocab_size if args.tokenizer else None
    try:
        report = verify_dataset(args.verify, vocab_size=vocab, num_workers=args.num_workers)
    except (OSError, ValueError) as e:
        return error(e)
    for name, r in report["splits"].items():
        ids = (
            f"ids < {r['vocab_size']:,}"
            if r["vocab_size"]
            else "ids not checked (no vocab_size recorded; pass --tokenizer)"
        )
        sums = f"crc32 of {r['checksums']}/{r['chunks']} chunks"
        if r["checksums"] < r["chunks"]:
            sums += " (prepared before checksums were recorded: prepare again to add them)"
        state = f"DAMAGED ({len(r['damaged'])} chunks)" if r["damaged"] else "OK"
        print(
            f"{name}: {r['chunks']:,} chunks, {r['bytes']:,} bytes, {r['tokens']:,} tokens: {state} "
            f"(sizes, {sums}, {ids})"
        )
        for chunk, problems in r["damaged"]:
            print(f"  damaged {r['split'].rstrip('/')}/{chunk}: {'; '.join(problems)}")
        if r["fix"]:
            print(f"  {r['fix']}")
    print(f"Verified {args.verify}: {'OK' if report['ok'] else 'DAMAGED'}")
    return 0 if report["ok"] else 1
