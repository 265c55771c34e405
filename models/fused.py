"""The ops models/llama.py (and models/encdec.py) run through an optional library kernel, each
called with the kernel models/kernels.py chose for it (`choose_kernels`): attention (also within
packed documents), RMSNorm, SiLU*mul and xformers' whole SwiGLU, RoPE, and the output loss (the
chunked linear + cross-entropy in plain PyTorch among them, which runs on any device).

The eager code in models/llama.py is the reference every op here is tested against
(tests/models/test_kernels.py, forward and backward, fp32 and bf16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.kernels import (
    HALF,
    IGNORE_INDEX,
    KernelUnavailable,
    compute_dtype,
    loaded,
    package_version,
)

# --------------------------------------------------------------------------------------------
# The kernels. Shapes: B batch, T sequence, H query heads, K key/value heads, E head dim,
# D d_model, F ffn hidden, N tokens (B*T), V vocab.
# --------------------------------------------------------------------------------------------


def _to_half(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to autocast's dtype (library kernels are not autocast-aware); tensors already half stay."""
    dtype = tensors[0].dtype
    if dtype not in HALF:
        dtype = compute_dtype(tensors[0].device.type, torch.bfloat16)
    return tuple(t.to(dtype) for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """Causal attention with a library kernel. q: (B, H, T, E); k, v: (B, K, T, E) -> (B, H, T, E).

    Both libraries take (B, T, heads, E): the transposes are views (they accept any strides but the last).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, E)
    return _attention_bthe(q, k, v, kernel).transpose(1, 2)  # (B, H, T, E)


def _attention_bthe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """q: (B, T, H, E); k, v: (B, T, K, E) -> (B, T, H, E)."""
    B, T, H, E = q.shape
    if kernel == "flash_attn":
        q, k, v = _to_half(q, k, v)
        # Query head h reads key/value head h // (H/K): the layout repeat_interleave would build.
        return loaded("flash_attn").flash_attn_func(q, k, v, causal=True)  # (B, T, H, E)
    if kernel == "xformers":
        xf = loaded("xformers")
        if q.is_cuda and compute_dtype("cuda", q.dtype) in HALF:
            q, k, v = _to_half(q, k, v)
        else:  # plain fp32: every input in the same dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        qx, kx, vx = xformers_layout(q, k, v)
        out = xf.memory_efficient_attention(qx, kx, vx, attn_bias=xf.LowerTriangularMask())
        return out.reshape(B, T, H, E)
    raise ValueError(f"unknown attention kernel {kernel!r}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Causal attention within packed documents through flash-attn's `flash_attn_varlen_func`.

    q: (B, H, T, E); k, v: (B, K, T, E); cu_seqlens: (N + 1,) int32, the start of each document of
    the batch flattened to B*T positions, then B*T (every row's first position is a start);
    max_seqlen: an upper bound on the documents' lengths -> (B, H, T, E).
    The batch is flattened to (B*T, heads, E) (a copy: varlen wants each token's heads contiguous);
    grouped-query attention reads key/value head h // (H/K) without repeating K/V, as flash_attn_func.
    """
    fn = getattr(loaded("flash_attn"), "flash_attn_varlen_func", None)
    if fn is None:
        raise KernelUnavailable(
            f"model.attention='flash_attn' with document masking needs flash_attn_varlen_func, which "
            f"this flash-attn ({package_version('flash-attn')}) does not provide; use model.attention=sdpa"
        )
    B, H, T, E = q.shape
    K = k.shape[1]
    q, k, v = _to_half(q, k, v)
    q2 = q.transpose(1, 2).reshape(B * T, H, E)  # (B*T, H, E)
    k2 = k.transpose(1, 2).reshape(B * T, K, E)
    v2 = v.transpose(1, 2).reshape(B * T, K, E)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = fn(q2, k2, v2, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=True)  # (B*T, H, E)
    return out.view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)


def xformers_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors `memory_efficient_attention` is called with. q: (B, T, H, E); k, v: (B, T, K, E).

    K == H: as they are (xformers' BMHK layout). Grouped-query attention (K < H), where query head h
    reads key/value head h // (H/K), the layout repeat_interleave builds:
      * when autograd will need a backward: K/V repeated to H heads (a copy, as eager attention and
        SDPA without enable_gqa make), a 4-D BMHK call. xformers' grouped 5-D layout is forward-only:
        with an input that needs a gradient its dispatcher also picks a backward op during the
        forward, and none takes 5-D inputs (TinyLlama's 32/4 heads raised NotImplementedError);
      * otherwise (validation, generation): the grouped BMGHK layout (B, T, K, H/K, E) with K/V
        expanded (views, no copy).
    The output has q's layout: (B, T, H, E), or (B, T, K, H/K, E) to be reshaped to it.
    """
    B, T, H, E = q.shape
    K = k.shape[2]
    if K == H:
        return q, k, v
    G = H // K
    k5 = k[:, :, :, None, :].expand(B, T, K, G, E)  # (B, T, K, H/K, E), a view
    v5 = v[:, :, :, None, :].expand(B, T, K, G, E)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return q, k5.reshape(B, T, H, E), v5.reshape(B, T, H, E)  # (B, T, H, E) copies
    return q.reshape(B, T, K, G, E), k5, v5


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str) -> torch.Tensor:
    """weight * normalise(x) with x normalised in fp32 and cast back first (Llama's order). x: (..., D)."""
    if kernel == "liger":
        return loaded("liger").rms_norm(x, weight, eps)
    if kernel == "flash_attn":
        return loaded("flash_attn").rms_norm(x, weight, None, eps=eps)
    raise ValueError(f"unknown rmsnorm kernel {kernel!r}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, kernel: str) -> torch.Tensor:
    """silu(gate) * up in one kernel. gate, up: (B, T, F)."""
    if kernel == "liger":
        return loaded("liger").swiglu(gate, up)
    if kernel == "flash_attn":
        gate, up = (
            _to_half(gate, up)
            if compute_dtype(gate.device.type, gate.dtype) in HALF
            else (gate, up)
        )
        return loaded("flash_attn").swiglu(gate, up)
    raise ValueError(f"unknown swiglu kernel {kernel!r}")


def swiglu_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """xformers' fused SwiGLU: w_down(silu(x w_gate^T) * (x w_up^T)). x: (B, T, D) -> (B, T, D).

    Its fused path runs for bf16/fp16 on sm80+ GPUs (otherwise xformers falls back to plain ops); under
    autocast everything is cast to autocast's dtype first, as autocast would for the three matmuls."""
    if compute_dtype(x.device.type, x.dtype) in HALF:
        x, w_gate, w_up, w_down = _to_half(x, w_gate, w_up, w_down)
    return loaded("xformers").swiglu(x, w_gate, None, w_up, None, w_down, None)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: (B, H, T, E) and k: (B, K, T, E) with cos, sin: (T, E) (rotate-half layout); liger
    also takes per-token (B, T, E) tables (flash-attn's rotary does not: models/llama.py rotates
    those eagerly)."""
    if kernel == "liger":
        # Liger takes (B, heads, T, E) and rotates in place: give it copies, so that no tensor autograd
        # (or selective activation checkpointing) keeps is changed under it. The copies keep the
        # (B, T, heads, E) memory order liger works in.
        q2 = q.transpose(1, 2).clone().transpose(1, 2)
        k2 = k.transpose(1, 2).clone().transpose(1, 2)
        if cos.dim() == 2:  # (T, E) -> (1, T, E); per-token (B, T, E) tables as they are
            cos, sin = cos[None], sin[None]
        q2, k2 = loaded("liger").rope(q2, k2, cos, sin)
        return q2, k2  # (B, H, T, E), (B, K, T, E)
    if kernel == "flash_attn":
        rotary = loaded("flash_attn").rotary  # takes (B, T, heads, E), any strides but the last
        half = cos.shape[-1] // 2
        c, s = cos[:, :half], sin[:, :half]  # (T, E/2): non-interleaved = rotate-half
        q2 = rotary(q.transpose(1, 2), c.to(q.dtype), s.to(q.dtype), interleaved=False)
        k2 = rotary(k.transpose(1, 2), c.to(k.dtype), s.to(k.dtype), interleaved=False)
        return q2.transpose(1, 2), k2.transpose(1, 2)
    raise ValueError(f"unknown rope kernel {kernel!r}")


# --------------------------------------------------------------------------------------------
# Loss: mean next-token cross-entropy of softmax(x W^T), from hidden states x
# --------------------------------------------------------------------------------------------


def output_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernel: str, z_loss: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight^T against targets (IGNORE_INDEX skipped), plus
    z_loss * mean(logsumexp(logits)^2) over the same targets when z_loss > 0.

    x: (B, T, D) final hidden states (after the last norm); weight: (V, D); targets: (B, T).
    Returns a float32 scalar.
    """
    return output_loss_terms(x, weight, targets, kernel, z_loss)[0]


def output_loss_terms(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernel: str, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`output_loss` (the total, which backward differentiates) and its z-loss term, detached, for
    logging (None when z_loss is 0). Both float32 scalars on x's device: reading them is no host sync."""
    x2, t = x.flatten(0, 1), targets.flatten()  # (N, D), (N,)
    if kernel == "cross_entropy":  # the reference: what the trainer computed before fused losses
        logits = F.linear(x2, weight).float()  # (N, V)
        loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX)
        if not z_loss:
            return loss, None
        z_term = z_loss_reference(logits, t, z_loss)
        return loss + z_term, z_term.detach()
    dtype = compute_dtype(x.device.type, weight.dtype)
    if kernel == "chunked":
        if not z_loss:
            return chunked_linear_cross_entropy(x2, weight, t, dtype=dtype), None
        return chunked_linear_cross_entropy(
            x2, weight, t, dtype=dtype, z_loss=z_loss, return_z_loss=True
        )
    if kernel == "liger_fused":
        x2, w = x2.to(dtype), weight.to(dtype)
        out = loaded("liger").fused_linear_cross_entropy(
            x2, w, t, ignore_index=IGNORE_INDEX, **_liger_z_loss(z_loss)
        )
        return _liger_terms(out, z_loss)
    logits = F.linear(x2.to(dtype), weight.to(dtype))  # (N, V)
    if kernel == "liger":
        out = loaded("liger").cross_entropy(
            logits, t, ignore_index=IGNORE_INDEX, **_liger_z_loss(z_loss)
        )
        return _liger_terms(out, z_loss)
    if kernel == "flash_attn":
        z_kwargs = {"lse_square_scale": z_loss} if z_loss else {}
        losses, z_losses = loaded("flash_attn").cross_entropy(
            logits, t, ignore_index=IGNORE_INDEX, inplace_backward=True, **z_kwargs
        )  # (N,) each, 0 on ignored rows; losses include the z-loss
        count = (t != IGNORE_INDEX).sum().clamp(min=1)
        z_term = (z_losses.detach().float().sum() / count) if z_loss else None
        return losses.float().sum() / count, z_term
    raise ValueError(f"unknown loss kernel {kernel!r}")


def z_loss_reference(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """z_loss * mean over the valid targets of logsumexp(logits)^2 (PaLM's z-loss), float32.

    logits: (N, V); targets: (N,) (IGNORE_INDEX rows take no part, as in the cross-entropy)."""
    valid = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    return z_loss * torch.where(valid, lse.square(), 0.0).sum() / valid.sum().clamp(min=1)


def _liger_z_loss(z_loss: float) -> dict:
    """Keyword arguments of liger's losses for a z-loss: its lse_square_scale, with the term handed
    back for logging. Nothing when z_loss is 0 (the call is the plain one)."""
    return {"lse_square_scale": z_loss, "return_z_loss": True} if z_loss else {}


def _liger_terms(out, z_loss: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """liger's result -> (total loss, z term): a tensor without a z-loss; with return_z_loss a
    (loss, z_loss) tuple (liger-kernel 0.5.5 - 0.6.x) or a CrossEntropyOutput (>= 0.7)."""
    if not z_loss:
        return out.float(), None
    loss, z_term = (out.loss, out.z_loss) if hasattr(out, "z_loss") else (out[0], out[1])
    return loss.float(), z_term.detach().float()


CPU_LOGITS_BLOCK_BYTES = (
    256 * 2**20
)  # fp32 logits per chunk on a CPU (the block is kept between calls)


def default_chunk_rows(n_rows: int, vocab: int, width: int, device_type: str = "cuda") -> int:
    """Rows per chunk, a multiple of 8.

    On a GPU: about ceil(V/D) chunks, so one chunk's logits are about the size of x (the rule
    liger-kernel uses), but never fewer than 256 rows (small matmuls waste the machine). On a CPU,
    where memory is plentiful and matmul speed grows with the rows (the weight gradient's inner
    dimension): as many rows as fit CPU_LOGITS_BLOCK_BYTES (2,096 for V = 32,000), at least 256.
    """
    if device_type == "cpu":
        rows = max(256, CPU_LOGITS_BLOCK_BYTES // (4 * vocab) // 8 * 8)
    else:
        chunks = max(1, math.ceil(vocab / max(1, width)))
        rows = max(256, math.ceil(n_rows / chunks))
    return min(n_rows, -(-rows // 8) * 8)


def chunked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    dtype: torch.dtype | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused linear + cross-entropy in plain PyTorch, for any device.

    x: (N, D), weight: (V, D), targets: (N,) -> mean loss over targets != IGNORE_INDEX (float32).
    `dtype`: what the matmuls run in (default x's; under bf16 autocast pass bfloat16).
    `z_loss` > 0 adds z_loss * mean(lse^2) over the same rows, from the logsumexp each chunk computes
    anyway (its gradient, 2 * z_loss * lse * softmax / count, joins the chunk's in the same pass);
    `return_z_loss` returns (loss, the z-loss term detached) instead of the loss.

    The logits are computed chunk_rows tokens at a time; with gradients wanted, the gradients of x
    and weight are computed in the same pass (softmax - onehot for each chunk, two matmuls), kept,
    and scaled by the incoming gradient in backward (skipped when it is 1). The (N, V) logits, their
    fp32 copy and their gradient never exist: the largest temporaries are one (chunk_rows, V) fp32
    block and, for half-precision matmuls, one such block in that dtype. The matmul work is that of
    the unfused forward + backward (nothing is recomputed). Matmuls run in `dtype`, softmax and the
    loss in fp32, and the weight gradient accumulates in fp32 and is handed back in the weight's own
    dtype (an fp32 master weight gets it without a round trip through bf16).
    """
    dtype = dtype or x.dtype
    chunk_rows = chunk_rows or default_chunk_rows(
        x.shape[0], weight.shape[0], x.shape[1], x.device.type
    )
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        loss, z_term = _ChunkedLinearCrossEntropy.apply(
            x, weight, targets, chunk_rows, dtype, z_loss
        )
        return (loss, z_term) if return_z_loss else loss
    with torch.no_grad():
        x, w_t = x.to(dtype), weight.to(dtype).t()
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        total = x.new_zeros((), dtype=torch.float32)
        lse_sq = x.new_zeros((), dtype=torch.float32)  # sum of lse^2 over valid rows (z-loss)
        blocks = _LogitsBlocks(min(chunk_rows, x.shape[0]), weight.shape[0], x.device, dtype)
        for start in range(0, x.shape[0], chunk_rows):
            xc, tc = (
                x[start : start + chunk_rows],
                targets[start : start + chunk_rows],
            )  # (n, D), (n,)
            nll, _, _, lse = _exp_nll(blocks.logits(xc, w_t), tc, blocks.fp32(xc.shape[0]))
            total += nll
            if z_loss:
                lse_sq += torch.where(tc != IGNORE_INDEX, lse.square(), 0.0).sum()
        z_term = z_loss * lse_sq / count
        loss = total / count + z_term if z_loss else total / count
        return (loss, z_term) if return_z_loss else loss


class _LogitsBlocks:
    """The (chunk_rows, V) buffers one chunk works in: the logits in the matmul dtype, and an fp32
    block for the softmax (the same buffer when the matmuls run in fp32).

    On a CPU they are kept between calls: a fresh block of this size (tens of MiB and up) is an mmap that
    the kernel pages in on first touch, every chunk of every step, which costs about a third of the
    logits matmul there. CUDA's caching allocator already reuses its blocks.
    """

    _cpu_cache: dict[tuple, torch.Tensor] = {}

    def __init__(self, rows: int, vocab: int, device: torch.device, dtype: torch.dtype):
        self.half = dtype if dtype != torch.float32 else None
        self._fp32 = self._buffer(rows, vocab, device, torch.float32)
        self._half = None if self.half is None else self._buffer(rows, vocab, device, dtype)

    @classmethod
    def _buffer(
        cls, rows: int, vocab: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(rows, vocab, dtype=dtype, device=device)
        if any(key[:2] != (rows, vocab) for key in cls._cpu_cache):
            cls._cpu_cache.clear()  # one shape at a time (the last one used), in each dtype it needs
        key = (rows, vocab, dtype)
        if key not in cls._cpu_cache:
            cls._cpu_cache[key] = torch.empty(rows, vocab, dtype=dtype)
        return cls._cpu_cache[key]

    def fp32(self, n: int) -> torch.Tensor:
        return self._fp32[:n]  # (n, V), contiguous

    def logits(self, x_chunk: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """x_chunk @ w_t in the matmul dtype. x_chunk: (n, D), w_t: (D, V) -> (n, V)."""
        out = (self._half if self.half is not None else self._fp32)[: x_chunk.shape[0]]
        return torch.mm(x_chunk, w_t, out=out)

    def half_grad(self, n: int) -> torch.Tensor:
        """Where the logits' gradient goes in the matmul dtype (the logits' buffer: they are used up)."""
        return self._half[:n]


def _exp_nll(
    logits: torch.Tensor, targets: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one chunk's logits (n, V), any float dtype: the summed -log softmax[target] over valid
    rows (fp32), exp(logits - row max) written into the fp32 block `out` (which may be `logits`
    itself), each row's sum of those (n,), and each row's logsumexp (n,).

    Widen, max, subtract, exp and sum, in place: a third of the time of logsumexp
    followed by exp(logits - lse) on a CPU (fewer passes over the block, no temporaries).
    """
    valid = targets != IGNORE_INDEX
    # Widen first (a plain copy): torch's mixed-dtype elementwise kernels are several times slower on a CPU.
    logits = out.copy_(logits) if logits.data_ptr() != out.data_ptr() else logits  # (n, V) fp32
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (n,)
    row_max = logits.amax(dim=-1)  # (n,)
    exps = logits.sub_(row_max[:, None]).exp_()  # (n, V), unnormalised softmax
    row_sum = exps.sum(dim=-1)  # (n,)
    lse = row_max + row_sum.log()  # (n,)
    nll = lse - target_logit  # (n,)
    return torch.where(valid, nll, 0.0).sum(), exps, row_sum, lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, dtype, z_loss=0.0):
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = x.shape[0]
        xd, wd = x.to(dtype), weight.to(dtype)  # (N, D), (V, D): no copies when already in dtype
        grad_x = torch.empty_like(x) if want_x else None  # (N, D), x's dtype
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )  # (V, D)
        total = x.new_zeros((), dtype=torch.float32)
        lse_sq = x.new_zeros((), dtype=torch.float32)  # sum of lse^2 over valid rows (z-loss)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        blocks = _LogitsBlocks(min(chunk_rows, N), weight.shape[0], x.device, dtype)
        w_t = wd.t()  # (D, V)
        for start in range(0, N, chunk_rows):
            xc, tc = (
                xd[start : start + chunk_rows],
                targets[start : start + chunk_rows],
            )  # (n, D), (n,)
            n = xc.shape[0]
            nll, exps, row_sum, lse = _exp_nll(blocks.logits(xc, w_t), tc, blocks.fp32(n))
            total += nll
            rows, valid = torch.arange(n, device=exps.device), tc != IGNORE_INDEX
            if not z_loss:
                # d(mean nll)/d logits = (softmax - onehot(target)) / count = (exps - onehot * row_sum) * scale
                # with scale = 1 / (row_sum * count), and 0 on ignored rows (no separate masking pass).
                exps[rows, tc.clamp(min=0)] -= row_sum
                scale = torch.where(valid, (row_sum * count).reciprocal(), 0.0)[:, None]  # (n, 1)
                grad = exps.mul_(scale)  # (n, V) fp32
            else:
                # With the z-loss z * mean(lse^2): d/d logits adds 2 z lse softmax / count, so
                # grad = softmax * (1 + 2 z lse) / count - onehot(target) / count (0 on ignored rows).
                lse_sq += torch.where(valid, lse.square(), 0.0).sum()
                factor = 1.0 + 2.0 * z_loss * lse  # (n,)
                scale = torch.where(valid, factor / (row_sum * count), 0.0)[:, None]  # (n, 1)
                grad = exps.mul_(scale)  # (n, V) fp32
                grad[rows, tc.clamp(min=0)] -= torch.where(valid, 1.0 / count, 0.0)
            if blocks.half is not None:
                grad = blocks.half_grad(n).copy_(grad)  # (n, V) in the matmul dtype
            if want_x:
                if grad_x.dtype == dtype:
                    torch.mm(grad, wd, out=grad_x[start : start + n])  # (n, D)
                else:
                    grad_x[start : start + n] = grad @ wd
            if want_w:
                if dtype == torch.float32:
                    grad_w.addmm_(grad.t(), xc)  # (V, D)
                else:
                    grad_w += grad.t() @ xc
        # Kept on ctx, not saved_tensors: backward hands them on and drops them, so that autograd can
        # take them over as .grad without a copy (a second backward through this loss is an error).
        ctx.grads = (grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        z_term = z_loss * lse_sq / count  # () fp32, for logging only (no gradient flows through it)
        ctx.mark_non_differentiable(z_term)
        return (total / count + z_term if z_loss else total / count), z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_term):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss computed its gradients once; it cannot be backpropagated twice"
            )
        (grad_x, grad_w), ctx.grads = ctx.grads, None
        # Gradients are d(mean loss)/d input already; scale them unless the incoming gradient is 1
        # (checked on a CPU only, where it costs no device synchronisation).
        unit = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
        gx = None if grad_x is None else grad_x if unit else grad_x * grad_loss.to(grad_x.dtype)
        gw = None if grad_w is None else grad_w if unit else grad_w * grad_loss
        if gw is not None:
            gw = gw.to(ctx.weight_dtype)
        return gx, gw, None, None, None, None
