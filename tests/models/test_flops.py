"""The analytical FLOP count against torch.utils.flop_counter."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models.build import build_model
from models.config import REDLLM_PAIRS, model_config
from models.flops import (
    encoder_decoder_matmul_params,
    flops_per_token,
    matmul_params,
    mfu,
)
from models.llama import Llama
from tests.hf_helpers import small_config


def measured_training_flops_per_token(cfg, batch: int, seq_len: int) -> float:
    torch.manual_seed(0)
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # grouped-query attention
        dict(n_kv_heads=4, tie_embeddings=True),
        dict(attn_gate="headwise", sandwich_norm=True),
        dict(attn_gate="elementwise"),
        dict(qk_norm=True),  # QK-norm: a norm, no matmul (neither side counts it)
    ],
)
def test_training_flops_agree_with_flop_counter(overrides):
    # The eager path computes attention with plain matmuls, which FlopCounterMode counts (on CPU
    # it does not count the fused SDPA kernel). Both count the full T x T score matrix.
    cfg = small_config(attention="eager", **overrides)
    predicted = flops_per_token(cfg, 64)["training"]
    measured = measured_training_flops_per_token(cfg, batch=2, seq_len=64)
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)
    assert predicted == measured  # exact under this convention


def test_attention_convention_matches_torch_sdpa_formula():
    cfg = small_config()
    T = 64
    full = flops_per_token(cfg, T)
    q = (1, cfg.n_heads, T, cfg.head_dim)
    kv = (1, cfg.n_kv_heads, T, cfg.head_dim)
    # torch's formula for the fused kernels (what FlopCounterMode counts on GPU), per token.
    assert full["attention"] == sdpa_flop_count(q, kv, kv) * cfg.n_layers / T
    causal = flops_per_token(cfg, T, causal=True)
    assert causal["attention"] == pytest.approx(full["attention"] * (T + 1) / (2 * T))
    assert causal["matmul"] == full["matmul"]
    assert full["training"] == 3 * full["forward"] == full["forward"] + full["backward"]


def test_tinyllama_figures():
    cfg = model_config("tinyllama-1.1b")
    f = flops_per_token(cfg, 2048)
    # 2 FLOPs per matmul weight (everything but the embedding and the norms) ...
    assert (
        matmul_params(cfg)
        == cfg.num_params() - cfg.vocab_size * cfg.d_model - (2 * cfg.n_layers + 1) * cfg.d_model
    )
    assert f["matmul"] == 2 * matmul_params(cfg)
    # ... plus PaLM's 12 * L * H * E * T for attention (forward + backward).
    assert 3 * f["attention"] == 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2048
    assert f["training"] == pytest.approx(7.31e9, rel=1e-3)
    # 8 H100s at 3,000 tokens/s each in bf16 (989 TFLOP/s dense per GPU).
    assert mfu(8 * 3000, cfg, 2048, 8 * 989e12) == pytest.approx(
        8 * 3000 * f["training"] / (8 * 989e12)
    )


# --- the encoder-decoder (models/encdec.py) ----------------------------------------------------


def measured_encdec_training_flops_per_token(cfg, batch: int, seq_len: int) -> float:
    """Per block token: the loss is over the decoder's T-P predictions, the count over all T."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    P = cfg.encoder_tokens(seq_len)
    with FlopCounterMode(display=False) as counter:
        logits = model(ids)  # (B, T-P, V)
        assert logits.shape == (batch, seq_len - P, cfg.vocab_size)
        F.cross_entropy(logits.flatten(0, 1), ids[:, P:].flatten()).backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # the default split, half and half; grouped-query attention
        dict(encoder_len=24),  # a shorter encoder than decoder
        dict(encoder_len=50, n_kv_heads=4),  # a longer encoder; multi-head attention
        dict(encoder_len=1, tie_embeddings=False),  # the extremes: one encoder token, untied head
    ],
)
def test_encoder_decoder_training_flops_agree_with_flop_counter(overrides):
    cfg = small_config(
        **{"arch": "encoder_decoder", "tie_embeddings": True, "attention": "eager", **overrides}
    )
    predicted = flops_per_token(cfg, 64)["training"]
    measured = measured_encdec_training_flops_per_token(cfg, batch=2, seq_len=64)
    assert predicted == measured, (predicted, measured)


def test_encoder_decoder_formula_and_causal_convention():
    cfg = small_config(arch="encoder_decoder", tie_embeddings=True, encoder_len=24)
    T, P, L, H, E = 64, 24, cfg.n_layers, cfg.n_heads, cfg.head_dim
    Td = T - P
    full, causal = flops_per_token(cfg, T), flops_per_token(cfg, T, causal=True)
    w = encoder_decoder_matmul_params(cfg)
    assert full["matmul"] == 2 * ((w["encoder"] + w["cross_kv"]) * P + w["decoder"] * Td) / T
    assert full["attention"] == pytest.approx(4 * L * H * E * (P * P + Td * Td + Td * P) / T)
    # Causal: only the decoder's self-attention queries see fewer keys ((Td+1)/2 on average);
    # the encoder's P x P and cross-attention's Td x P stay whole.
    assert causal["matmul"] == full["matmul"]
    assert causal["attention"] == pytest.approx(
        4 * L * H * E * (P * P + Td * (Td + 1) / 2 + Td * P) / T
    )
    assert full["attention"] - causal["attention"] == pytest.approx(
        4 * L * H * E * Td * (Td - 1) / 2 / T
    )
    assert causal["training"] == 3 * causal["forward"] < full["training"]
    # All matmul weights, grouped by the tokens that meet them: the parameters less the norms
    # (2 per encoder block, 3 per decoder block, 2 final); the tied embedding is lm_head's weight.
    norms = (5 * L + 2) * cfg.d_model
    assert matmul_params(cfg) == sum(w.values()) == cfg.num_params() - norms
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    assert matmul_params(untied) == untied.num_params() - norms - cfg.vocab_size * cfg.d_model


def test_the_block_split_rule():
    for encoder_len, T, P in [(0, 64, 32), (0, 7, 3), (24, 64, 24), (63, 64, 63), (1, 2, 1)]:
        cfg = small_config(arch="encoder_decoder", encoder_len=encoder_len)
        assert cfg.encoder_tokens(T) == P
    for encoder_len, T in [(0, 1), (32, 32), (40, 32)]:
        cfg = small_config(arch="encoder_decoder", encoder_len=encoder_len)
        with pytest.raises(ValueError, match="empty encoder or decoder half"):
            cfg.encoder_tokens(T)
        with pytest.raises(ValueError, match="empty encoder or decoder half"):
            flops_per_token(cfg, T)


@pytest.mark.parametrize("name", list(REDLLM_PAIRS))
def test_redllm_sizes_cost_about_half_their_partners_flops(name):
    # Each block token passes through one stack of about the partner's depth (a decoder token
    # also through cross-attention): about half the partner's training FLOPs per token.
    red, dec = model_config(name), model_config(REDLLM_PAIRS[name][0])
    T = min(red.max_seq_len, 2048)
    ratio = flops_per_token(red, T)["training"] / flops_per_token(dec, T)["training"]
    assert 0.4 < ratio < 1.0, ratio


@pytest.mark.gpu
def test_training_flops_with_fused_sdpa_on_gpu():
    # On CUDA FlopCounterMode counts the fused kernels: forward as here, backward as 2.5x forward
    # (it charges FlashAttention's recomputation of the scores), so it reads slightly higher.
    # One K/V head per query head: grouped queries go to SDPA through enable_gqa, which
    # FlopCounterMode counts only from torch builds of March 2026 on (this checks FLOPs, not that).
    cfg = small_config(
        n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, ffn_hidden=352, max_seq_len=128
    )
    torch.manual_seed(0)
    model = Llama(cfg).cuda().bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(ids).flatten(0, 1).float(), ids.flatten()).backward()
    measured = counter.get_total_flops() / (2 * 128)
    assert abs(flops_per_token(cfg, 128)["training"] / measured - 1) < 0.05
