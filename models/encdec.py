"""RedLLM: the encoder-decoder LLM of arXiv 2510.26622, in plain single-device PyTorch.

The blocks are Llama's (models/llama.py): pre-norm RMSNorm, multi-head (or grouped-query)
dot-product attention, SwiGLU, rotary embeddings. The paper's arrangement:

  * a bidirectional encoder of n_layers blocks over the input tokens, and a causal decoder of
    n_layers blocks (balanced) over the target tokens, each decoder block with cross-attention to
    the encoder's output between its self-attention and its feed-forward;
  * RoPE everywhere with continuous positions: the encoder's tokens sit at 0..P-1, the decoder's
    at P, P+1, ...; cross-attention rotates its queries at the decoder's positions and its keys
    at the encoder's, so relative distance means the same in all three attentions;
  * one word embedding for the encoder's input, the decoder's input and the output projection
    (model.tie_embeddings, on in every `redllm-*` size).

Prefix language modelling from the decoder's own token blocks. The trainer hands every model a
block's inputs and next-token targets, (B, T) each. Here the first P = model.encoder_len tokens
(default T/2) go to the encoder; the decoder reads inputs P..T-1 and predicts targets P..T-1
(block tokens P+1..T): exactly the predictions a decoder-only model makes at those positions,
over the same data in the same order. The decoder's first input is a given token (block token P),
which is what generation feeds it too: the prompt's last token starts the decoder.

Dropout (model.dropout, finetuning; the paper's 0.05): as in Llama (models/llama.py,
`residual_dropout`), on the embedding output of both stacks and on each residual branch's output
before it is added: the encoder blocks' attention and FFN, the decoder blocks' self-attention,
cross-attention and FFN. Training mode only, and skipped (no random draw) at 0.

Generation (`EncoderDecoderCache`): the prompt's first T-1 tokens are encoded once; each decoder
layer's cross-attention keys/values are computed from them once and cached; the decoder then
runs one position at a time with a self-attention KV cache, as Llama's does.

Shapes: B batch, P encoder tokens, T decoder tokens (new ones when generating), S keys, D
d_model, H query heads, K key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.kernels import KernelPlan
from models.llama import (
    Attention,
    Block,
    KVCache,
    LanguageModel,
    OutputHead,
    RMSNorm,
    SwiGLU,
    apply_rope,
    default_plan,
    full_attention,
    residual_dropout,
    rope_cos_sin,
)


class EncoderDecoderCache:
    """Generation state: the decoder's self-attention KV cache (indexed from the decoder's first
    token), each decoder layer's cross-attention keys/values (computed once from the encoder's
    output), and where the decoder starts (the encoder's length)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.self_attn = KVCache(cfg, batch_size, max_len, device, dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.n_layers
        self.encoder_len: int | None = None


class CrossAttention(nn.Module):
    """Decoder queries attend to every encoder output (no mask): q from the decoder's stream, k and
    v from the encoder's output, both rotated at their own (continuous) positions."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def memory_kv(
        self, memory: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, P, D), the encoder's output; cos/sin at positions 0..P-1 -> k, v: (B, K, P, E)."""
        B, P, _ = memory.shape
        k = self.k_proj(memory).view(B, P, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, P, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v  # (B, K, P, E) each

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        eager: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, D), the block's normalised input; cos/sin at the decoder's positions (T, E);
        k, v: (B, K, P, E) from `memory_kv` -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        y = full_attention(apply_rope(q, cos, sin), k, v, eager=eager)  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder, SwiGLU; each pre-normed and added to
    the residual stream (through `residual_dropout` with model.dropout in training mode)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)  # causal, any attention kernel
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.dropout = float(cfg.dropout)  # on each branch's output (training mode; no parameter)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        memory: torch.Tensor | None,
        memory_cos: torch.Tensor | None,
        memory_sin: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
        start: int = 0,
        kernels: KernelPlan | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) decoder stream; memory: (B, P, D) encoder output (None when `cache` already
        holds this layer's cross keys/values); `start`: index of x's first token in the decoder."""
        kernels = kernels or default_plan(self.cfg, x)
        layer = self.cross_attn.layer_idx
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:
            k, v = self.cross_attn.memory_kv(memory, memory_cos, memory_sin)  # (B, K, P, E)
            if cache is not None:
                cache.cross[layer] = (k, v)
        self_cache = cache.self_attn if cache is not None else None
        p, training = self.dropout, self.training
        h = self.attn(self.attn_norm(x, kernels.rmsnorm), cos, sin, self_cache, start, kernels)
        x = x + residual_dropout(h, p, training)  # (B, T, D)
        h = self.cross_attn(
            self.cross_norm(x, kernels.rmsnorm), cos, sin, k, v, eager=kernels.attention == "eager"
        )
        x = x + residual_dropout(h, p, training)  # (B, T, D)
        h = self.ffn(self.ffn_norm(x, kernels.rmsnorm), kernels.swiglu)  # (B, T, D)
        return x + residual_dropout(h, p, training)  # (B, T, D)


class EncoderDecoder(LanguageModel):
    """RedLLM. Parameters: `embed` (shared by encoder input, decoder input and, tied, the output),
    `encoder_blocks` + `encoder_norm`, `decoder_blocks` + `norm`, `lm_head`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.arch != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs model.arch=encoder_decoder, got {cfg.arch!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder_blocks = nn.ModuleList(
            Block(cfg, i, causal=False) for i in range(cfg.n_layers)
        )
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size, bias=False)
        self._finish_init()

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, P) at positions 0..P-1 -> the encoder's output (B, P, D)."""
        x = residual_dropout(self.embed(input_ids), self.cfg.dropout, self.training)  # (B, P, D)
        kernels = default_plan(self.cfg, x)
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_base, x.device, x.dtype
        )
        for block in self.encoder_blocks:
            x = block(x, cos, sin, kernels=kernels)  # (B, P, D)
        return self.encoder_norm(x, kernels.rmsnorm)

    def decode(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor | None,
        encoder_len: int,
        start: int = 0,
        cache: EncoderDecoderCache | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) decoder tokens, the first at decoder index `start` (position
        encoder_len + start); memory: (B, P, D) -> logits (B, T, V), or the mean loss () given targets."""
        T = input_ids.shape[1]
        x = residual_dropout(self.embed(input_ids), self.cfg.dropout, self.training)  # (B, T, D)
        kernels = default_plan(self.cfg, x)
        E, base = self.cfg.head_dim, self.cfg.rope_base
        cos, sin = rope_cos_sin(T, E, base, x.device, x.dtype, offset=encoder_len + start)  # (T, E)
        memory_cos = memory_sin = None
        if memory is not None:
            memory_cos, memory_sin = rope_cos_sin(memory.shape[1], E, base, x.device, x.dtype)
        for block in self.decoder_blocks:
            x = block(x, cos, sin, memory, memory_cos, memory_sin, cache, start, kernels)
        z_loss = self.cfg.z_loss if self.training else 0.0  # a training objective: eval is plain CE
        return self.lm_head(self.norm(x, kernels.rmsnorm), targets, kernels.loss, z_loss)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: EncoderDecoderCache | None = None,
        start_pos: int = 0,
        targets: torch.Tensor | None = None,
        encoder_len: int | None = None,
    ) -> torch.Tensor:
        """Prefix LM over a block. input_ids, targets: (B, T); the first P = encoder_len (default
        model.encoder_len, or T/2) inputs are encoded, the decoder reads inputs P.. and predicts
        targets P.. -> decoder logits (B, T-P, V), or their mean loss () given targets.

        With a `kv_cache` (generation), start_pos=0 takes a prompt: its first T-1 tokens are
        encoded, its last starts the decoder -> logits (B, 1, V); later calls take the tokens at
        sequence positions start_pos.. -> (B, T, V).
        """
        B, T = input_ids.shape
        if kv_cache is not None:
            return self._generation_step(input_ids, kv_cache, start_pos)
        P = self.cfg.encoder_tokens(T, encoder_len)
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        memory = self.encode(input_ids[:, :P])  # (B, P, D)
        dec_targets = targets[:, P:] if targets is not None else None
        return self.decode(input_ids[:, P:], memory, P, targets=dec_targets)

    def _generation_step(
        self, input_ids: torch.Tensor, cache: EncoderDecoderCache, start_pos: int
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start_pos + T} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        if start_pos == 0:  # the prompt: all but its last token to the encoder
            if T < 2:
                raise ValueError(
                    "the encoder-decoder needs a prompt of at least 2 tokens (the encoder reads all "
                    "but the last, which starts the decoder): prepend BOS"
                )
            cache.encoder_len = T - 1
            cache.cross = [None] * self.cfg.n_layers  # a new prompt: new cross keys/values
            memory = self.encode(input_ids[:, : T - 1])  # (B, T-1, D)
            return self.decode(input_ids[:, T - 1 :], memory, T - 1, 0, cache)  # (B, 1, V)
        if cache.encoder_len is None:
            raise ValueError("generation starts with start_pos=0 (the prompt)")
        P = cache.encoder_len
        return self.decode(input_ids, None, P, start_pos - P, cache)  # (B, T, V)
