"""`orchestrator models`: the named model sizes, their parameter counts and FLOPs per token."""

from __future__ import annotations

import argparse

from models.config import SIZES, model_config
from models.flops import flops_per_token


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the named model sizes with parameter counts and FLOPs per token"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for FLOPs (default: each size's ctx)",
    )
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from models.config import paired_size

    seq = args.seq_len
    print(
        f"{'name':<18} {'arch':<7} {'params':>15} {'non-embed':>15} {'layers':>6} {'d_model':>7} {'heads':>5} "
        f"{'kv':>3} {'ffn':>6} {'ctx':>5} {'train GFLOP/tok':>15}  pairs with"
    )
    for name in SIZES:
        c = model_config(name)
        encdec = c.arch == "encoder_decoder"
        layers = f"{c.n_layers}+{c.n_layers}" if encdec else str(c.n_layers)  # encoder + decoder
        gflops = flops_per_token(c, seq or c.max_seq_len)["training"] / 1e9  # the family's count
        print(
            f"{name:<18} {'enc-dec' if encdec else 'decoder':<7} {c.num_params():>15,} "
            f"{c.num_non_embedding_params():>15,} {layers:>6} {c.d_model:>7} {c.n_heads:>5} {c.n_kv_heads:>3} "
            f"{c.ffn_hidden:>6} {c.max_seq_len:>5} {gflops:>15.3f}  {paired_size(name) or '-'}"
        )
    print(
        "\nPairs: each redllm-* size (encoder-decoder, RedLLM: models/encdec.py) has the width, heads and ffn of "
        "its decoder partner, tied embeddings, and the layers per stack (encoder+decoder) that bring its "
        "parameter count closest to the partner's (models/config.py, REDLLM_PAIRS)."
    )
    print(
        f"Use a size with --model.name NAME (or model.name in a config). Training FLOPs per token = 3 x forward "
        f"(matmuls + attention over {'--seq-len ' + str(seq) if seq else 'ctx'} tokens; an enc-dec's averaged "
        f"over the block, half of it encoded unless model.encoder_len says otherwise; see models/flops.py)."
    )
    return 0
