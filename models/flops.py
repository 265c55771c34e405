"""Analytical FLOPs per token, for model FLOPs utilisation (MFU).

Convention (PaLM, arXiv 2204.02311 app. B; also Megatron-LM and nanoGPT):

* A matmul of (m x k) by (k x n) costs 2*m*k*n FLOPs (one multiply and one add per term).
* Per token, the forward pass costs 2 FLOPs per weight of every matmul: q/k/v/o, the optional
  attention gate, the three SwiGLU projections and the output projection (`lm_head`). The
  embedding lookup, norms (QK-norm's included), activations, softmax, RoPE, biases and the z-loss
  are not counted: they are not matmuls and are a fraction of a percent at 1B scale.
* Attention scores q k^T and the weighted sum over values cost 2 * 2 * H * E * T per token and
  layer when every query is charged for all T keys (`causal=False`, the default). This is what
  PaLM's MFU formula, torch.utils.flop_counter and FlashAttention's non-causal benchmark count.
  With `causal=True` each query is charged only for the keys it sees (on average (T+1)/2), which
  is the work an ideal causal kernel does; MFU figures computed that way are lower, and are
  not comparable with published ones.
* Backward costs twice the forward (gradients with respect to inputs and to weights), so a
  training step costs 3x forward; activation recomputation is not counted (MFU, unlike HFU,
  charges only the work the model needs).

Against torch.utils.flop_counter.FlopCounterMode (tests/models/test_flops.py): on the eager attention
path (the full T x T score matrix with plain matmuls) the training count agrees exactly. On
CUDA, FlopCounterMode charges the fused SDPA backward 2.5x its forward (FlashAttention recomputes
the scores), so it reads a little higher than 3x forward; on CPU it does not count the fused
SDPA kernel at all.
"""

from __future__ import annotations

from models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul for every token (all but embedding, norms and biases)."""
    d, h, kv, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = d * h * e + 2 * d * kv * e + h * e * d + d * cfg.gate_dim + 3 * d * cfg.ffn_hidden
    return cfg.n_layers * per_layer + cfg.vocab_size * d


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, causal: bool = False
) -> dict[str, float]:
    """FLOPs per token of a sequence of `seq_len` tokens (default: model.max_seq_len).

    Returns a dict: `matmul` (forward, weight matmuls), `attention` (forward, scores and
    values, per the `causal` convention), `forward`, `backward` (2x forward) and `training`
    (forward + backward: the number to divide achieved FLOP/s by for MFU).
    """
    T = seq_len or cfg.max_seq_len
    matmul = 2.0 * matmul_params(cfg)
    keys_seen = (T + 1) / 2 if causal else T  # mean keys per query
    attention = 2 * 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys_seen
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
