"""Model hyper-parameters and the ladder of named sizes.

A size is chosen by name (`model.name: tinyllama-1.1b`); any field given next to the name
overrides the preset, so `--model.name tinyllama-1.1b --model.n_layers 4` is a 4-layer
TinyLlama-shaped model. Research options (`attn_gate`, `sandwich_norm`) and stability options
(`qk_norm`, `z_loss`) are off in every preset and switched on per run: `--model.attn_gate headwise`.
Regularisation (`dropout`, for finetuning) is off in every preset too.

Kernel choices (`attention`, `rmsnorm_kernel`, `swiglu_kernel`, `rope_kernel`, `loss_kernel`,
`compile`; see models/kernels.py) change how the same function is computed, never the weights:
a checkpoint trained with one set resumes, exports and generates with any other. Training-only
terms (`z_loss`, `dropout`) are not kernel fields but leave the weights alike too: they may also differ
between a checkpoint and the run that resumes or starts from it (orchestrator/checkpoint/resume.py).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, get_args


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix.

    Defined here, in the lowest layer, so that the model's own checks (and models/kernels.py's
    `KernelUnavailable`) raise the class the orchestrator's config tree raises and reports.
    """


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description (shown in the config reference)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


AttnGate = Literal["none", "headwise", "elementwise"]
AttentionKernel = Literal["auto", "sdpa", "flash_attn", "xformers", "eager"]
RMSNormKernel = Literal["auto", "eager", "liger", "flash_attn"]
SwiGLUKernel = Literal["auto", "eager", "liger", "flash_attn", "xformers"]
RoPEKernel = Literal["auto", "eager", "liger", "flash_attn"]
LossKernel = Literal["auto", "cross_entropy", "chunked", "liger_fused", "liger", "flash_attn"]
Arch = Literal["decoder", "encoder_decoder"]

# Fields that choose an implementation, not a model: they may differ between a checkpoint and the
# run that resumes from it.
KERNEL_FIELDS = (
    "attention",
    "rmsnorm_kernel",
    "swiglu_kernel",
    "rope_kernel",
    "loss_kernel",
    "compile",
)


@dataclass
class ModelConfig:
    """Llama-2 architecture hyper-parameters, plus optional research variants (all off by default).

    `arch: encoder_decoder` is the same blocks arranged as RedLLM (models/encdec.py): n_layers
    encoder and n_layers decoder blocks, trained by prefix language modelling."""

    name: str = doc(
        "tinyllama-1.1b",
        "Named size to start from (see `orchestrator models`); other model keys override it.",
    )
    arch: Arch = doc(
        "decoder",
        "`decoder` (Llama, causal LM) or `encoder_decoder` (RedLLM prefix LM, the `redllm-*` sizes; "
        "docs/encoder-decoder.md).",
    )
    encoder_len: int = doc(
        0,
        "encoder_decoder: tokens of each block the encoder reads (the decoder predicts the rest); 0 = half the block.",
    )
    vocab_size: int = doc(
        32000, "Vocabulary size (rows of the embedding); must be >= the tokenizer's."
    )
    n_layers: int = doc(22, "Number of transformer blocks.")
    d_model: int = doc(2048, "Width of the residual stream.")
    n_heads: int = doc(32, "Query heads; must divide d_model.")
    n_kv_heads: int = doc(4, "Key/value heads (grouped-query attention); must divide n_heads.")
    ffn_hidden: int = doc(5632, "Hidden width of the SwiGLU feed-forward block.")
    max_seq_len: int = doc(2048, "Context length the model is built for.")
    rope_base: float = doc(10000.0, "RoPE base frequency (theta).")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = doc(False, "Share the input embedding and the output projection.")
    init_std: float = doc(
        0.02, "Std of the normal init; residual projections are scaled by 1/sqrt(2*n_layers)."
    )
    attention: AttentionKernel = doc(
        "auto",
        "Attention kernel: `sdpa`, `flash_attn`, `xformers`, `eager` (reference) or `auto` (flash_attn "
        "where usable, else sdpa); docs/gpus.md.",
    )
    rmsnorm_kernel: RMSNormKernel = doc(
        "auto",
        "RMSNorm kernel: `eager`, `liger`, `flash_attn`; `auto`: liger, then flash_attn on CUDA when "
        "installed, else eager.",
    )
    swiglu_kernel: SwiGLUKernel = doc(
        "auto",
        "SwiGLU kernel: `eager`, `liger`, `flash_attn`, `xformers` (projections fused too); `auto`: "
        "liger, then flash_attn on CUDA, else eager.",
    )
    rope_kernel: RoPEKernel = doc(
        "auto",
        "Rotary embedding: `eager`, `liger`, `flash_attn` (Triton rotary); `auto`: liger, then "
        "flash_attn, on CUDA when installed, else eager.",
    )
    loss_kernel: LossKernel = doc(
        "auto",
        "Loss: `cross_entropy` (reference), `chunked`, `liger_fused`, `liger`, `flash_attn`; `auto`: "
        "liger_fused on CUDA when installed, else chunked.",
    )
    compile: bool = doc(
        False,
        "torch.compile each transformer block (applied by the trainer after the model is built; "
        "parameter names unchanged).",
    )
    attn_gate: AttnGate = doc(
        "none",
        "Gated attention (arXiv 2505.06708): `none`, `headwise` or `elementwise` sigmoid gate on each "
        "head's output; not exportable to HF Llama.",
    )
    sandwich_norm: bool = doc(
        False,
        "RMSNorm each attention / FFN output before it is added to the residual stream (adds two norms per "
        "block). Not exportable to LlamaForCausalLM.",
    )
    qk_norm: bool = doc(
        False,
        "QK-norm (OLMo-2, Qwen3): RMSNorm of each head's queries and keys before RoPE; not exportable to HF Llama.",
    )
    z_loss: float = doc(
        0.0,
        "Weight of the z-loss (PaLM; OLMo 1e-4) added to the training loss, logged as train/z_loss; 0 = "
        "off; docs/training.md.",
    )
    dropout: float = doc(
        0.0,
        "Dropout on the embedding output and each residual branch, training mode only (RedLLM "
        "finetuning: 0.05); 0 = off; docs/architecture.md.",
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gate_dim(self) -> int:
        """Output width of the attention gate projection (0 when there is no gate)."""
        return {"none": 0, "headwise": self.n_heads, "elementwise": self.n_heads * self.head_dim}[
            self.attn_gate
        ]

    def validate(self) -> None:
        """Raise ConfigError naming the offending key and the fix; called before anything is built."""
        for key in (
            "vocab_size",
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "ffn_hidden",
            "max_seq_len",
        ):
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
            raise ConfigError(
                f"model head_dim = d_model/n_heads = {self.head_dim} must be even for RoPE"
            )
        for key in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"model.{key} must be a positive number, got {value!r}")
        if self.rope_base <= 1:
            raise ConfigError(
                f"model.rope_base={self.rope_base} must be > 1 (Llama-2 uses 10000; Llama-3 500000 for long context)"
            )
        for key, literal in (
            ("arch", Arch),
            ("attn_gate", AttnGate),
            ("attention", AttentionKernel),
            ("rmsnorm_kernel", RMSNormKernel),
            ("swiglu_kernel", SwiGLUKernel),
            ("rope_kernel", RoPEKernel),
            ("loss_kernel", LossKernel),
        ):
            if getattr(self, key) not in get_args(literal):
                choices = " | ".join(get_args(literal))
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is not one of {choices}")
        if not isinstance(self.sandwich_norm, bool):
            raise ConfigError(f"model.sandwich_norm={self.sandwich_norm!r} must be true or false")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"model.qk_norm={self.qk_norm!r} must be true or false")
        if (
            isinstance(self.z_loss, bool)
            or not isinstance(self.z_loss, (int, float))
            or not self.z_loss >= 0
            or self.z_loss == float("inf")
        ):
            raise ConfigError(
                f"model.z_loss={self.z_loss!r} must be a number >= 0 (0 turns it off; OLMo uses 1e-4)"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ConfigError(
                f"model.dropout={self.dropout!r} must be a number in [0, 1) (0 turns it off; finetuning "
                "typically uses 0.05-0.1)"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"model.tie_embeddings={self.tie_embeddings!r} must be true or false")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"model.compile={self.compile!r} must be true or false")
        if isinstance(self.encoder_len, bool) or not isinstance(self.encoder_len, int):
            raise ConfigError(f"model.encoder_len={self.encoder_len!r} must be an integer")
        if self.arch == "decoder" and self.encoder_len:
            raise ConfigError(
                f"model.encoder_len={self.encoder_len} applies to model.arch=encoder_decoder only: "
                "remove it, or set model.arch: encoder_decoder"
            )
        if self.arch == "encoder_decoder":
            if not 0 <= self.encoder_len < self.max_seq_len:
                raise ConfigError(
                    f"model.encoder_len={self.encoder_len} must be in [0, model.max_seq_len={self.max_seq_len}) "
                    "(0 = half of each block)"
                )
            research = [
                k
                for k in ("attn_gate", "sandwich_norm", "qk_norm")
                if getattr(self, k) not in ("none", False)
            ]
            if research:
                raise ConfigError(
                    f"model.{research[0]} is implemented for model.arch=decoder only; "
                    "the encoder-decoder has the paper's plain blocks: remove it"
                )

    def encoder_tokens(self, block_len: int, encoder_len: int | None = None) -> int:
        """arch encoder_decoder: tokens of a block of `block_len` the encoder reads: `encoder_len` if
        given, else model.encoder_len, or half the block (models/encdec.py); both halves non-empty."""
        P = encoder_len if encoder_len is not None else (self.encoder_len or block_len // 2)
        if not 0 < P < block_len:
            raise ValueError(
                f"an encoder length of {P} (model.encoder_len={self.encoder_len}) splits a block of {block_len} "
                "tokens into an empty encoder or decoder half: both need at least one token (0 = half the block)"
            )
        return P

    def num_params(self) -> int:
        """Exact parameter count, computed from the shapes (no model is built); tied weights count once."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        gate = d * self.gate_dim + self.gate_dim  # weight + bias
        ffn = 3 * d * self.ffn_hidden
        norms = (4 if self.sandwich_norm else 2) * d
        qk_norms = 2 * hd if self.qk_norm else 0  # one gain for the queries, one for the keys
        block = attn + gate + ffn + norms + qk_norms
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if self.arch == "encoder_decoder":
            # Encoder block as above; decoder block adds cross-attention (the shapes of `attn`) and
            # its norm; a final norm per stack.
            decoder_block = block + attn + d
            return self.n_layers * (block + decoder_block) + embed + head + 2 * d
        return self.n_layers * block + embed + head + d

    def num_non_embedding_params(self) -> int:
        """Parameters outside the embedding and output projection (the N of scaling-law fits)."""
        return self.num_params() - self.vocab_size * self.d_model * (
            1 if self.tie_embeddings else 2
        )


# The ladder of named sizes. `tiny` learns the sample corpus on a CPU in minutes (its own
# 1024-token vocabulary). The others use Llama-2's 32000-token vocabulary, head_dim 64 (80 for
# 2b) and grouped-query attention; `llama-124m` is GPT-2-small scale (the model llm.c reproduces),
# `tinyllama-1.1b` is exactly the released TinyLlama shape (1,100,048,384 parameters).
SIZES: dict[str, dict] = {
    # The CPU scaling ladder (the sample corpus's 1024-token vocabulary, like `tiny`; multi-head
    # attention, head_dim 32, as the encoder-decoder paper's models; each within 5% of its redllm-*
    # partner's count): what a 2-core machine fits scaling laws over in about an hour
    # (benchmarks/encdec_scaling.py).
    "micro-0.6m": dict(
        vocab_size=1024,
        n_layers=4,
        d_model=96,
        n_heads=3,
        n_kv_heads=3,
        ffn_hidden=256,
        max_seq_len=256,
    ),
    "micro-1m": dict(
        vocab_size=1024,
        n_layers=4,
        d_model=128,
        n_heads=4,
        n_kv_heads=4,
        ffn_hidden=344,
        max_seq_len=256,
    ),
    "micro-1.5m": dict(
        vocab_size=1024,
        n_layers=4,
        d_model=160,
        n_heads=5,
        n_kv_heads=5,
        ffn_hidden=424,
        max_seq_len=256,
    ),
    "micro-2m": dict(
        vocab_size=1024,
        n_layers=4,
        d_model=192,
        n_heads=6,
        n_kv_heads=6,
        ffn_hidden=512,
        max_seq_len=256,
    ),
    "tiny": dict(
        vocab_size=1024,
        n_layers=4,
        d_model=256,
        n_heads=8,
        n_kv_heads=4,
        ffn_hidden=688,
        max_seq_len=256,
    ),
    "micro-5m": dict(
        vocab_size=1024,
        n_layers=7,
        d_model=224,
        n_heads=7,
        n_kv_heads=7,
        ffn_hidden=600,
        max_seq_len=256,
    ),
    "micro-9m": dict(
        vocab_size=1024,
        n_layers=7,
        d_model=320,
        n_heads=10,
        n_kv_heads=10,
        ffn_hidden=856,
        max_seq_len=256,
    ),
    "llama-20m": dict(
        vocab_size=32000,
        n_layers=6,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=704,
        max_seq_len=2048,
    ),
    "llama-60m": dict(
        vocab_size=32000,
        n_layers=8,
        d_model=512,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=1408,
        max_seq_len=2048,
    ),
    "llama-124m": dict(
        vocab_size=32000,
        n_layers=12,
        d_model=768,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=2048,
        max_seq_len=2048,
    ),
    "llama-400m": dict(
        vocab_size=32000,
        n_layers=24,
        d_model=1024,
        n_heads=16,
        n_kv_heads=4,
        ffn_hidden=3584,
        max_seq_len=2048,
    ),
    "llama-700m": dict(
        vocab_size=32000,
        n_layers=24,
        d_model=1536,
        n_heads=24,
        n_kv_heads=4,
        ffn_hidden=4096,
        max_seq_len=2048,
    ),
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        n_layers=22,
        d_model=2048,
        n_heads=32,
        n_kv_heads=4,
        ffn_hidden=5632,
        max_seq_len=2048,
    ),
    "llama-2b": dict(
        vocab_size=32000,
        n_layers=28,
        d_model=2560,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=6912,
        max_seq_len=2048,
    ),
}


# RedLLM sizes (model.arch encoder_decoder, models/encdec.py): each is the width, heads and feed-forward
# of the decoder size it pairs with, all embeddings tied (as the paper's), and the number of layers per
# stack that brings its parameter count closest to the decoder's (`orchestrator models` shows both):
# an encoder-decoder layer pair costs ~2.3 decoder blocks, and tying saves one vocab x d_model matrix,
# which is most of a small model (hence 8 + 8 layers against llama-20m's 6).
REDLLM_PAIRS: dict[str, tuple[str, int]] = {
    "redllm-micro-0.6m": ("micro-0.6m", 2),
    "redllm-micro-1m": ("micro-1m", 2),
    "redllm-micro-1.5m": ("micro-1.5m", 2),
    "redllm-micro-2m": ("micro-2m", 2),
    "redllm-tiny": ("tiny", 2),
    "redllm-micro-5m": ("micro-5m", 3),
    "redllm-micro-9m": ("micro-9m", 3),
    "redllm-20m": ("llama-20m", 8),
    "redllm-60m": ("llama-60m", 6),
    "redllm-124m": ("llama-124m", 7),
    "redllm-400m": ("llama-400m", 12),
    "redllm-700m": ("llama-700m", 12),
    "redllm-1.1b": ("tinyllama-1.1b", 11),
    "redllm-2b": ("llama-2b", 13),
}
for _name, (_decoder, _layers) in REDLLM_PAIRS.items():
    SIZES[_name] = dict(
        SIZES[_decoder], arch="encoder_decoder", tie_embeddings=True, n_layers=_layers
    )


def paired_size(name: str) -> str | None:
    """The size of the other family with about the same parameter count (None if there is none)."""
    if name in REDLLM_PAIRS:
        return REDLLM_PAIRS[name][0]
    return next((red for red, (dec, _) in REDLLM_PAIRS.items() if dec == name), None)


def model_config(name: str, **overrides) -> ModelConfig:
    """The named size with `overrides` applied."""
    if name not in SIZES:
        close = difflib.get_close_matches(name, list(SIZES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"model.name={name!r} is not a known size; known sizes: {', '.join(SIZES)}.{hint} "
            "(`orchestrator models` lists them with parameter counts)"
        )
    return dataclasses.replace(ModelConfig(name=name, **SIZES[name]), **overrides)


def _divisors_hint(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0 and k <= 64)
