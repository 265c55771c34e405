"""`orchestrator export`: a training checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

import argparse

from orchestrator.checkpoint.layout import resolve_checkpoint
from orchestrator.commands import error
from orchestrator.commands.options import (
    add_checkpoint,
    add_dtype,
    add_overwrite,
    add_run_tokenizer,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="training checkpoint -> Hugging Face LlamaForCausalLM directory"
    )
    add_checkpoint(p, required=True)
    p.add_argument(
        "--output", required=True, help="directory to write (config.json, safetensors, tokenizer)"
    )
    add_run_tokenizer(p)
    p.add_argument(
        "--no-tokenizer", action="store_true", help="export the weights and configs only"
    )
    add_dtype(p, "weight dtype (auto: as stored in the checkpoint)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="split safetensors files above this size"
    )
    add_overwrite(p, "replace an existing output directory")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.tools.hf import export_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        out = export_checkpoint(
            ckpt, args.output, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer, dtype=args.dtype,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        )  # fmt: skip
    except FileExistsError as e:
        return error(e)
    print(f"Exported {ckpt} to {out}")
    print(
        f"Load it with: LlamaForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})"
    )
    return 0
