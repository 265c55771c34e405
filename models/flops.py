"""Analytical FLOPs per token, for model FLOPs utilisation (MFU), of both families.

PaLM's convention (arXiv 2204.02311 app. B): 2 FLOPs per weight of every matmul per token in the
forward pass, attention scores and values charged for all T keys unless `causal=True`, backward
twice the forward; figures per token of the block. The full accounting, the encoder-decoder's
included, and the check against FlopCounterMode: docs/training.md (How MFU counts FLOPs).

This module imports only models.config (no torch), so that what sizes runs (`orchestrator
models`, `orchestrator plan`) can read it cheaply; the block split is ModelConfig.encoder_tokens,
the rule models/encdec.py applies.
"""

from __future__ import annotations

from models.config import ModelConfig


def _attention_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(q + o + gate, k + v) weights of one self-attention layer."""
    d, h, kv, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return d * h * e + h * e * d + d * cfg.gate_dim, 2 * d * kv * e


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul (all but embedding, norms and biases), lm_head counted
    once even when tied. For the decoder every token meets each of them once; the encoder-decoder's
    tokens meet only part of them (see `encoder_decoder_matmul_params`)."""
    if cfg.arch == "encoder_decoder":
        return sum(encoder_decoder_matmul_params(cfg).values())
    q_o_gate, k_v = _attention_weights(cfg)
    ffn = 3 * cfg.d_model * cfg.ffn_hidden
    return cfg.n_layers * (q_o_gate + k_v + ffn) + cfg.vocab_size * cfg.d_model


def encoder_decoder_matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """The encoder-decoder's matmul weights grouped by the tokens that meet them:
    `encoder` (its blocks, per encoder token), `cross_kv` (the decoder layers' cross-attention k
    and v, applied to the encoder's output: per encoder token) and `decoder` (self-attention,
    cross-attention q and o, SwiGLU, lm_head: per decoder token)."""
    q_o_gate, k_v = _attention_weights(cfg)
    d, h, e = cfg.d_model, cfg.n_heads, cfg.head_dim
    ffn = 3 * d * cfg.ffn_hidden
    cross_q_o = d * h * e + h * e * d
    return {
        "encoder": cfg.n_layers * (q_o_gate + k_v + ffn),
        "cross_kv": cfg.n_layers * k_v,
        "decoder": cfg.n_layers * (q_o_gate + k_v + cross_q_o + ffn) + cfg.vocab_size * d,
    }


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, causal: bool = False
) -> dict[str, float]:
    """FLOPs per token of a sequence of `seq_len` tokens (default: model.max_seq_len).

    Returns a dict: `matmul` (forward, weight matmuls), `attention` (forward, scores and
    values, per the `causal` convention), `forward`, `backward` (2x forward) and `training`
    (forward + backward: the number to divide achieved FLOP/s by for MFU). For the
    encoder-decoder, the averages over the block's T tokens (encoder's and decoder's).
    """
    T = seq_len or cfg.max_seq_len
    per_pair = 2 * 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim  # one query-key pair, all layers
    if cfg.arch == "encoder_decoder":
        P = cfg.encoder_tokens(T)
        Td = T - P  # decoder tokens
        w = encoder_decoder_matmul_params(cfg)
        matmul = 2.0 * ((w["encoder"] + w["cross_kv"]) * P + w["decoder"] * Td) / T
        self_keys = (Td + 1) / 2 if causal else Td  # mean keys per decoder self-attention query
        attention = per_pair * (P * P + Td * self_keys + Td * P) / T
    else:
        matmul = 2.0 * matmul_params(cfg)
        keys_seen = (T + 1) / 2 if causal else T  # mean keys per query
        attention = per_pair * keys_seen
    forward = matmul + attention
    return {
        "matmul": matmul,
        "attention": attention,
        "forward": forward,
        "backward": 2 * forward,
        "training": 3 * forward,
    }


def mfu(
    tokens_per_second: float,
    cfg: ModelConfig,
    seq_len: int,
    peak_flops: float,
    causal: bool = False,
) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (all devices).

    `tokens_per_second` and `peak_flops` must cover the same devices (e.g. the global
    throughput and world_size x the per-GPU peak: 989e12 for an H100 SXM in bf16 dense).
    """
    return tokens_per_second * flops_per_token(cfg, seq_len, causal)["training"] / peak_flops
