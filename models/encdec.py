"""RedLLM: the encoder-decoder LLM of arXiv 2510.26622, in plain single-device PyTorch.

Llama's blocks (models/llama.py): a bidirectional encoder over the first P tokens of each block
and a causal decoder with cross-attention over the rest (prefix LM), RoPE with positions
continuous from encoder to decoder, one tied word embedding. The arrangement, packed examples
(`doc_ids`, `decoder_mask`), dropout and generation: docs/encoder-decoder.md.

Shapes: B batch, P encoder tokens, T decoder tokens (new ones when generating), S keys, D
d_model, H query heads, K key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.config import ModelConfig
from models.kernels import KernelChoice, compute_dtype
from models.llama import (
    Attention,
    Block,
    DocumentMask,
    KVCache,
    LanguageModel,
    OutputHead,
    PackedLayout,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention_bias,
    document_layout,
    document_mask,
    document_positions,
    full_attention,
    kernels_for,
    residual_dropout,
    rope_cos_sin,
)

PAD_MULTIPLE = 8  # packed encoder / decoder rows are padded to a multiple of this (fewer shapes)
ENCODER_PAD, DECODER_PAD = (
    -1,
    -2,
)  # pad positions' example ids: never an example's, never each other's


@dataclass(frozen=True)
class PackedExamples:
    """A block's positions split between the encoder and the decoder (`pack_examples`).

    encoder_*: (B, P); decoder_*: (B, T'); ids the tokens, positions their RoPE positions (offset
    in their example), docs their example ids (ENCODER_PAD / DECODER_PAD at padding), index their
    position in the block; targets (B, T') the decoder's (ignore_index at padding) or None.
    """

    encoder_ids: torch.Tensor
    encoder_positions: torch.Tensor
    encoder_docs: torch.Tensor
    decoder_ids: torch.Tensor
    decoder_positions: torch.Tensor
    decoder_docs: torch.Tensor
    decoder_index: torch.Tensor
    targets: torch.Tensor | None
    layout: PackedLayout  # the rows' lengths and the decoder's documents, as numbers

    @property
    def decoder_valid(self) -> torch.Tensor:
        return self.decoder_docs != DECODER_PAD  # (B, T')


@dataclass(frozen=True)
class CrossMask:
    """Which encoder positions each decoder query may read: mask (B, 1, T', P) additive
    (`attention_bias`; rows without any key opened up, to keep the softmax finite) and reads
    (B, 1, T', 1), False for a query with no encoder position of its example (its
    cross-attention output is zeroed)."""

    mask: torch.Tensor
    reads: torch.Tensor


def _padded(n: int, limit: int) -> int:
    """n rounded up to a multiple of PAD_MULTIPLE, at least 1, at most `limit`."""
    return min(limit, max(1, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE))


def packed_layout(decoder_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> PackedLayout:
    """decoder_mask, doc_ids: (B, T) -> the padded lengths of the encoder's and the decoder's rows
    and the decoder's documents (flash_attn's cu_seqlens). Reads the masks' values: call it where
    they are (the trainer's host copy), not on GPU tensors in the forward."""
    B, T = decoder_mask.shape
    to_decoder = decoder_mask.bool()
    n_dec = to_decoder.sum(dim=1)  # (B,)
    P, D = _padded(int((T - n_dec).max()), T), _padded(int(n_dec.max()), T)
    _, _, dec_index, dec_valid = _split(to_decoder, P, D)
    docs = torch.zeros(B, T, dtype=torch.long) if doc_ids is None else doc_ids.long()
    decoder = document_layout(torch.where(dec_valid, docs.gather(1, dec_index), DECODER_PAD))
    return PackedLayout(decoder.cu_seqlens, decoder.max_seqlen, encoder_len=P, decoder_len=D)


def _split(
    to_decoder: torch.Tensor, P: int, D: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """to_decoder: (B, T) bool -> each row's encoder positions (B, P) and decoder positions (B, D)
    in block order, left-aligned (indices into the block), and which of them are not padding."""
    T = to_decoder.shape[1]
    n_dec = to_decoder.sum(dim=1)  # (B,)
    n_enc = T - n_dec
    # Encoder positions first, then the decoder's, each in block order.
    order = torch.sort(to_decoder.to(torch.int8), dim=1, stable=True).indices  # (B, T)
    columns = torch.arange(max(P, D), device=to_decoder.device)
    enc_index = order[:, :P]  # (B, P)
    enc_valid = columns[:P] < n_enc[:, None]  # (B, P)
    dec_index = order.gather(1, (n_enc[:, None] + columns[:D]).clamp(max=T - 1))  # (B, D)
    dec_valid = columns[:D] < n_dec[:, None]  # (B, D)
    return enc_index, enc_valid, dec_index, dec_valid


def pack_examples(
    input_ids: torch.Tensor,
    decoder_mask: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    layout: PackedLayout | None = None,
) -> PackedExamples:
    """input_ids, decoder_mask (True: the decoder's position), doc_ids, targets: (B, T) -> the
    encoder's positions of each row (in order, left-aligned, padded) and the decoder's. The rows'
    lengths come from `layout` (`packed_layout`, found on the host); without one they are found
    here: a host sync on a GPU."""
    B, T = input_ids.shape
    device = input_ids.device
    if layout is None:
        layout = packed_layout(decoder_mask, doc_ids)
    if doc_ids is None:  # one example per row
        doc_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    _, positions = document_positions(doc_ids.to(device))  # (B, T)
    to_decoder = decoder_mask.to(device=device, dtype=torch.bool)
    P, D = layout.encoder_len, layout.decoder_len
    enc_index, enc_valid, dec_index, dec_valid = _split(to_decoder, P, D)
    docs = doc_ids.to(device).long()
    return PackedExamples(
        encoder_ids=input_ids.gather(1, enc_index),
        encoder_positions=positions.gather(1, enc_index),
        encoder_docs=torch.where(enc_valid, docs.gather(1, enc_index), ENCODER_PAD),
        decoder_ids=input_ids.gather(1, dec_index),
        decoder_positions=positions.gather(1, dec_index),
        decoder_docs=torch.where(dec_valid, docs.gather(1, dec_index), DECODER_PAD),
        decoder_index=dec_index,
        targets=None
        if targets is None
        else torch.where(dec_valid, targets.to(device).gather(1, dec_index), ignore_index),
        layout=layout,
    )


def response_split(counted: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Instruction data's decoder_mask: counted (B, T) bool, True where a position's target counts
    (a response token or the EOS is predicted there); doc_ids (B, T) its example -> (B, T) bool,
    True from each example's first counted position on. The encoder reads only what comes before
    an example's first response (its prompt, but the last token), so nothing it reads lies after
    a target: a chat's later turns and the EOS are decoder input, read causally."""
    c = counted.long()
    seen = c.cumsum(dim=1)  # (B, T): counted positions up to here in the row
    if doc_ids is None:
        return seen > 0
    starts, _ = document_positions(doc_ids)  # (B, T)
    before = torch.where(starts, seen - c, 0).cummax(dim=1).values  # counted before the example
    return seen - before > 0


def encoder_mask(packed: PackedExamples, dtype: torch.dtype) -> DocumentMask:
    """The encoder's attention over packed examples: bidirectional within an example (its mask in
    `dtype`, the attention's compute dtype)."""
    enc = packed.encoder_docs  # (B, P)
    same = (enc[:, :, None] == enc[:, None, :])[:, None]  # (B, 1, P, P)
    return DocumentMask(packed.encoder_positions, mask=attention_bias(same, dtype))


def decoder_masks(
    packed: PackedExamples, attention: str, dtype: torch.dtype, layout: PackedLayout
) -> tuple[DocumentMask, CrossMask]:
    """The decoder's self-attention over packed examples (causal within an example, for attention
    kernel `attention`; flash_attn's documents from `layout`) and its cross-attention (to its
    example's encoder positions), masks in `dtype`."""
    enc, dec = packed.encoder_docs, packed.decoder_docs  # (B, P), (B, T')
    # The decoder's example ids are non-decreasing along its row (block order), padding last.
    docs = document_mask(dec, attention, dtype, layout)
    docs = DocumentMask(packed.decoder_positions, docs.mask, docs.cu_seqlens, docs.max_seqlen)
    cross = dec[:, :, None] == enc[:, None, :]  # (B, T', P)
    reads = cross.any(dim=-1, keepdim=True)  # (B, T', 1)
    return docs, CrossMask(attention_bias((cross | ~reads)[:, None], dtype), reads[:, None])


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
        cross: CrossMask | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D), the block's normalised input; cos/sin at the decoder's positions ((T, E) or
        per token (B, T, E)); k, v: (B, K, P, E) from `memory_kv`; `cross`: packed examples' mask
        -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        mask = None if cross is None else cross.mask  # (B, 1, T, P)
        y = full_attention(apply_rope(q, cos, sin), k, v, eager=eager, mask=mask)  # (B, H, T, E)
        if cross is not None:  # a query without its example's encoder positions reads nothing
            y = y * cross.reads  # (B, H, T, E) * (B, 1, T, 1)
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
        kernels: KernelChoice | None = None,
        docs: DocumentMask | None = None,
        cross: CrossMask | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) decoder stream; memory: (B, P, D) encoder output (None when `cache` already
        holds this layer's cross keys/values); `start`: index of x's first token in the decoder;
        docs, cross: packed examples' self- and cross-attention masks (`decoder_masks`)."""
        kernels = kernels or kernels_for(self.cfg, x)
        layer = self.cross_attn.layer_idx
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:
            k, v = self.cross_attn.memory_kv(memory, memory_cos, memory_sin)  # (B, K, P, E)
            if cache is not None:
                cache.cross[layer] = (k, v)
        self_cache = cache.self_attn if cache is not None else None
        p, training = self.dropout, self.training
        h = self.attn(
            self.attn_norm(x, kernels.rmsnorm), cos, sin, self_cache, start, kernels, docs
        )
        x = x + residual_dropout(h, p, training)  # (B, T, D)
        eager = kernels.attention == "eager"
        h = self.cross_attn(self.cross_norm(x, kernels.rmsnorm), cos, sin, k, v, eager, cross)
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

    def encode(self, input_ids: torch.Tensor, packed: PackedExamples | None = None) -> torch.Tensor:
        """input_ids: (B, P) at positions 0..P-1 (`packed` examples: each at its position in its
        example, attending within it) -> the encoder's output (B, P, D)."""
        x = residual_dropout(self.embed(input_ids), self.cfg.dropout, self.training)  # (B, P, D)
        kernels = kernels_for(self.cfg, x)
        dtype = compute_dtype(x.device.type, x.dtype)
        docs = None if packed is None else encoder_mask(packed, dtype)
        cos, sin = rope_cos_sin(
            input_ids.shape[1],
            self.cfg.head_dim,
            self.cfg.rope_base,
            x.device,
            x.dtype,
            positions=None if docs is None else docs.positions,
        )  # (P, E) | (B, P, E)
        for block in self.encoder_blocks:
            x = block(x, cos, sin, kernels=kernels, docs=docs)  # (B, P, D)
        return self.encoder_norm(x, kernels.rmsnorm)

    def decode(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor | None,
        encoder_len: int,
        start: int = 0,
        cache: EncoderDecoderCache | None = None,
        targets: torch.Tensor | None = None,
        packed: PackedExamples | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) decoder tokens, the first at decoder index `start` (position
        encoder_len + start); memory: (B, P, D) -> logits (B, T, V), or the mean loss () given
        targets. `packed` examples: each token at its position in its example, attending within
        it, the memory's keys at their positions."""
        T = input_ids.shape[1]
        x = residual_dropout(self.embed(input_ids), self.cfg.dropout, self.training)  # (B, T, D)
        kernels = kernels_for(self.cfg, x)
        E, base = self.cfg.head_dim, self.cfg.rope_base
        docs = cross = None
        if packed is not None:  # built once for all layers
            dtype = compute_dtype(x.device.type, x.dtype)
            docs, cross = decoder_masks(packed, kernels.attention, dtype, packed.layout)
        cos, sin = rope_cos_sin(
            T,
            E,
            base,
            x.device,
            x.dtype,
            offset=encoder_len + start,
            positions=None if docs is None else docs.positions,
        )  # (T, E) | (B, T, E)
        memory_cos = memory_sin = None
        if memory is not None:
            memory_cos, memory_sin = rope_cos_sin(
                memory.shape[1],
                E,
                base,
                x.device,
                x.dtype,
                positions=None if packed is None else packed.encoder_positions,
            )  # (P, E) | (B, P, E)
        for block in self.decoder_blocks:
            x = block(
                x, cos, sin, memory, memory_cos, memory_sin, cache, start, kernels, docs, cross
            )
        z_loss = self.cfg.z_loss if self.training else 0.0  # a training objective: eval is plain CE
        return self.lm_head(self.norm(x, kernels.rmsnorm), targets, kernels.loss, z_loss)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: EncoderDecoderCache | None = None,
        start_pos: int = 0,
        targets: torch.Tensor | None = None,
        encoder_len: int | None = None,
        doc_ids: torch.Tensor | None = None,
        decoder_mask: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """Prefix LM over a block. input_ids, targets: (B, T); the first P = encoder_len (default
        model.encoder_len, or T/2) inputs are encoded, the decoder reads inputs P.. and predicts
        targets P.. -> decoder logits (B, T-P, V), or their mean loss () given targets.

        Packed examples (docs/encoder-decoder.md): with `doc_ids` and / or `decoder_mask` (B, T) each
        example is encoded and decoded on its own, the encoder reading the positions where
        decoder_mask is False (default: those before P) -> logits (B, T, V) at the decoder's
        positions (zero at the encoder's), or the mean loss over the decoder's targets.
        `layout`: `packed_layout(decoder_mask, doc_ids)` found on the host (else found here: a
        host sync on a GPU).

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
        if doc_ids is not None or decoder_mask is not None:
            if decoder_mask is None:  # text: the prefix-LM split of every row
                decoder_mask = (torch.arange(T, device=input_ids.device) >= P).expand(B, T)
            return self._packed_forward(input_ids, targets, doc_ids, decoder_mask, layout)
        memory = self.encode(input_ids[:, :P])  # (B, P, D)
        dec_targets = targets[:, P:] if targets is not None else None
        return self.decode(input_ids[:, P:], memory, P, targets=dec_targets)

    def _packed_forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        decoder_mask: torch.Tensor,
        layout: PackedLayout | None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        for name, t in (("doc_ids", doc_ids), ("decoder_mask", decoder_mask)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids {(B, T)}: give one per token"
                )
        packed = pack_examples(input_ids, decoder_mask, doc_ids, targets, layout=layout)
        memory = self.encode(packed.encoder_ids, packed)  # (B, P, D)
        out = self.decode(
            packed.decoder_ids, memory, 0, targets=packed.targets, packed=packed
        )  # () | (B, T', V)
        if targets is not None:
            return out
        # (B, T, V) at the block's positions; padding adds zeros (no boolean indexing: no host sync)
        valid = packed.decoder_valid[..., None]  # (B, T', 1)
        index = packed.decoder_index[..., None].expand_as(out)  # (B, T', V)
        return out.new_zeros(B, T, out.shape[-1]).scatter_add_(1, index, out * valid)

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
