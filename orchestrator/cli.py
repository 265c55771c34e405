"""`orchestrator` command line (also `python -m orchestrator`).

orchestrator tokenizer   --input RAW_DIR --output PREFIX [--vocab-size 32000]
orchestrator prepare     --input RAW_DIR --output TOKENS_DIR --tokenizer PREFIX.model [--repair]
orchestrator prepare     --verify TOKENS_DIR   (sizes, checksums, token ids of every chunk)
orchestrator train       --config configs/quickstart.yaml [--section.key value ...]
orchestrator sample-data --out .cache/sample      (built-in corpus -> tokenizer -> tokens)
orchestrator demo                                  (sample data + 2-process CPU training)
orchestrator demo --finetune                       (then finetune it on questions; exact match before/after)
orchestrator config      [--config FILE ...] [--reference]
orchestrator models      [--seq-len N]             (named sizes, parameter counts, FLOPs per token)
orchestrator export      --checkpoint CKPT_OR_RUN_DIR --output HF_DIR [--dtype bfloat16]
orchestrator consolidate CKPT_OR_RUN_DIR [--output FILE]   (any strategy's checkpoint -> one state dict)
orchestrator import      --input HF_DIR --output CKPT_DIR    (then train with --checkpoint.init_from CKPT_DIR)
orchestrator generate    --checkpoint CKPT_OR_RUN_DIR --prompt TEXT [--max-new-tokens 128]
                         [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
orchestrator evaluate    --checkpoint CKPT_OR_RUN_DIR [--data TOKENS_DIR]   (validation perplexity)
orchestrator evaluate    --hf-dir HF_DIR --tasks T1,T2 --include-path TASKS_DIR  (lm-evaluation-harness)
orchestrator plan        --gpu-hours H --device h100 [--gpus 8] | --params 1.1B | --model NAME | --flops C
orchestrator fit         RUN_DIR RUN_DIR ... | STUDY_DIR [--plot fit.png]   (loss vs N and vs C power laws)
orchestrator sweep       --config BASE.yaml --study-dir DIR --grid KEY=V1,V2 ... [--ladder S1,S2 --tokens-per-param 20]
                         [--executor local|slurm] [--parallel N] [--match-params] [--section.key value ...]
orchestrator report      STUDY_DIR [--out DIR]   (table, JSON and plots of a sweep's runs)
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
