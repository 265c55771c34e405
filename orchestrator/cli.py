"""`orchestrator` command line (also `python -m orchestrator`).

    orchestrator tokenizer   --input RAW_DIR --output PREFIX [--vocab-size 32000]
    orchestrator prepare     --input RAW_DIR --output TOKENS_DIR --tokenizer PREFIX.model
    orchestrator train       --config configs/quickstart.yaml [--section.key value ...]
    orchestrator sample-data --out .cache/sample      (built-in corpus -> tokenizer -> tokens)
    orchestrator demo                                  (sample data + 2-process CPU training)
    orchestrator config      [--config FILE ...] [--reference]
    orchestrator models      [--seq-len N]             (named sizes, parameter counts, FLOPs per token)
    orchestrator export      --checkpoint CKPT_OR_RUN_DIR --output HF_DIR [--dtype bfloat16]
    orchestrator import      --input HF_DIR --output RUN_DIR
    orchestrator generate    --checkpoint CKPT_OR_RUN_DIR --prompt TEXT [--max-new-tokens 128]
                             [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
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

    from orchestrator.config import load_config
    from orchestrator.schema import to_dict

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


REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"


def reference_table() -> str:
    """Markdown table of every config key (the README's reference is this, verbatim)."""
    from orchestrator.config import Config
    from orchestrator.schema import reference

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


def cmd_models(args: argparse.Namespace) -> int:
    from models.config import SIZES, model_config
    from models.flops import flops_per_token

    seq = args.seq_len
    print(f"{'name':<16} {'params':>15} {'non-embed':>15} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} "
          f"{'ffn':>6} {'ctx':>5} {'train GFLOP/tok':>15}")
    for name in SIZES:
        c = model_config(name)
        gflops = flops_per_token(c, seq or c.max_seq_len)["training"] / 1e9
        print(f"{name:<16} {c.num_params():>15,} {c.num_non_embedding_params():>15,} {c.n_layers:>6} {c.d_model:>7} "
              f"{c.n_heads:>5} {c.n_kv_heads:>3} {c.ffn_hidden:>6} {c.max_seq_len:>5} {gflops:>15.2f}")
    print(f"\nUse a size with --model.name NAME (or model.name in a config). Training FLOPs per token = 3 x forward "
          f"(matmuls + attention over {'--seq-len ' + str(seq) if seq else 'ctx'} tokens; see models/flops.py).")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.hf import export_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(
        ckpt, args.output, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer, dtype=args.dtype,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"Exported {ckpt} to {out}")
    print(f"Load it with: LlamaForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from orchestrator.hf import import_hf

    ckpt = import_hf(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Imported {args.input} as {ckpt} (step 0, model weights only)")
    print(f"Continue pretraining: orchestrator train --config {ckpt / 'config.yaml'} --config YOUR_RUN.yaml "
          f"--checkpoint.resume {ckpt}")
    if (Path(args.output) / "tokenizer.model").is_file():
        tokenizer = Path(args.output) / "tokenizer.model"
        print(f"Prepare data with its tokenizer: orchestrator prepare --tokenizer {tokenizer} ...")
    else:
        print("note: no tokenizer.model in the input; prepare data with the sentencepiece model this checkpoint uses")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.generate import generate_text

    text = generate_text(
        args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype,
    )  # fmt: skip
    print(text)
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
    p.add_argument("--write", metavar="FILE", help="with --reference: fill the marked block of FILE (README.md)")
    p.set_defaults(fn=cmd_config, takes_rest=True)

    p = sub.add_parser("models", help="list the named model sizes with parameter counts and FLOPs per token")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: each size's ctx)")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("export", help="training checkpoint -> Hugging Face LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (or run dir: its latest checkpoint)")
    p.add_argument("--output", required=True, help="directory to write (config.json, safetensors, tokenizer)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: data.tokenizer of the run)")
    p.add_argument("--no-tokenizer", action="store_true", help="export the weights and configs only")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (auto: as stored in the checkpoint)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors files above this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="Hugging Face Llama directory -> checkpoint to continue pretraining from")
    p.add_argument("--input", required=True, help="HF model directory (config.json, *.safetensors or *.bin)")
    p.add_argument("--output", required=True, help="run directory; gets checkpoints/step-00000000 and tokenizer.model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype in the checkpoint (float32: master weights for training)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing imported checkpoint")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (or run dir: its latest checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: data.tokenizer of the run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.set_defaults(fn=cmd_generate)
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
