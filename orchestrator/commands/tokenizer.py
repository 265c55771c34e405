"""`orchestrator tokenizer`: train a sentencepiece tokenizer, or check and install an existing one."""

from __future__ import annotations

import argparse

from data.tokenizer import Tokenizer, install_tokenizer, train_tokenizer
from orchestrator.commands import error
from orchestrator.commands.options import add_record_filter, record_filter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train a sentencepiece BPE tokenizer on a corpus sample, or check and use "
        "an existing one (e.g. Llama 2's tokenizer.model)",
    )
    p.add_argument(
        "--input", help="corpus: a folder (or file) of *.jsonl, *.jsonl.zst, *.jsonl.gz, *.parquet"
    )
    p.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
    p.add_argument(
        "--existing", metavar="MODEL", help="use this sentencepiece .model instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument(
        "--max-sentences",
        type=int,
        default=500_000,
        help="training sample size (document segments), spread over up to 64 files",
    )
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unknown characters to unk instead of UTF-8 byte pieces",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="sentencepiece trainer threads (default: all cores)",
    )
    add_record_filter(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    if args.existing:
        path = install_tokenizer(args.existing, args.output)
        print(f"Tokenizer {args.existing} checked and copied to {path}")
    else:
        if not args.input:
            return error("give --input CORPUS to train a tokenizer, or --existing MODEL to use one")
        path = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            max_sentences=args.max_sentences,
            byte_fallback=not args.no_byte_fallback,
            filter=record_filter(args),
            num_threads=args.num_threads,
        )
        print(f"Tokenizer written to {path}")
    tok = Tokenizer(path)
    padded = -(-tok.vocab_size // 64) * 64
    print(
        f"vocab_size {tok.vocab_size} (unk={tok.unk_id}, bos={tok.bos_id}, eos={tok.eos_id}); train with "
        f"--data.tokenizer {path} and --model.vocab_size >= {tok.vocab_size} (e.g. {padded}, a multiple of 64)"
    )
    return 0
