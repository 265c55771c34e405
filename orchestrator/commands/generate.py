"""`orchestrator generate`: sample text from a checkpoint."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import add_checkpoint, add_device, add_dtype, add_run_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    add_checkpoint(p, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument(
        "--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    add_run_tokenizer(p)
    add_device(p)
    add_dtype(p, "auto: bfloat16 on CUDA, float32 on CPU")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.tools.generate import generate_text

    text = generate_text(
        args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype,
    )  # fmt: skip
    print(text)
    return 0
