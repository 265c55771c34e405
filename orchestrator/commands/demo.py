"""`orchestrator demo`: sample data + 2-process CPU pretraining (`--finetune`: then finetuning);
the demo itself is orchestrator/demo.py."""

from __future__ import annotations

import argparse

from orchestrator.demo import DEMO_MODELS, FINETUNE_PRETRAIN_STEPS, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="sample data + 2-process CPU pretraining of the quickstart model"
    )
    p.add_argument("--data-dir", default=".cache/sample")
    p.add_argument(
        "--arch",
        choices=sorted(DEMO_MODELS),
        default="llama",
        help="the demo model's family: the quickstart decoder (llama) or its RedLLM partner "
        "(encoder_decoder, redllm-tiny)",
    )
    p.add_argument("--run-dir", default=None, help="run dir (default runs/demo, runs/demo-redllm)")
    p.add_argument(
        "--finetune",
        action="store_true",
        help="finetune the pretrained demo model (--run-dir) on the built-in question set and print "
        "exact-match accuracy on held-out questions before and after",
    )
    p.add_argument(
        "--finetune-dir", default=None, help="with --finetune: run dir (default <run dir>-finetune)"
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=FINETUNE_PRETRAIN_STEPS,
        help="with --finetune: first pretrain the demo model (--run-dir) to this many steps, "
        "resuming it when it has fewer (the demo's 300 leave it knowing few facts to answer "
        f"with; default {FINETUNE_PRETRAIN_STEPS})",
    )
    p.set_defaults(fn=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    return run_demo(
        data_dir=args.data_dir, arch=args.arch, run_dir=args.run_dir, finetune=args.finetune,
        finetune_dir=args.finetune_dir, pretrain_steps=args.pretrain_steps, overrides=rest,
    )  # fmt: skip
