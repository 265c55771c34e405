"""`orchestrator` command line (also `python -m orchestrator`).

    orchestrator tokenizer   --input RAW_DIR --output PREFIX [--vocab-size 32000]
    orchestrator prepare     --input RAW_DIR --output TOKENS_DIR --tokenizer PREFIX.model
    orchestrator train       --config configs/quickstart.yaml [--section.key value ...]
    orchestrator sample-data --out .cache/sample      (built-in corpus -> tokenizer -> tokens)
    orchestrator demo                                  (sample data + 2-process CPU training)
    orchestrator config      [--config FILE ...] [--reference]
    orchestrator models                                (named sizes and parameter counts)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.schema import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from data.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size)
    print(f"Tokenizer written to {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from data.prepare import prepare_dataset

    stats = prepare_dataset(
        args.input, args.output, args.tokenizer, num_workers=args.num_workers, overwrite=args.overwrite
    )
    print_prepare_stats(stats, args.output)
    return 0


def print_prepare_stats(stats: dict, output: str | Path) -> None:
    for split, s in stats.get("splits", stats).items():
        if isinstance(s, dict) and "docs" in s:
            skipped = s.get("skipped", {})
            skipped_total = sum(skipped.values()) if isinstance(skipped, dict) else skipped
            print(f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens, {skipped_total:,} records skipped"
                  + (f" {skipped}" if skipped_total else ""))
    print(f"Prepared data in {output}")


def prepare_sample(out: Path) -> tuple[Path, Path]:
    """The built-in sample corpus, its tokenizer and token chunks under `out` (idempotent)."""
    from data.prepare import is_prepared, prepare_dataset
    from data.sample_corpus import write_sample_corpus
    from data.tokenizer import train_tokenizer

    raw, tokenizer, tokens = out / "raw", out / "tokenizer.model", out / "tokens"
    if is_prepared(tokens) and tokenizer.is_file():
        print(f"Sample data already prepared in {out}")
        return tokens, tokenizer
    start = time.perf_counter()
    write_sample_corpus(raw)
    if not tokenizer.is_file():
        train_tokenizer(raw / "train", out / "tokenizer", vocab_size=1024)
    stats = prepare_dataset(raw, tokens, tokenizer, num_workers=1)
    print_prepare_stats(stats, tokens)
    print(f"Sample data ready in {time.perf_counter() - start:.1f}s")
    return tokens, tokenizer


def cmd_sample_data(args: argparse.Namespace) -> int:
    prepare_sample(Path(args.out))
    return 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from orchestrator.train import main as train_main

    return train_main(rest)


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    tokens, tokenizer = prepare_sample(Path(args.data_dir))
    command = [
        sys.executable, "-m", "orchestrator", "train",
        "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
        "--data.dir", str(tokens), "--data.tokenizer", str(tokenizer),
        "--run.dir", args.run_dir, *rest,
    ]  # fmt: skip
    print("Running:", " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(command, env=env)


def cmd_config(args: argparse.Namespace, rest: list[str]) -> int:
    import yaml

    from orchestrator.config import Config, load_config
    from orchestrator.schema import reference, to_dict

    if args.reference:
        print("| key | type | default | description |\n|---|---|---|---|")
        for key, tp, default, help in reference(Config):
            print(f"| `{key}` | {tp} | `{default}` | {help} |")
        return 0
    print(yaml.safe_dump(to_dict(load_config(rest)), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.config import SIZES, model_config

    print(f"{'name':<18} {'params':>15} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'ffn':>6} {'ctx':>5}")
    for name in SIZES:
        c = model_config(name)
        print(f"{name:<18} {c.num_params():>15,} {c.n_layers:>6} {c.d_model:>7} {c.n_heads:>5} {c.n_kv_heads:>3} "
              f"{c.ffn_hidden:>6} {c.max_seq_len:>5}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Pretrain 1B-scale Llama models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer on jsonl(.zst) shards")
    p.add_argument("--input", required=True, help="directory of *.jsonl / *.jsonl.zst shards")
    p.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("prepare", help="tokenize jsonl(.zst) shards into litdata token chunks")
    p.add_argument("--input", required=True, help="raw corpus (SlimPajama layout: train/, validation/)")
    p.add_argument("--output", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--overwrite", action="store_true", help="redo a completed output directory")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("sample-data", help="build the built-in sample corpus, tokenizer and token chunks")
    p.add_argument("--out", default=".cache/sample")
    p.set_defaults(fn=cmd_sample_data)

    p = sub.add_parser("train", help="pretrain (args: --config FILE and --section.key value overrides)",
                       add_help=False)
    p.set_defaults(fn=cmd_train, takes_rest=True)

    p = sub.add_parser("demo", help="sample data + 2-process CPU pretraining of the quickstart model")
    p.add_argument("--data-dir", default=".cache/sample")
    p.add_argument("--run-dir", default="runs/demo")
    p.set_defaults(fn=cmd_demo, takes_rest=True)

    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("--reference", action="store_true", help="markdown table of every key")
    p.set_defaults(fn=cmd_config, takes_rest=True)

    p = sub.add_parser("models", help="list the named model sizes with parameter counts")
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_rest", False):
            return args.fn(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
