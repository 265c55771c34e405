"""Llama-2 architecture in plain single-device PyTorch, with shape comments.

RMSNorm pre-norm blocks, rotary position embeddings (Hugging Face's rotate-half layout, so
weights export to `LlamaForCausalLM` without permutation), grouped-query attention and a SwiGLU
feed-forward. Research (`attn_gate`, `sandwich_norm`), stability (`qk_norm`, `z_loss`) and
`dropout` options are off by default. Sharding, precision and compilation are applied from
outside. The code here is the eager reference the fused kernels (models/kernels.py, called
through models/fused.py) are tested against. The options, dropout and generation:
docs/architecture.md; kernels, and document masking (`doc_ids`) in each of them: docs/gpus.md.

Shapes: B batch, T sequence (new tokens), S keys (cached + new), D d_model, H query heads,
K key/value heads, E head dim, V vocab, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import fused
from models.config import ModelConfig
from models.kernels import HALF, KernelChoice, choose_kernels, compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, kernel: str = "eager") -> torch.Tensor:
        if kernel != "eager":
            return fused.rms_norm(x, self.weight, self.eps, kernel)
        return rms_norm_reference(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D). Normalise in fp32 for stability under bf16, cast back, then scale, as Llama does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.type_as(x)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    base: float,
    device: torch.device,
    dtype: torch.dtype,
    offset: int = 0,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, E) for positions offset..offset+T-1; with `positions` (B, T) (integer
    per-token positions, e.g. restarting at each packed document) of shape (B, T, E) instead.

    Computed per call instead of cached in a buffer: it is cheap next to the matmuls, and
    a model built on the meta device (or sharded) has no buffer to re-materialise.
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    if positions is not None:
        freqs = positions.to(device, torch.float32)[..., None] * inv_freq  # (B, T, E/2)
    else:
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, E) | (B, T, E)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, E), cos/sin: (T, E), per-token (B, T, E) or anything broadcastable to x
    such as (B, 1, T, E); rotate pairs (i, i + E/2)."""
    if cos.dim() == 3:  # per-token positions (B, T, E): the same rotation for every head
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, E)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, heads, T, E)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of past positions, for incremental decoding (never used in training).

    One (B, K, max_len, E) buffer pair per layer. A forward pass with `kv_cache=cache,
    start_pos=p` over T new tokens stores their keys/values at p..p+T-1 and attends to positions
    0..p+T-1. With `dtype=None` (the default) each layer's buffers are allocated by its first
    `update`, in the dtype and on the device of the keys/values it gets: the dtype attention
    computes in, which is not the parameters' under autocast or FSDP2 mixed precision (fp32
    weights, bf16 compute; SDPA refuses bf16 queries beside fp32 keys).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        self.shape = (batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)  # (B, K, S_max, E)
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        if dtype is not None:
            self.keys = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in self.keys]
            self.values = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in self.values]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, K, T, E) at start_pos; return all keys/values so far: (B, K, S, E)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions; writing up to position {end}"
            )
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass(frozen=True)
class DocumentMask:
    """Packed documents of one batch, in the form the attention kernel wants (`document_mask`).

    positions: (B, T) int64, each position's offset in its document (RoPE restarts at 0);
    mask: (B, 1, T, S) additive (0 where query t may attend to key s, -inf elsewhere) in the
      attention's compute dtype, built once per forward and shared by every layer, for eager /
      sdpa / xformers (None for flash_attn);
    cu_seqlens: (N + 1,) int32 start of each of the N documents of the batch flattened to B*T
      positions, then B*T, for flash_attn's varlen kernel (None otherwise); max_seqlen: the
      longest document.
    """

    positions: torch.Tensor
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


@dataclass(frozen=True)
class PackedLayout:
    """What the forward pass needs to know about a packed batch's documents as Python numbers,
    found on the host where the ids are (`document_layout`, encdec's `packed_layout`), so that the
    forward reads nothing back from the GPU: flash_attn's cu_seqlens (document starts in the
    flattened (B*T,) batch, then B*T) and max_seqlen (the longest document), and for the
    encoder-decoder the padded lengths of its encoder and decoder rows (the decoder's documents
    are then what cu_seqlens describes). Plain numbers, so DDP's input scatter leaves it alone."""

    cu_seqlens: tuple[int, ...]
    max_seqlen: int
    encoder_len: int = 0
    decoder_len: int = 0


def document_layout(doc_ids: torch.Tensor) -> PackedLayout:
    """doc_ids: (B, T) -> the batch's PackedLayout. Reads doc_ids' values: call it where they are
    (the trainer's host copy), not on a GPU tensor in the forward."""
    starts, _ = document_positions(doc_ids)  # (B, T)
    B, T = doc_ids.shape
    begin = starts.flatten().nonzero().flatten().tolist()  # [N]: each document's first position
    ends = [*begin[1:], B * T]
    return PackedLayout((*begin, B * T), max(e - b for b, e in zip(begin, ends, strict=True)))


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """allowed: bool, True where a query may attend -> the additive mask SDPA and the eager
    reference take, in `dtype` (the attention's compute dtype): 0 there, -inf elsewhere. Built once
    per forward: given the bool mask, SDPA would convert it in every layer's call, and its masked
    backward kernels keep that copy per layer."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def document_positions(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids: (B, T) -> (starts, positions), both (B, T): True where a document starts (wherever
    the id changes along T, and at each row's start), and each position's offset in its document."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T): a document starts here
    index = torch.arange(T, device=doc_ids.device).expand(B, T)  # (B, T)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): its document's start
    return starts, index - first


def document_mask(
    doc_ids: torch.Tensor,
    attention: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    layout: PackedLayout | None = None,
) -> DocumentMask:
    """doc_ids: (B, T) ids of the document of each position (a new document starts wherever the id
    changes along T, and at each row's start) -> what attention kernel `attention` needs, its mask
    in `dtype`. flash_attn takes the documents' starts from `layout` (`document_layout`, found on
    the host); without one they are found here: a host sync on a GPU."""
    if doc_ids.dim() != 2 or doc_ids.is_floating_point() or doc_ids.is_complex():
        raise ValueError(
            f"doc_ids must be a (B, T) integer tensor, got {tuple(doc_ids.shape)} {doc_ids.dtype}"
        )
    B, T = doc_ids.shape
    starts, positions = document_positions(doc_ids)  # (B, T) each
    if attention == "flash_attn":
        layout = layout or document_layout(doc_ids)
        cu_seqlens = torch.tensor(layout.cu_seqlens, dtype=torch.int32).to(
            doc_ids.device, non_blocking=True
        )  # (N + 1,)
        return DocumentMask(positions, cu_seqlens=cu_seqlens, max_seqlen=layout.max_seqlen)
    segment = starts.cumsum(dim=1)  # (B, T): documents numbered from 1 in each row
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    allowed = same & causal_mask(T, T, doc_ids.device)  # (B, T, T)
    return DocumentMask(positions, mask=attention_bias(allowed[:, None], dtype), max_seqlen=T)


class Attention(nn.Module):
    """Self-attention: causal (a decoder's), or bidirectional with `causal=False` (an encoder's,
    models/encdec.py; through SDPA or the eager reference whatever `model.attention` says: the
    library kernels are wired for the causal case)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, causal: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx  # which KV-cache slot this layer uses
        self.causal = causal
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Gated attention: (D -> H*E) for elementwise, (D -> H) for headwise; the bias lets the
        # gate start anywhere in (0, 1) (a large bias makes it 1, i.e. the plain block).
        self.g_proj = (
            nn.Linear(cfg.d_model, cfg.gate_dim, bias=True) if cfg.attn_gate != "none" else None
        )
        # QK-norm: one (E,) gain for all query heads, one for all key heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        kernels: KernelChoice | None = None,
        docs: DocumentMask | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D), the block's normalised input -> (B, T, D). `docs`: packed documents (the
        attention is then block-diagonal causal, cos / sin per token)."""
        B, T, _ = x.shape
        kernels = kernels or kernels_for(self.cfg, x)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, E)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, E)
        if self.q_norm is not None:  # QK-norm, per head over E, before RoPE (contiguous rows here)
            # Back in the projections' dtype (autocast's: an fp32 gain would promote q, k to fp32),
            # so that attention sees q, k, v in one dtype, as without the norm.
            q = self.q_norm(q, kernels.rmsnorm).to(q.dtype)
            k = self.k_norm(k, kernels.rmsnorm).to(k.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, E), (B, K, T, E)
        v = (
            self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B, K, T, E)
        # flash-attn's rotary takes one (T, E/2) table for all rows: per-token positions rotate eagerly.
        if kernels.rope == "eager" or (cos.dim() != 2 and kernels.rope == "flash_attn"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q, k = fused.rope(q, k, cos, sin, kernels.rope)
        if not self.causal:  # an encoder: every position sees every other (of its document)
            mask = None if docs is None else docs.mask  # (B, 1, T, T) packed examples
            y = full_attention(q, k, v, eager=kernels.attention == "eager", mask=mask)
        elif docs is not None:  # packed documents: block-diagonal causal
            if kv_cache is not None:
                raise ValueError("generation with a KVCache takes no document mask")
            y = document_attention(q, k, v, docs, kernels.attention)  # (B, H, T, E)
        elif (
            kv_cache is not None
        ):  # generation: plain attention over the cached keys (any kernel choice)
            y = self.attend_cached(q, k, v, kv_cache, start_pos, eager=kernels.attention == "eager")
        elif kernels.attention in ("sdpa", "eager"):
            y = causal_attention(q, k, v, eager=kernels.attention == "eager")  # (B, H, T, E)
        else:
            y = fused.attention(q, k, v, kernels.attention)  # (B, H, T, E)
        y = y.transpose(1, 2)  # (B, T, H, E)
        if self.g_proj is not None:
            gate = torch.sigmoid(self.g_proj(x))  # (B, T, H*E) elementwise | (B, T, H) headwise
            y = y * gate.view(B, T, self.n_heads, -1)  # (B, T, H, E) * (B, T, H, E or 1)
        y = y.reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*E)
        return self.o_proj(y)  # (B, T, D)

    def attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        start_pos: int,
        eager: bool,
    ) -> torch.Tensor:
        """q: (B, H, T, E), k, v: (B, K, T, E) of the new tokens -> (B, H, T, E) over cached + new keys."""
        T = q.shape[2]
        k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # (B, K, S, E), S = start_pos + T
        k, v = repeat_kv(k, v, self.n_heads)  # (B, H, S, E)
        if eager:
            return causal_attention_reference(q, k, v)  # (B, H, T, E)
        if k.shape[2] == T:  # a prompt filling an empty cache
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, E)
        # New tokens after cached ones: query t sees keys 0..S-T+t.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_mask(T, k.shape[2], q.device)
        )


def repeat_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: (B, K, S, E) -> (B, H, S, E): each group of H/K query heads shares one key/value head."""
    repeat = n_heads // k.shape[1]
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


# SDPA attends grouped queries to their shared key/value head itself (torch >= 2.5): on CPU, and on
# CUDA in bf16/fp16 (flash / cuDNN backends). In fp32 on CUDA only the math backend would take it,
# so K/V are repeated there for the memory-efficient kernel.
_TORCH = tuple(int(p) for p in torch.__version__.split(".")[:2])
_SDPA_GQA = _TORCH >= (2, 5)
_SDPA_CUDNN_GQA = _TORCH >= (2, 11)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eager: bool = False
) -> torch.Tensor:
    """Causal self-attention through torch: SDPA, or the eager reference.

    q: (B, H, T, E); k, v: (B, K, T, E) -> (B, H, T, E).
    """
    H = q.shape[1]
    if eager:
        k, v = repeat_kv(k, v, H)  # (B, H, T, E)
        return causal_attention_reference(q, k, v)
    grouped = k.shape[1] != H
    if grouped and _SDPA_GQA and (not q.is_cuda or compute_dtype("cuda", q.dtype) in HALF):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )  # (B, H, T, E)
    k, v = repeat_kv(k, v, H)  # (B, H, T, E)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, E)


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocumentMask, kernel: str
) -> torch.Tensor:
    """Causal attention within each packed document (`DocumentMask`), through `kernel`: flash_attn's
    varlen kernel over docs.cu_seqlens, else the (B, 1, T, T) mask through the eager reference
    (`eager`) or SDPA (`sdpa`, and `xformers`, which has no path of its own here).

    q: (B, H, T, E); k, v: (B, K, T, E) -> (B, H, T, E).
    """
    if kernel == "flash_attn":
        return fused.varlen_attention(q, k, v, docs.cu_seqlens, docs.max_seqlen)
    if docs.mask is None:
        raise ValueError(f"this DocumentMask was built for flash_attn, not attention {kernel!r}")
    return full_attention(q, k, v, eager=kernel == "eager", mask=docs.mask)  # (B, H, T, E)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query t (at position S-T+t) may attend to key s: s <= S-T+t."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(E) + causal mask) v, the eager reference for fused kernels.

    q: (B, H, T, E); k, v: (B, H, S, E) with S >= T (the last T keys are the queries' own).
    """
    return attention_reference(q, k, v, causal_mask(q.shape[-2], k.shape[-2], q.device))


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(E), where mask) v. q: (B, H, T, E); k, v: (B, H, S, E); mask: (T, S)
    or anything broadcastable to (B, H, T, S) such as a per-row (B, 1, T, S): bool, True where a
    query may attend, or additive (`attention_bias`) (None: everywhere; every query must see some
    key) -> (B, H, T, E)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)  # + 0 or -inf: masked_fill's values
    return torch.softmax(scores.float(), dim=-1).type_as(q) @ v  # (B, H, T, E)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eager: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention under `mask` (additive from `attention_bias`, or bool; broadcastable to
    (B, H, T, S), e.g. (B, 1, T, S) for packed documents and examples), or without one (an
    encoder's self-attention, cross-attention: every query sees every key); every query must
    see some key.

    q: (B, H, T, E); k, v: (B, K, S, E) -> (B, H, T, E).
    """
    H, S = q.shape[1], k.shape[2]
    if eager:
        k, v = repeat_kv(k, v, H)  # (B, H, S, E)
        return attention_reference(q, k, v, mask)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # (a copy per call: document_mask builds it in the compute dtype)
    if mask is None or not q.is_cuda:
        # CPU: SDPA groups queries itself, also with a mask (torch >= 2.5).
        if k.shape[1] != H and _SDPA_GQA and not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        k, v = repeat_kv(k, v, H)  # (B, H, S, E)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, E)
    if S % 128 == 64:
        # cuDNN's masked backward returns NaN gradients for queries at these key lengths
        # (pytorch#196678, torch 2.11 on sm90): the memory-efficient kernel, K/V repeated.
        k, v = repeat_kv(k, v, H)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if k.shape[1] != H and q.dtype in HALF and _cudnn_groups_masked_queries(q.device.index):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    k, v = repeat_kv(k, v, H)  # (B, H, S, E): the memory-efficient kernel takes no groups
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, E)


@torch.compiler.assume_constant_result  # a constant in compiled blocks (no graph break per call)
def _cudnn_groups_masked_queries(device_index: int | None) -> bool:
    """Whether SDPA runs a masked grouped-query call (bf16 / fp16) on this GPU through cuDNN
    without repeating K/V: torch >= 2.11, sm90 and later, cuDNN attention enabled (otherwise the
    only backend that would take enable_gqa with a mask is the math one, far slower)."""
    return (
        _SDPA_CUDNN_GQA
        and torch.backends.cuda.cudnn_sdp_enabled()
        and torch.cuda.get_device_capability(device_index) >= (9, 0)
    )


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, kernel: str = "eager") -> torch.Tensor:
        if kernel == "xformers" and not _zero3_partitioned(self.gate_proj.weight):
            # One fused op, projections included (it reads the weights directly, which ZeRO-3 does
            # not gather outside the projections' own forward: there the activation alone is fused).
            return fused.swiglu_ffn(
                x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
            )
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, F) each
        if kernel in ("eager", "xformers"):
            return self.down_proj(F.silu(gate) * up)  # (B, T, D)
        return self.down_proj(fused.silu_mul(gate, up, kernel))  # (B, T, D)


def residual_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """model.dropout: x with elements zeroed with probability p (the rest scaled by 1/(1-p)) in
    training mode; x itself otherwise, or when p == 0, without drawing a random number."""
    if p == 0 or not training:
        return x
    return F.dropout(x, p, training=True)


def _zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 keeps a partition; the module's hooks gather it


class Block(nn.Module):
    """A pre-norm transformer block: attention and SwiGLU, each added to the residual stream (through
    `residual_dropout` with model.dropout in training mode). `causal=False`: an encoder's block
    (bidirectional attention)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, causal: bool = True) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, causal)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        # Sandwich norm: normalise each branch's output before the residual add.
        self.attn_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.sandwich_norm else None
        self.ffn_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.sandwich_norm else None
        self.dropout = float(cfg.dropout)  # on each branch's output (training mode; no parameter)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        kernels: KernelChoice | None = None,
        docs: DocumentMask | None = None,
    ) -> torch.Tensor:
        kernels = kernels or kernels_for(self.attn.cfg, x)
        h = self.attn(
            self.attn_norm(x, kernels.rmsnorm), cos, sin, kv_cache, start_pos, kernels, docs
        )  # (B, T, D)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h, kernels.rmsnorm)
        x = x + residual_dropout(h, self.dropout, self.training)  # (B, T, D)
        h = self.ffn(self.ffn_norm(x, kernels.rmsnorm), kernels.swiglu)  # (B, T, D)
        if self.ffn_out_norm is not None:
            h = self.ffn_out_norm(h, kernels.rmsnorm)
        return x + residual_dropout(h, self.dropout, self.training)  # (B, T, D)


class OutputHead(nn.Linear):
    """The output projection D -> V. Given targets it returns the mean next-token loss instead of the
    logits, through the chosen loss kernel: fused ones never build the (B, T, V) logits. (The loss is
    computed inside this module's forward so that sharding wrappers gather its weight as usual.)"""

    last_z_loss: torch.Tensor | None = None  # the z-loss term of the last loss computed (detached)

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss: str = "cross_entropy",
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(x)  # (B, T, V)
        total, z_term = fused.output_loss_terms(x, self.weight, targets, loss, z_loss)
        self.last_z_loss = z_term  # () float32, detached; None without a z-loss
        return total  # () float32


def kernels_for(cfg: ModelConfig, x: torch.Tensor) -> KernelChoice:
    """The kernels cfg chooses for tensors like x (under autocast: autocast's dtype)."""
    return choose_kernels(cfg, x.device, compute_dtype(x.device.type, x.dtype))


class LanguageModel(nn.Module):
    """What the two families (Llama here, EncoderDecoder in models/encdec.py) share: one token
    embedding `embed`, an output head `lm_head` (tied to the embedding with model.tie_embeddings),
    the initialisation, and building on the meta device. Subclasses build their modules in
    `__init__` and then call `_finish_init()`."""

    cfg: ModelConfig
    embed: nn.Embedding
    lm_head: OutputHead

    def _finish_init(self) -> None:
        self.tie_weights()
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2L) (GPT-2).

        Biases (only the attention gate has one) start at zero, norms at one.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def materialize(self, device: torch.device | str, init: bool = True) -> LanguageModel:
        """Give a meta-device model real (uninitialised) storage on `device`, then initialise it.

        Build with `with torch.device("meta"): model = Llama(cfg)` and call this once: the
        weights are allocated exactly once. Pass init=False when a state dict is loaded next.
        """
        self.to_empty(device=device)
        self.tie_weights()  # to_empty gives the two tied modules separate storage
        if init:
            self.init_weights()
        return self

    @property
    def last_z_loss(self) -> torch.Tensor | None:
        """The z-loss term (z_loss * mean lse^2) of the last training loss: a detached device tensor
        (reading it costs no host sync), None when model.z_loss is 0 or the last call was not training."""
        return self.lm_head.last_z_loss


class Llama(LanguageModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size, bias=False)
        self._finish_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) token ids -> logits (B, T, V); with targets (B, T) -> the mean loss ()
        (plus the z-loss term in training mode when model.z_loss > 0).

        With a `kv_cache`, input_ids are the tokens at positions start_pos..start_pos+T-1 and
        attend to the cached positions before them (generation).

        With `doc_ids` (B, T) (packed documents, data.document_mask), each position attends
        only to its own document's positions up to itself, and RoPE positions restart at 0 at each
        document start. Not with a kv_cache. `layout`: `document_layout(doc_ids)` found on the
        host (flash_attn then needs no host sync).
        """
        B, T = input_ids.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start_pos + T} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        if doc_ids is not None and (kv_cache is not None or start_pos):
            raise ValueError(
                "doc_ids (document masking) is for training and evaluation over whole blocks; "
                "generation with a kv_cache / start_pos takes no doc_ids"
            )
        if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
            raise ValueError(
                f"doc_ids has shape {tuple(doc_ids.shape)}, input_ids {(B, T)}: give one id per token"
            )
        x = residual_dropout(self.embed(input_ids), self.cfg.dropout, self.training)  # (B, T, D)
        kernels = kernels_for(self.cfg, x)  # resolved once for this call's device and dtype
        docs = None
        if doc_ids is not None:  # built once for all layers
            dtype = compute_dtype(x.device.type, x.dtype)
            docs = document_mask(doc_ids.to(x.device), kernels.attention, dtype, layout)
        cos, sin = rope_cos_sin(
            T,
            self.cfg.head_dim,
            self.cfg.rope_base,
            x.device,
            x.dtype,
            offset=start_pos,
            positions=None if docs is None else docs.positions,
        )  # (T, E) | (B, T, E) per token
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, start_pos, kernels, docs)  # (B, T, D)
        z_loss = self.cfg.z_loss if self.training else 0.0  # a training objective: eval is plain CE
        return self.lm_head(
            self.norm(x, kernels.rmsnorm), targets, kernels.loss, z_loss
        )  # (B, T, V) | ()


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once); works on the meta device and under ZeRO-3."""
    return sum(
        getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values()
    )
