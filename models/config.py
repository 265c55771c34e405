"""Model hyper-parameters and the ladder of named sizes.

A size is chosen by name (`model.name: tinyllama-1.1b`); any field given next to the name
overrides the preset, so `--model.name tinyllama-1.1b --model.n_layers 4` is a 4-layer
TinyLlama-shaped model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from orchestrator.schema import doc


@dataclass
class ModelConfig:
    """Llama-2 architecture hyper-parameters."""

    name: str = doc("tinyllama-1.1b", "Named size to start from (see `orchestrator models`); other model keys override it.")
    vocab_size: int = doc(32000, "Vocabulary size (rows of the embedding); must be >= the tokenizer's.")
    n_layers: int = doc(22, "Number of transformer blocks.")
    d_model: int = doc(2048, "Width of the residual stream.")
    n_heads: int = doc(32, "Query heads; must divide d_model.")
    n_kv_heads: int = doc(4, "Key/value heads (grouped-query attention); must divide n_heads.")
    ffn_hidden: int = doc(5632, "Hidden width of the SwiGLU feed-forward block.")
    max_seq_len: int = doc(2048, "Context length the model is built for.")
    rope_base: float = doc(10000.0, "RoPE base frequency (theta).")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = doc(False, "Share the input embedding and the output projection.")
    init_std: float = doc(0.02, "Std of the normal init; residual projections are scaled by 1/sqrt(2*n_layers).")
    attention: Literal["sdpa", "eager"] = doc(
        "sdpa", "Attention kernel: `sdpa` (torch scaled_dot_product_attention) or `eager` (reference math)."
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the offending key; called before anything is built."""
        from orchestrator.schema import ConfigError

        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}: "
                f"choose n_heads so that d_model % n_heads == 0 (e.g. {_divisors_hint(self.d_model)})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                f"grouped-query attention needs n_heads % n_kv_heads == 0 (e.g. {_divisors_hint(self.n_heads)})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model head_dim = d_model/n_heads = {self.head_dim} must be even for RoPE")

    def num_params(self) -> int:
        """Exact parameter count, computed from the shapes (no model is built)."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        ffn = 3 * d * self.ffn_hidden
        block = attn + ffn + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * block + embed + head + d


# The ladder of named sizes. `tiny` learns the sample corpus on a CPU in minutes;
# `tinyllama-1.1b` is exactly the released TinyLlama shape (1,100,048,384 parameters).
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, ffn_hidden=688, max_seq_len=256),
    "tinyllama-1.1b": dict(
        vocab_size=32000, n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048
    ),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """The named size with `overrides` applied."""
    if name not in SIZES:
        from orchestrator.schema import ConfigError

        raise ConfigError(f"model.name={name!r} is not a known size; known sizes: {', '.join(SIZES)}")
    return dataclasses.replace(ModelConfig(name=name, **SIZES[name]), **overrides)


def _divisors_hint(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0 and k <= 64)
