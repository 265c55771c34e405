"""`orchestrator import`: a Hugging Face Llama directory -> a checkpoint to continue pretraining
from (`import` is a keyword: hence the module's name)."""

from __future__ import annotations

import argparse

from orchestrator.commands import error
from orchestrator.commands.options import DTYPES, add_dtype, add_overwrite


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="Hugging Face Llama directory -> checkpoint to continue pretraining from"
    )
    p.add_argument(
        "--input", required=True, help="HF model directory (config.json, *.safetensors or *.bin)"
    )
    p.add_argument(
        "--output", required=True, help="checkpoint directory to write (state, config.yaml, ...)"
    )
    add_dtype(
        p,
        "weight dtype in the checkpoint (float32: master weights for training)",
        default="float32",
        choices=[d for d in DTYPES if d != "auto"],
    )
    add_overwrite(p, "replace an existing imported checkpoint")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch/lightning (seconds)
    from orchestrator.tools.hf import import_hf

    try:
        ckpt = import_hf(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)
    except FileExistsError as e:
        return error(e)
    print(f"Imported {args.input} as checkpoint {ckpt} (model weights only, step 0)")
    print(
        f"Continue pretraining from it: orchestrator train --config {ckpt / 'config.yaml'} --config YOUR_RUN.yaml "
        f"--checkpoint.init_from {ckpt}"
    )
    if (ckpt / "tokenizer.model").is_file():
        print(
            f"Prepare data with its tokenizer: orchestrator prepare --tokenizer {ckpt / 'tokenizer.model'} ..."
        )
    else:
        print(
            "note: the input has no tokenizer.model; prepare data with the sentencepiece model this model uses"
        )
    return 0
