"""Every attention backend and fused kernel against the eager reference, forward and backward.

Tolerances (relative error ||out - ref|| / ||ref|| against a float64 reference computed on the CPU
with the eager code, for outputs and for every input gradient):
  fp32: at most 1e-5 (sdpa, chunked loss: fp32 arithmetic in another order);
  bf16: at most 1e-2, and never more than twice the eager path's own bf16 error plus 1e-3
        (a kernel may round differently from eager, not worse).
On a CPU the kernels that run there are checked (sdpa, the chunked loss, `auto`, compile,
activation checkpointing); the library kernels (flash-attn, xformers, liger-kernel) are GPU tests
that skip without CUDA or without the library.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import fused, kernels
from models.config import KERNEL_FIELDS, ModelConfig, model_config
from models.kernels import EAGER, KernelChoice, KernelUnavailable
from models.llama import Llama, apply_rope, causal_attention, rms_norm_reference, rope_cos_sin
from orchestrator.schema import ConfigError

# The reference kernel set: eager attention, norms, RoPE, SwiGLU and logits + F.cross_entropy.
EAGER_FIELDS = dict(attention="eager", rmsnorm_kernel="eager", swiglu_kernel="eager", rope_kernel="eager",
                    loss_kernel="cross_entropy")  # fmt: skip
FP32_TOL = 1e-5
BF16_TOL = 1e-2
CUDA = torch.cuda.is_available()


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run(fn, inputs: list[torch.Tensor], upstream_seed: int = 0, frozen: tuple[int, ...] = ()):
    """fn(*inputs) and the gradients of (out * fixed random weights).sum() w.r.t. every input
    except those at the indices in `frozen` (constants such as RoPE's cos / sin tables, which the
    model never differentiates and fused kernels return no gradient for)."""
    inputs = [
        t.detach().clone().requires_grad_(t.is_floating_point() and i not in frozen)
        for i, t in enumerate(inputs)
    ]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    grads = [t.grad for t in inputs if t.requires_grad]
    assert all(gr is not None for gr in grads), "an input that needs a gradient got none"
    return out.detach(), grads


def check_parity(
    kernel_fn,
    eager_fn,
    make_inputs,
    device: str,
    dtype: torch.dtype,
    fp32_tol: float = FP32_TOL,
    frozen: tuple[int, ...] = (),
):
    """kernel vs eager on `device` in `dtype`, both against eager in float64 on the CPU; inputs at
    the indices in `frozen` get no gradient (and none is compared)."""
    base = make_inputs()  # float32 on the CPU, fresh random values
    ref_out, ref_grads = run(
        eager_fn, [t.double() if t.is_floating_point() else t for t in base], frozen=frozen
    )
    cast = [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in base]
    k_out, k_grads = run(kernel_fn, cast, frozen=frozen)
    e_out, e_grads = run(eager_fn, cast, frozen=frozen)
    assert k_out.dtype == e_out.dtype and k_out.shape == e_out.shape
    assert len(k_grads) == len(e_grads) == len(ref_grads)
    for name, k, e, r in [("out", k_out, e_out, ref_out)] + [
        (f"grad[{i}]", kg, eg, rg)
        for i, (kg, eg, rg) in enumerate(zip(k_grads, e_grads, ref_grads))
    ]:
        err_k, err_e = rel(k, r), rel(e, r)
        if dtype == torch.float32:
            assert err_k <= fp32_tol, (name, err_k, err_e)
        else:
            assert err_k <= BF16_TOL and err_k <= 2 * err_e + 1e-3, (name, err_k, err_e)


# --- inputs and eager references for each op ----------------------------------------------------


def attention_inputs(B=2, T=96, H=8, K=4, E=64):
    """q: (B, H, T, E), k, v: (B, K, T, E), as transposed views of (B, T, heads, E) like the model's."""
    return lambda: [torch.randn(B, T, H, E).transpose(1, 2), torch.randn(B, T, K, E).transpose(1, 2),
                    torch.randn(B, T, K, E).transpose(1, 2)]  # fmt: skip


def eager_attention(q, k, v):
    return causal_attention(q, k, v, eager=True)


def rmsnorm_inputs():
    return lambda: [torch.randn(2, 48, 256) * 3, 1 + 0.1 * torch.randn(256)]


def eager_rmsnorm(x, w):
    return rms_norm_reference(x, w, 1e-5)


def swiglu_inputs():
    return lambda: [torch.randn(2, 48, 384), torch.randn(2, 48, 384)]


def eager_silu_mul(gate, up):
    return F.silu(gate) * up


# RoPE's inputs are q, k, cos, sin: cos and sin (indices 2, 3) are constant tables in the model
# (no gradient; liger's and flash-attn's RoPE return none for them), so they are compared frozen.
ROPE_FROZEN = (2, 3)


def rope_inputs(T=48, H=8, K=4, E=64):
    def make():
        cos, sin = rope_cos_sin(T, E, 10000.0, torch.device("cpu"), torch.float32)
        return [
            torch.randn(2, T, H, E).transpose(1, 2),
            torch.randn(2, T, K, E).transpose(1, 2),
            cos,
            sin,
        ]

    return make


def eager_rope_qk(q, k, cos, sin):
    return torch.cat(
        [apply_rope(q, cos, sin).flatten(1), apply_rope(k, cos, sin).flatten(1)], dim=-1
    )


def test_rope_parity_compares_q_k_gradients_only():
    """liger's and flash-attn's RoPE give cos / sin no gradient (the model never differentiates the
    tables): the parity check keeps them frozen and compares the output and the q / k gradients.
    A stand-in kernel that detaches its tables, as those kernels do, passes it; asking it for table
    gradients fails however correct it is (what the GPU cases did before)."""
    torch.manual_seed(0)

    def detached_tables(q, k, cos, sin):
        return eager_rope_qk(q, k, cos.detach(), sin.detach())

    check_parity(detached_tables, eager_rope_qk, rope_inputs(), "cpu", torch.float32, frozen=ROPE_FROZEN)  # fmt: skip
    _, grads = run(detached_tables, rope_inputs()(), frozen=ROPE_FROZEN)
    assert [tuple(g.shape) for g in grads] == [(2, 8, 48, 64), (2, 4, 48, 64)]  # q, k
    with pytest.raises(AssertionError, match="got none"):
        run(detached_tables, rope_inputs()())


def loss_inputs(N=300, D=64, V=1000, ignored=7):
    def make():
        targets = torch.randint(0, V, (1, N))
        targets[0, torch.randperm(N)[:ignored]] = kernels.IGNORE_INDEX
        return [torch.randn(1, N, D), torch.randn(V, D) * 0.2, targets]

    return make


def eager_loss(x, w, t):
    return fused.output_loss(x, w, t, "cross_entropy")


# --- CPU parity: what runs everywhere ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 4), (8, 8), (8, 1)])
def test_sdpa_matches_eager_attention(dtype, heads):
    torch.manual_seed(0)
    H, K = heads
    check_parity(lambda q, k, v: causal_attention(q, k, v), eager_attention, attention_inputs(H=H, K=K, E=32),
                 "cpu", dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 64, 7])
def test_chunked_loss_matches_cross_entropy(dtype, chunk_rows):
    """Forward and both gradients; ignored targets; chunk sizes that do not divide the tokens."""
    torch.manual_seed(0)

    def chunked(x, w, t):
        return fused.chunked_linear_cross_entropy(x.flatten(0, 1), w, t.flatten(), chunk_rows)

    check_parity(chunked, eager_loss, loss_inputs(), "cpu", dtype)


Z = 1e-2  # large enough that the z-term moves the loss and every gradient well past the tolerances


def z_eager_loss(x, w, t):
    return fused.output_loss(x, w, t, "cross_entropy", Z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 64, 7])
def test_chunked_loss_with_z_loss_matches_reference(dtype, chunk_rows):
    """CE + z * mean(lse^2): the chunked kernel's forward and both gradients (its backward adds
    2 z lse softmax / count per chunk) against the reference on the logits, ignored targets included."""
    torch.manual_seed(0)

    def chunked(x, w, t):
        return fused.chunked_linear_cross_entropy(
            x.flatten(0, 1), w, t.flatten(), chunk_rows, z_loss=Z
        )

    check_parity(chunked, z_eager_loss, loss_inputs(), "cpu", dtype)


def test_z_loss_term_is_z_times_mean_squared_logsumexp():
    """The z-term, by hand in float64, for the reference and the chunked kernel (with and without
    gradients): z * mean over the valid targets of logsumexp(logits)^2; the total is CE + that."""
    torch.manual_seed(0)
    x, w, t = loss_inputs(N=120, D=32, V=300, ignored=11)()
    logits = x[0].double() @ w.double().t()  # (N, V)
    valid = t[0] != kernels.IGNORE_INDEX
    by_hand = Z * (logits.exp().sum(-1).log()[valid] ** 2).mean()
    ce = F.cross_entropy(logits, t[0], ignore_index=kernels.IGNORE_INDEX)
    for kernel in ("cross_entropy", "chunked"):
        for grad in (False, True):
            xi = x.clone().requires_grad_(grad)
            total, z_term = fused.output_loss_terms(xi, w, t, kernel, Z)
            assert z_term.dtype == torch.float32 and not z_term.requires_grad
            torch.testing.assert_close(z_term.double(), by_hand, atol=0, rtol=1e-5)
            torch.testing.assert_close(total.double(), ce + by_hand, atol=0, rtol=1e-5)
            assert total.requires_grad == grad
        # The chunked kernel's own entry point hands the term back too.
        loss, z_term = fused.chunked_linear_cross_entropy(
            x[0], w, t[0], 16, z_loss=Z, return_z_loss=True
        )
        torch.testing.assert_close(z_term.double(), by_hand, atol=0, rtol=1e-5)


def test_z_loss_zero_is_exactly_the_old_loss():
    """z_loss = 0: no z-term (None), the loss and gradients bitwise those of the plain call; the
    reference is F.cross_entropy on the fp32 logits, bit for bit."""
    torch.manual_seed(0)
    x, w, t = loss_inputs(N=100, D=32, V=200)()
    ref = F.cross_entropy((x[0] @ w.t()).float(), t[0], ignore_index=kernels.IGNORE_INDEX)
    total, z_term = fused.output_loss_terms(x, w, t, "cross_entropy", 0.0)
    assert z_term is None and torch.equal(total, ref)
    results = []
    for z in (None, 0.0):
        xi, wi = x[0].clone().requires_grad_(), w.clone().requires_grad_()
        kwargs = {} if z is None else dict(z_loss=z)
        loss = fused.chunked_linear_cross_entropy(xi, wi, t[0], 16, **kwargs)
        loss.backward()
        results.append((loss.detach(), xi.grad, wi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert fused.output_loss_terms(x, w, t, "chunked", 0.0)[1] is None


def _z_reference64(x, w, t, z):
    """CE + z * mean(lse^2) in float64, straight from the definition."""
    logits = x.double() @ w.double().t()
    valid = t != kernels.IGNORE_INDEX
    lse = logits.logsumexp(-1)
    ce = F.cross_entropy(logits, t, ignore_index=kernels.IGNORE_INDEX)
    return ce + z * (lse[valid] ** 2).mean()


def test_chunked_z_loss_edge_cases():
    """Every target ignored: loss and z-term 0, zero gradients. A scaled upstream gradient (gradient
    accumulation) scales the z part too. Very negative logits (lse < 0, where 1 + 2 z lse crosses 0)
    stay finite and exact."""
    torch.manual_seed(0)
    x, w, t = loss_inputs(N=50, D=16, V=40)()
    x, t = x[0], t[0]
    xi = x.clone().requires_grad_()
    loss, z_term = fused.chunked_linear_cross_entropy(
        xi, w, torch.full_like(t, kernels.IGNORE_INDEX), 8, z_loss=Z, return_z_loss=True
    )
    loss.backward()
    assert loss.item() == 0.0 and z_term.item() == 0.0 and torch.count_nonzero(xi.grad) == 0
    # A constant logit shift of -60 (an input column of ones, its weight column -60): lse about -56.
    shifted = (torch.cat([x, torch.ones(50, 1)], 1), torch.cat([w, torch.full((40, 1), -60.0)], 1))
    for (xs, ws), z in (((x, w), Z), (shifted, 0.5)):
        a = [xs.clone().requires_grad_(), ws.clone().requires_grad_()]
        b = [xs.double().requires_grad_(), ws.double().requires_grad_()]
        got = fused.chunked_linear_cross_entropy(a[0], a[1], t, 8, z_loss=z)
        want = _z_reference64(b[0], b[1], t, z)
        torch.testing.assert_close(got.double(), want, atol=0, rtol=1e-5)
        (got / 4).backward()
        (want / 4).backward()
        for p, q in zip(a, b):
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-6, rtol=1e-4)


def test_chunked_loss_edge_cases():
    torch.manual_seed(0)
    x, w, t = loss_inputs(N=50, D=16, V=40)()
    # No gradient wanted (evaluation): the same loss, computed without the backward buffers.
    with torch.no_grad():
        assert torch.allclose(
            fused.chunked_linear_cross_entropy(x[0], w, t[0], 8), eager_loss(x, w, t), atol=1e-6
        )
    # Only one input needs a gradient (frozen output projection, or frozen trunk).
    for frozen in (0, 1):
        inputs = [x[0].clone().requires_grad_(frozen != 0), w.clone().requires_grad_(frozen != 1)]
        fused.chunked_linear_cross_entropy(*inputs, t[0], 8).backward()
        assert inputs[frozen].grad is None and inputs[1 - frozen].grad is not None
    # Every target ignored: loss 0 and zero gradients, not NaN.
    xi = x[0].clone().requires_grad_()
    loss = fused.chunked_linear_cross_entropy(xi, w, torch.full_like(t[0], kernels.IGNORE_INDEX), 8)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xi.grad) == 0
    # Its gradients are computed once, in the forward: a second backward is refused, not silently wrong.
    xr = x[0].clone().requires_grad_()
    loss = fused.chunked_linear_cross_entropy(xr, w, t[0], 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot be backpropagated twice"):
        loss.backward()
    # Scaled upstream gradients (gradient accumulation divides the loss) scale both gradients.
    a = [x[0].clone().requires_grad_(), w.clone().requires_grad_()]
    b = [x[0].clone().requires_grad_(), w.clone().requires_grad_()]
    (fused.chunked_linear_cross_entropy(*a, t[0], 8) / 4).backward()
    (F.cross_entropy(b[0] @ b[1].t(), t[0]) / 4).backward()
    torch.testing.assert_close(a[0].grad, b[0].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[1].grad, b[1].grad, atol=1e-6, rtol=1e-5)


def test_chunked_loss_cpu_block_is_reused_and_follows_shape():
    """On a CPU the logits block is kept between calls (no fresh mmap per chunk); a call with another
    chunk shape or dtype gets a block of its own, and every result stays that of the reference."""
    torch.manual_seed(0)
    fused._LogitsBlocks._cpu_cache.clear()
    for N, V, dtype in ((40, 64, torch.float32), (40, 64, torch.float32), (30, 96, torch.float32),
                        (30, 96, torch.bfloat16), (40, 64, torch.float32)):  # fmt: skip
        x = torch.randn(N, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(V, 16, dtype=dtype, requires_grad=True)
        t = torch.randint(0, V, (N,))
        t[::5] = kernels.IGNORE_INDEX
        loss = fused.chunked_linear_cross_entropy(x, w, t, chunk_rows=16)
        loss.backward()
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = F.cross_entropy(xr @ wr.t(), t, ignore_index=kernels.IGNORE_INDEX)
        ref.backward()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(loss, ref, **tol)
        torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
        torch.testing.assert_close(w.grad.float(), wr.grad, **tol)
        held = set(fused._LogitsBlocks._cpu_cache)
        wanted = {(16, V, torch.float32)} | ({(16, V, dtype)} if dtype != torch.float32 else set())
        assert held == wanted, held  # only the last shape is held, in the dtypes it needs
    # The same shape again reuses the blocks, in fp32 and in bf16 alike.
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(40, 16, dtype=dtype), torch.randn(64, 16, dtype=dtype)
        fused.chunked_linear_cross_entropy(x, w, torch.randint(0, 64, (40,)), 16)
        before = {k: v.data_ptr() for k, v in fused._LogitsBlocks._cpu_cache.items()}
        fused.chunked_linear_cross_entropy(x, w, torch.randint(0, 64, (40,)), 16)
        assert {k: v.data_ptr() for k, v in fused._LogitsBlocks._cpu_cache.items()} == before
    # The default chunk: one block of up to CPU_LOGITS_BLOCK_BYTES on a CPU; liger's rule on a GPU.
    assert fused.default_chunk_rows(1024, 32000, 256, "cpu") == 1024
    assert fused.default_chunk_rows(8192, 32000, 256, "cpu") == 2096
    assert (
        fused.default_chunk_rows(16384, 32000, 2048, "cuda") == 1024
    )  # ceil(32000 / 2048) = 16 chunks


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(
        n_layers=2,
        vocab_size=512,
        max_seq_len=64,
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=352,
    )
    fields.update(overrides)
    return model_config("tiny", **fields)


def model_loss_and_grads(model: Llama, ids, targets, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(
        ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        loss = model(ids, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# The stability options together: QK-norm (before RoPE, any attention kernel) and the z-loss.
STABILITY = dict(qk_norm=True, z_loss=1e-2)


@pytest.mark.parametrize(
    ("tie", "options"), [(False, {}), (True, {}), (False, STABILITY), (True, STABILITY)]
)
def test_default_training_path_matches_eager_model(tie, options):
    """The default kernels (auto: sdpa + the chunked loss on a CPU) against the all-eager model, fp32 and
    bf16 autocast, loss and every parameter gradient; tied embeddings share the loss gradient. With
    QK-norm and the z-loss too (sdpa vs eager attention on normalised queries / keys; chunked vs
    reference z-loss), their gains' gradients included."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tie_embeddings=tie, **options)
    fast = Llama(cfg)
    eager = Llama(dataclasses.replace(cfg, **EAGER_FIELDS))
    eager.load_state_dict(fast.state_dict())
    ref = Llama(dataclasses.replace(cfg, **EAGER_FIELDS)).double()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    targets = torch.randint(0, cfg.vocab_size, (2, 48))
    targets[0, :5] = kernels.IGNORE_INDEX
    assert kernels.choose_kernels(cfg, ids.device, torch.float32) == KernelChoice(
        "sdpa", "eager", "eager", "eager", "chunked"
    )
    ref_loss, ref_grads = model_loss_and_grads(ref, ids, targets)
    for dtype in (None, torch.bfloat16):
        loss_f, grads_f = model_loss_and_grads(fast, ids, targets, dtype)
        loss_e, grads_e = model_loss_and_grads(eager, ids, targets, dtype)
        for name in ref_grads:
            err_f, err_e = rel(grads_f[name], ref_grads[name]), rel(grads_e[name], ref_grads[name])
            if dtype is None:
                assert err_f <= FP32_TOL, (name, err_f)
            else:
                assert err_f <= 3 * BF16_TOL and err_f <= 2 * err_e + 1e-3, (name, err_f, err_e)
        assert (
            abs(loss_f.item() - ref_loss.item())
            <= (1e-5 if dtype is None else 1e-2) * ref_loss.item()
        )
        if options:
            assert 0 < fast.last_z_loss.item() == pytest.approx(eager.last_z_loss.item(), rel=1e-2)
    if options:
        assert {"blocks.0.attn.q_norm.weight", "blocks.1.attn.k_norm.weight"} <= set(ref_grads)


def test_output_head_logits_and_loss():
    torch.manual_seed(0)
    model = Llama(tiny_cfg())
    ids = torch.randint(0, 512, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 512)
    targets = torch.randint(0, 512, (2, 16))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    for loss_kernel in ("cross_entropy", "chunked", "auto"):
        model.cfg.loss_kernel = loss_kernel
        assert torch.allclose(model(ids, targets=targets), expected, atol=1e-5), loss_kernel


@pytest.mark.parametrize("options", [{}, STABILITY])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_modes_change_no_number(mode, options):
    from orchestrator.parallel.activation_checkpointing import (
        apply_activation_checkpointing,
        checkpointing_mode,
    )

    assert checkpointing_mode(True) == "full" and checkpointing_mode(False) == "none"
    torch.manual_seed(0)
    cfg = tiny_cfg(**options)
    plain, ckpt = Llama(cfg), Llama(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt, mode)
    assert list(dict(ckpt.named_parameters())) == list(dict(plain.named_parameters()))
    ids, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    loss_p, grads_p = model_loss_and_grads(plain, ids, targets)
    loss_c, grads_c = model_loss_and_grads(ckpt, ids, targets)
    assert loss_p.item() == loss_c.item()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], atol=1e-7, rtol=1e-6)


def test_selective_checkpointing_recomputes_no_matmul():
    """In backward: `full` runs every forward matmul again, `selective` none of them (it keeps their
    outputs) but recomputes the cheap ops, `none` recomputes nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def backward_ops(mode):
        torch.manual_seed(0)
        model = apply_activation_checkpointing(Llama(tiny_cfg(n_layers=2)), mode)
        ids = torch.randint(0, 512, (2, 32))
        loss = model(ids, targets=ids)
        with Count() as counter:
            loss.backward()
        return counter.ops

    none, selective, full = backward_ops("none"), backward_ops("selective"), backward_ops("full")
    matmuls_per_block = 7  # q, k, v, o, gate, up, down
    assert selective.get("mm", 0) == none.get("mm", 0)
    assert full.get("mm", 0) >= none.get("mm", 0) + 2 * (
        matmuls_per_block - 1
    )  # down_proj: not needed again
    assert selective.get("rsqrt", 0) > none.get("rsqrt", 0)  # the norms are recomputed


# A stand-in for a library kernel registered as a torch op (flash-attn >= 2.7, xformers' backends):
# it counts its forward calls, so that a test can see whether backward recomputes it.
_FUSED_CALLS = {"n": 0}


@torch.library.custom_op("orchestrator_tests::fused_kernel", mutates_args=())
def _fused_kernel(x: torch.Tensor) -> torch.Tensor:
    _FUSED_CALLS["n"] += 1
    return torch.sin(x) * 2


@_fused_kernel.register_fake
def _(x):
    return torch.empty_like(x)


def _fused_kernel_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _fused_kernel_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.cos(x) * 2


_fused_kernel.register_autograd(_fused_kernel_backward, setup_context=_fused_kernel_setup)


@pytest.mark.parametrize("listed", [True, False])
def test_selective_checkpointing_keeps_registered_library_ops(monkeypatch, listed):
    """A library kernel that is a registered torch op and listed in SAVED_OPS is kept by selective
    checkpointing (not run again in backward); an unlisted one is recomputed, like the cheap ops."""
    from orchestrator.parallel import activation_checkpointing as ac

    saved = ac.SAVED_OPS + ((("orchestrator_tests", "fused_kernel"),) if listed else ())
    monkeypatch.setattr(ac, "SAVED_OPS", saved)
    assert (torch.ops.orchestrator_tests.fused_kernel.default in ac._save_ops()) == listed

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return x + _fused_kernel(self.proj(x))

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    plain, ckpt = Stack(), Stack()
    ckpt.load_state_dict(plain.state_dict())
    ac.apply_activation_checkpointing(ckpt, "selective")
    x = torch.randn(4, 16)
    plain(x).square().sum().backward()
    _FUSED_CALLS["n"] = 0
    loss = ckpt(x).square().sum()
    assert _FUSED_CALLS["n"] == 2  # forward: once per block
    loss.backward()
    assert _FUSED_CALLS["n"] == (2 if listed else 4)  # recomputed in backward unless kept
    for (name, p), q in zip(ckpt.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("options", [{}, STABILITY])
def test_compiled_blocks_match_eager(options):
    """torch.compile of each block (one tiny block; the compile takes a few seconds on a CPU), also
    with QK-norm inside the compiled attention and the z-loss."""
    from orchestrator.parallel.compile import compile_blocks

    torch.manual_seed(0)
    cfg = tiny_cfg(n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, ffn_hidden=128, vocab_size=128,
                   **options)  # fmt: skip
    plain, compiled = Llama(cfg), Llama(cfg)
    compiled.load_state_dict(plain.state_dict())
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(
        plain.state_dict()
    )  # names unchanged (no _orig_mod.)
    ids, targets = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    loss_p, grads_p = model_loss_and_grads(plain, ids, targets)
    loss_c, grads_c = model_loss_and_grads(compiled, ids, targets)
    assert abs(loss_p.item() - loss_c.item()) < 1e-5
    for name in grads_p:
        assert rel(grads_c[name], grads_p[name]) < 1e-5, name


# --- choosing kernels ---------------------------------------------------------------------------


def test_kernel_fields_validate_and_change_no_parameter():
    cfg = tiny_cfg()
    for field in KERNEL_FIELDS:
        assert dataclasses.fields(ModelConfig)  # documented in the reference like every field
        if field == "compile":
            continue
        with pytest.raises(ConfigError, match=f"model.{field}"):
            dataclasses.replace(cfg, **{field: "nope"}).validate()
    variant = dataclasses.replace(cfg, attention="xformers", rmsnorm_kernel="liger", swiglu_kernel="flash_attn",
                                  rope_kernel="liger", loss_kernel="liger_fused", compile=True)  # fmt: skip
    variant.validate()
    assert variant.num_params() == cfg.num_params()
    with torch.device("meta"):
        assert [(n, p.shape) for n, p in Llama(variant).named_parameters()] == [
            (n, p.shape) for n, p in Llama(cfg).named_parameters()
        ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_never_fails_on_cpu(dtype):
    cfg = tiny_cfg()
    assert kernels.choose_kernels(cfg, torch.device("cpu"), dtype) == KernelChoice(
        "sdpa", "eager", "eager", "eager", "chunked"
    )
    assert (
        kernels.choose_kernels(dataclasses.replace(cfg, **EAGER_FIELDS), torch.device("cpu"), dtype)
        == EAGER
    )


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
@pytest.mark.parametrize(
    ("field", "value"),
    [("attention", "flash_attn"), ("attention", "xformers"), ("rmsnorm_kernel", "liger"), ("swiglu_kernel", "xformers"),
     ("rope_kernel", "flash_attn"), ("loss_kernel", "liger_fused")],
)  # fmt: skip
def test_asked_for_but_unusable_kernel_fails_clearly(field, value):
    model = Llama(
        tiny_cfg(**{field: value})
    )  # building is fine: the choice is made per device and dtype
    with pytest.raises(
        KernelUnavailable, match=rf"model\.{field}='{value}' cannot run: .*model\.{field}=auto"
    ):
        model(torch.randint(0, 512, (1, 8)))
    assert issubclass(KernelUnavailable, ConfigError)  # the trainer prints it as a config error


def test_choice_on_cuda_follows_what_is_installed(monkeypatch):
    """The CUDA selection logic, without a GPU: fake libraries present or absent."""
    fake = {
        "flash_attn": kernels.SimpleNamespace(flash_attn_func=object(), rms_norm=object(), rotary=object(),
                                              cross_entropy=object(), swiglu=None),
        "xformers": "ImportError: built for another torch",
        "liger": "ModuleNotFoundError: No module named 'liger_kernel'",
    }  # fmt: skip
    monkeypatch.setattr(kernels, "_LIBS", dict(fake))
    monkeypatch.setattr(kernels, "_CHOICES", {})
    bf16, fp32 = torch.bfloat16, torch.float32
    assert kernels.choose("attention", "auto", "cuda", bf16) == "flash_attn"
    assert (
        kernels.choose("attention", "auto", "cuda", fp32) == "sdpa"
    )  # flash-attn is bf16/fp16 only
    assert kernels.choose("rmsnorm", "auto", "cuda", bf16) == "flash_attn"  # liger missing
    assert kernels.choose("swiglu", "auto", "cuda", bf16) == "eager"  # this flash-attn lacks swiglu
    assert kernels.choose("loss", "auto", "cuda", bf16) == "chunked"
    assert kernels.choose("attention", "auto", "cpu", bf16) == "sdpa"
    with pytest.raises(
        KernelUnavailable, match="xformers is not usable here .*built for another torch"
    ):
        kernels.choose("attention", "xformers", "cuda", bf16)
    with pytest.raises(KernelUnavailable, match="bf16/fp16 only"):
        kernels.choose("attention", "flash_attn", "cuda", fp32)
    with pytest.raises(KernelUnavailable, match="no swiglu"):
        kernels.choose("swiglu", "flash_attn", "cuda", bf16)
    monkeypatch.setitem(
        kernels._LIBS,
        "liger",
        kernels.SimpleNamespace(
            rms_norm=object(),
            rope=object(),
            swiglu=object(),
            cross_entropy=object(),
            fused_linear_cross_entropy=object(),
        ),
    )
    assert kernels.choose("loss", "auto", "cuda", bf16) == "liger_fused"
    assert kernels.choose("rope", "auto", "cuda", bf16) == "liger"


def _install_fake_liger(monkeypatch, keyword_api: bool, z_output: str | None = None) -> list:
    """A stand-in `liger_kernel.transformers.functional` (CPU, eager maths) that records its calls:
    with the keyword-argument wrappers of liger-kernel >= 0.5, or with 0.4's bare Function.apply.
    `z_output`: losses that take a z-loss (lse_square_scale, return_z_loss) and hand the term back
    as a tuple (liger-kernel 0.5.5 - 0.6) or a CrossEntropyOutput (>= 0.7); None: losses without."""
    import sys
    import types

    calls: list = []
    functional = types.ModuleType("liger_kernel.transformers.functional")
    if keyword_api and z_output is not None:

        def liger_rms_norm(
            X, W, eps, offset: float = 0.0, casting_mode: str = "llama", in_place: bool = True
        ):
            return rms_norm_reference(X, W, eps)

        def _with_z(logits, target, ignore_index, lse_square_scale, return_z_loss):
            # liger's maths: loss = CE + z-term (mean over valid rows); the term itself on request.
            loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
            z = fused.z_loss_reference(logits, target, lse_square_scale)
            if not return_z_loss:
                return loss + z
            if z_output == "tuple":
                return loss + z, z.detach()
            return types.SimpleNamespace(loss=loss + z, z_loss=z.detach(), token_accuracy=None)

        def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None,
                                             ignore_index: int = -100, lse_square_scale: float = 0.0,
                                             label_smoothing: float = 0.0, reduction: str = "mean",
                                             softcap=None, return_z_loss: bool = False, accum_dtype=None):  # fmt: skip
            calls.append(("fused_linear_cross_entropy", dict(lse_square_scale=lse_square_scale,
                                                             return_z_loss=return_z_loss)))  # fmt: skip
            return _with_z(
                input @ weight.t(), target, ignore_index, lse_square_scale, return_z_loss
            )

        def liger_cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100,
                                reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                                lse_square_scale: float = 0.0, softcap=None, return_z_loss: bool = False):  # fmt: skip
            calls.append(
                (
                    "cross_entropy",
                    dict(lse_square_scale=lse_square_scale, return_z_loss=return_z_loss),
                )
            )
            return _with_z(input, target, ignore_index, lse_square_scale, return_z_loss)

    elif keyword_api:

        def liger_rms_norm(
            X, W, eps, offset: float = 0.0, casting_mode: str = "llama", in_place: bool = True
        ):
            calls.append(
                ("rms_norm", dict(offset=offset, casting_mode=casting_mode, in_place=in_place))
            )
            return rms_norm_reference(X, W, eps)

        def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None,
                                             ignore_index: int = -100, reduction: str = "mean",
                                             accum_dtype=None):  # fmt: skip
            calls.append(("fused_linear_cross_entropy", dict(ignore_index=ignore_index, accum_dtype=accum_dtype,
                                                             dtypes=(input.dtype, weight.dtype))))  # fmt: skip
            return F.cross_entropy(input @ weight.t(), target, ignore_index=ignore_index)

        def liger_cross_entropy(
            input, target, weight=None, size_average=None, ignore_index: int = -100
        ):
            calls.append(("cross_entropy", dict(ignore_index=ignore_index)))
            return F.cross_entropy(input, target, ignore_index=ignore_index)

    else:  # liger-kernel 0.4.x: Function.apply, positional arguments only

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                return args[0]

        liger_rms_norm = liger_fused_linear_cross_entropy = _Fn.apply

        def liger_cross_entropy(input, target, ignore_index: int = -100):
            return F.cross_entropy(input, target, ignore_index=ignore_index)

    for name, fn in dict(
        liger_rms_norm=liger_rms_norm,
        liger_fused_linear_cross_entropy=liger_fused_linear_cross_entropy,
        liger_cross_entropy=liger_cross_entropy,
        liger_rope=object(),
        liger_swiglu=object(),
    ).items():
        setattr(functional, name, fn)
    root, transformers = (
        types.ModuleType("liger_kernel"),
        types.ModuleType("liger_kernel.transformers"),
    )
    root.transformers, transformers.functional = transformers, functional
    for name, module in (("liger_kernel", root), ("liger_kernel.transformers", transformers),
                         ("liger_kernel.transformers.functional", functional)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "_LIBS", {})
    monkeypatch.setattr(kernels, "_CHOICES", {})
    return calls


def test_liger_call_path_passes_keyword_arguments(monkeypatch):
    """Our calls into liger-kernel's functional API (>= 0.5: keyword wrappers): the norm in Llama's
    casting order, not in place; the fused loss with our ignore index, in the compute dtype, with fp32
    weight-gradient accumulation where the release has it; results those of the eager code."""
    calls = _install_fake_liger(monkeypatch, keyword_api=True)
    assert kernels.library("liger") is not None and kernels.library_problem("liger") is None
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 32), 1 + 0.1 * torch.randn(32)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5, "liger"), rms_norm_reference(x, w, 1e-5))
    assert calls[-1] == ("rms_norm", dict(offset=0.0, casting_mode="llama", in_place=False))
    h, head, t = loss_inputs(N=40, D=16, V=50)()
    torch.testing.assert_close(fused.output_loss(h, head, t, "liger_fused"), eager_loss(h, head, t))
    assert calls[-1] == ("fused_linear_cross_entropy",
                         dict(ignore_index=kernels.IGNORE_INDEX, accum_dtype=torch.float32,
                              dtypes=(torch.float32, torch.float32)))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.output_loss(h, head, t, "liger_fused")
    assert calls[-1][1]["dtypes"] == (
        torch.bfloat16,
        torch.bfloat16,
    )  # the matmul's dtype, as autocast's
    torch.testing.assert_close(fused.output_loss(h, head, t, "liger"), eager_loss(h, head, t))
    assert calls[-1] == ("cross_entropy", dict(ignore_index=kernels.IGNORE_INDEX))


def test_liger_without_keyword_wrappers_is_refused(monkeypatch):
    """liger-kernel 0.4.x (bare Function.apply: keyword arguments raise) is refused when imported, so
    `auto` never picks it and asking for it by name names the release to install."""
    _install_fake_liger(monkeypatch, keyword_api=False)
    assert kernels.library("liger") is None
    assert f"liger-kernel>={kernels.LIGER_MIN}" in kernels.library_problem("liger")
    assert kernels.choose("rmsnorm", "auto", "cuda", torch.bfloat16) != "liger"
    with pytest.raises(
        KernelUnavailable, match=r"model\.rmsnorm_kernel='liger' cannot run: .*too old"
    ):
        kernels.choose("rmsnorm", "liger", "cuda", torch.bfloat16)
    import tomllib

    from tests.conftest import REPO_ROOT

    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["gpu"]
    assert (
        f"liger-kernel>={kernels.LIGER_MIN}" in extra
    )  # the gpu extra asks for no release refused here


@pytest.mark.parametrize("z_output", ["tuple", "dataclass"])
def test_liger_call_path_with_z_loss(monkeypatch, z_output):
    """model.z_loss through liger's losses (fused and on the logits): its own lse_square_scale, the term
    handed back for logging in either release's format; loss, z-term and gradients those of the
    reference. Without a z-loss the call stays the plain one."""
    calls = _install_fake_liger(monkeypatch, keyword_api=True, z_output=z_output)
    assert kernels.library("liger") is not None
    torch.manual_seed(0)
    h, head, t = loss_inputs(N=40, D=16, V=50)()
    ref_total, ref_z = fused.output_loss_terms(h, head, t, "cross_entropy", Z)
    for kernel in ("liger_fused", "liger"):
        total, z_term = fused.output_loss_terms(h, head, t, kernel, Z)
        assert calls[-1][1] == dict(lse_square_scale=Z, return_z_loss=True)
        torch.testing.assert_close(total, ref_total)
        torch.testing.assert_close(z_term, ref_z)
        assert total.dtype == z_term.dtype == torch.float32 and not z_term.requires_grad
        check_parity(lambda x, w, tt, k=kernel: fused.output_loss(x, w, tt, k, Z), z_eager_loss,
                     loss_inputs(N=40, D=16, V=50), "cpu", torch.float32)  # fmt: skip
        total, z_term = fused.output_loss_terms(h, head, t, kernel, 0.0)
        assert z_term is None and calls[-1][1] == dict(lse_square_scale=0.0, return_z_loss=False)
    # `auto` picks liger_fused for a z-loss run where the release can do it.
    assert kernels.choose("loss", "auto", "cuda", torch.bfloat16, z_loss=True) == "liger_fused"


def test_loss_without_z_loss_support_is_refused_for_a_z_loss_run(monkeypatch):
    """A liger release whose losses take no lse_square_scale / return_z_loss: fine without a z-loss;
    with model.z_loss > 0 `auto` falls back to chunked and asking for it by name says why."""
    _install_fake_liger(monkeypatch, keyword_api=True)  # the plain keyword API, no z-loss arguments
    assert kernels.library("liger") is not None
    bf16 = torch.bfloat16
    assert kernels.choose("loss", "auto", "cuda", bf16) == "liger_fused"
    assert kernels.choose("loss", "auto", "cuda", bf16, z_loss=True) == "chunked"
    with pytest.raises(
        KernelUnavailable, match=r"model\.loss_kernel='liger_fused' cannot run: .*lse_square_scale"
    ):
        kernels.choose("loss", "liger_fused", "cuda", bf16, z_loss=True)
    with pytest.raises(KernelUnavailable, match="model.z_loss > 0 needs"):
        kernels.choose("loss", "liger", "cuda", bf16, z_loss=True)
    # The choice follows the config's z_loss (a separate cache entry per choice).
    cfg = tiny_cfg(loss_kernel="auto")
    assert kernels.choose_kernels(cfg, torch.device("cuda"), bf16).loss == "liger_fused"
    assert (
        kernels.choose_kernels(
            dataclasses.replace(cfg, z_loss=1e-4), torch.device("cuda"), bf16
        ).loss
        == "chunked"
    )


def _install_fake_xformers(monkeypatch) -> list:
    """A stand-in xformers on the CPU with memory_efficient_attention's layouts and its limit: the
    grouped 5-D (BMGHK) layout runs the forward only, so an input that needs a gradient makes it
    raise during the forward (its dispatcher picks the backward op there). Records each call's ndim."""
    calls: list = []

    def causal_bthe(q, k, v):  # (B, T, H, E) each
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
        )
        return out.transpose(1, 2)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert isinstance(attn_bias, LowerTriangularMask)
        calls.append(q.ndim)
        if q.ndim == 5:
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise NotImplementedError(
                    "No operator found for `memory_efficient_attention_backward` (BMGHK)"
                )
            B, T, G, Hg, E = q.shape
            q, k, v = (t.reshape(B, T, G * Hg, E) for t in (q, k, v))
            return causal_bthe(q, k, v).reshape(B, T, G, Hg, E)
        assert q.shape == k.shape == v.shape, "BMHK: as many key/value heads as query heads"
        return causal_bthe(q, k, v)

    class LowerTriangularMask:
        pass

    fake = kernels.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                   LowerTriangularMask=LowerTriangularMask, swiglu=None)  # fmt: skip
    monkeypatch.setitem(kernels._LIBS, "xformers", fake)
    return calls


@pytest.mark.parametrize("heads", [(8, 4), (8, 1), (8, 8), (32, 4)])
def test_xformers_layout_trains_grouped_query_attention(monkeypatch, heads):
    """Grouped-query attention through xformers' call path: in training K/V are repeated to H heads
    (a 4-D call that has a backward), without gradients the grouped 5-D layout (no copy); outputs and
    gradients are eager attention's (SDPA stands in for xformers' kernel on the CPU)."""
    calls = _install_fake_xformers(monkeypatch)
    H, K = heads
    torch.manual_seed(0)
    xformers = lambda q, k, v: fused.attention(q, k, v, "xformers")  # noqa: E731
    check_parity(xformers, eager_attention, attention_inputs(H=H, K=K, E=32), "cpu", torch.float32)
    assert set(calls) == {4}
    q, k, v = attention_inputs(H=H, K=K, E=32)()
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(
            xformers(q, k, v), eager_attention(q, k, v), atol=1e-5, rtol=1e-5
        )
    assert calls == [4 if K == H else 5]
    # The layout itself: query head h reads key/value head h // (H/K), as repeat_interleave lays out.
    qg, kg, vg = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))  # (B, T, heads, E)
    qx, kx, vx = fused.xformers_layout(qg, kg, vg)
    assert qx.shape == kx.shape == vx.shape == qg.shape
    torch.testing.assert_close(kx, kg.repeat_interleave(H // K, dim=2))
    if K < H:
        with torch.no_grad():
            q5, k5, v5 = fused.xformers_layout(qg, kg, vg)
        assert (
            q5.shape == k5.shape == (2, 96, K, H // K, 32) and k5.stride(3) == 0
        )  # expanded, no copy


def test_resume_may_change_kernels(tmp_path):
    """A checkpoint trained with one kernel set continues under another (kernels are not the model)."""
    import yaml

    from orchestrator.checkpoint.resume import check_resume_compatible
    from orchestrator.config import load_config, save_config

    saved = load_config(
        [
            "--model.name",
            "tiny",
            "--model.attention",
            "sdpa",
            "--model.loss_kernel",
            "cross_entropy",
        ]
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_config(saved, ckpt / "config.yaml")
    assert (
        yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["loss_kernel"]
        == "cross_entropy"
    )
    now = load_config(["--model.name", "tiny", "--model.compile", "true", "--checkpoint.init_from", str(ckpt),
                       "--run.dir", str(tmp_path / "run")])  # fmt: skip
    check_resume_compatible(now)  # no error
    changed = load_config(["--model.name", "tiny", "--model.n_layers", "3", "--checkpoint.init_from", str(ckpt),
                           "--run.dir", str(tmp_path / "run")])  # fmt: skip
    with pytest.raises(ConfigError, match="model.n_layers"):
        check_resume_compatible(changed)


# --- GPU: every library kernel (skipped without CUDA or without the library) ------------------------

LIBRARY_KERNELS = [
    ("attention", "sdpa"), ("attention", "flash_attn"), ("attention", "xformers"),
    ("rmsnorm", "liger"), ("rmsnorm", "flash_attn"),
    ("swiglu", "liger"), ("swiglu", "flash_attn"), ("swiglu", "xformers"),
    ("rope", "liger"), ("rope", "flash_attn"),
    ("loss", "chunked"), ("loss", "liger_fused"), ("loss", "liger"), ("loss", "flash_attn"),
]  # fmt: skip


def _gpu_case(op: str, kernel: str):
    """(kernel function, eager function, input maker[, frozen input indices]) for one op."""
    if op == "attention":
        if kernel == "sdpa":
            return (
                (lambda q, k, v: causal_attention(q, k, v)),
                eager_attention,
                attention_inputs(T=256),
            )
        return (
            (lambda q, k, v: fused.attention(q, k, v, kernel)),
            eager_attention,
            attention_inputs(T=256),
        )
    if op == "rmsnorm":
        return (lambda x, w: fused.rms_norm(x, w, 1e-5, kernel)), eager_rmsnorm, rmsnorm_inputs()
    if op == "swiglu" and kernel == "xformers":

        def make():
            return [torch.randn(2, 64, 256), torch.randn(512, 256) * 0.05, torch.randn(512, 256) * 0.05,
                    torch.randn(256, 512) * 0.05]  # fmt: skip

        def eager_ffn(x, wg, wu, wd):
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        return (lambda x, wg, wu, wd: fused.swiglu_ffn(x, wg, wu, wd)), eager_ffn, make
    if op == "swiglu":
        return (lambda g, u: fused.silu_mul(g, u, kernel)), eager_silu_mul, swiglu_inputs()
    if op == "rope":

        def fused_rope(q, k, cos, sin):
            q2, k2 = fused.rope(q, k, cos, sin, kernel)
            return torch.cat([q2.flatten(1), k2.flatten(1)], dim=-1)

        return fused_rope, eager_rope_qk, rope_inputs(), ROPE_FROZEN
    return (
        (lambda x, w, t: fused.output_loss(x, w, t, kernel)),
        eager_loss,
        loss_inputs(N=1000, D=256, V=4000),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("op", "kernel"), LIBRARY_KERNELS)
def test_library_kernel_matches_eager_on_gpu(op, kernel, dtype):
    problem = kernels.why_not(op, kernel, "cuda", dtype)
    if problem is not None:
        pytest.skip(problem)
    if dtype == torch.float32 and (op, kernel) in {
        ("swiglu", "xformers"),
        ("swiglu", "flash_attn"),
    }:
        pytest.skip("fused for bf16/fp16 only")
    torch.manual_seed(0)
    kernel_fn, eager_fn, make, *rest = _gpu_case(op, kernel)
    frozen = rest[0] if rest else ()
    # Triton kernels keep fp32 inputs in fp32 but may use TF32 dots (near 3e-4), hence the looser fp32 bound.
    check_parity(kernel_fn, eager_fn, make, "cuda", dtype, fp32_tol=1e-3, frozen=frozen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["chunked", "liger_fused", "liger", "flash_attn"])
def test_loss_kernel_with_z_loss_matches_eager_on_gpu(kernel, dtype):
    """CE + z-loss through each loss kernel on CUDA (liger's and flash-attn's own lse_square_scale)
    against the reference: loss, z-term and both gradients."""
    problem = kernels.why_not("loss", kernel, "cuda", dtype, z_loss=True)
    if problem is not None:
        pytest.skip(problem)
    torch.manual_seed(0)
    make = loss_inputs(N=1000, D=256, V=4000)
    check_parity(lambda x, w, t: fused.output_loss(x, w, t, kernel, Z), z_eager_loss, make, "cuda",
                 dtype, fp32_tol=1e-3)  # fmt: skip
    x, w, t = (v.cuda() for v in make())
    _, z_ref = fused.output_loss_terms(x.double(), w.double(), t, "cross_entropy", Z)
    _, z_term = fused.output_loss_terms(x.to(dtype), w.to(dtype), t, kernel, Z)
    assert z_term.dtype == torch.float32 and not z_term.requires_grad
    assert rel(z_term, z_ref) <= (1e-3 if dtype == torch.float32 else BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 4), (8, 1)])
def test_xformers_grouped_query_attention_on_gpu(heads):
    """TinyLlama's 32 query / 4 key-value heads (and multi-query) through xformers: training (K/V
    repeated, forward + backward) and a forward without gradients (the grouped 5-D layout)."""
    problem = kernels.why_not("attention", "xformers", "cuda", torch.bfloat16)
    if problem is not None:
        pytest.skip(problem)
    H, K = heads
    torch.manual_seed(0)
    make = attention_inputs(B=2, T=256, H=H, K=K, E=64)
    xformers = lambda q, k, v: fused.attention(q, k, v, "xformers")  # noqa: E731
    check_parity(xformers, eager_attention, make, "cuda", torch.bfloat16)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in make())
    ref = eager_attention(*(t.double() for t in (q, k, v)))
    with torch.no_grad():
        assert rel(xformers(q, k, v), ref) <= BF16_TOL


@pytest.mark.gpu
def test_auto_model_matches_eager_model_on_gpu():
    """The whole model with `auto` on CUDA (whatever libraries are installed) against all-eager, bf16 autocast."""
    torch.manual_seed(0)
    cfg = tiny_cfg(d_model=256, n_heads=4, n_kv_heads=2, ffn_hidden=688)
    fast = Llama(cfg).cuda()
    eager = Llama(dataclasses.replace(cfg, **EAGER_FIELDS)).cuda()
    eager.load_state_dict(fast.state_dict())
    ref = Llama(dataclasses.replace(cfg, **EAGER_FIELDS)).double()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    targets = torch.randint(0, cfg.vocab_size, (2, 64))
    ref_loss, ref_grads = model_loss_and_grads(ref, ids, targets)
    loss_f, grads_f = model_loss_and_grads(fast, ids.cuda(), targets.cuda(), torch.bfloat16)
    loss_e, grads_e = model_loss_and_grads(eager, ids.cuda(), targets.cuda(), torch.bfloat16)
    assert abs(loss_f.item() - ref_loss.item()) <= 1e-2 * ref_loss.item()
    for name in ref_grads:
        err_f, err_e = rel(grads_f[name], ref_grads[name]), rel(grads_e[name], ref_grads[name])
        assert err_f <= 3 * BF16_TOL and err_f <= 2 * err_e + 2e-3, (name, err_f, err_e)


# The attention forward kernels among SAVED_OPS (names as a dispatch mode sees them).
ATTENTION_FORWARD_OPS = {"_flash_attn_forward", "flash_fwd", "efficient_attention_forward_cutlass",
                         "_efficient_attention_forward", "_flash_attention_forward",
                         "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}  # fmt: skip


@pytest.mark.parametrize(
    ("attention", "device"),
    [("sdpa", "cpu")]
    + [pytest.param(a, "cuda", marks=pytest.mark.gpu) for a in ("sdpa", "flash_attn", "xformers")],
)
def test_selective_checkpointing_keeps_attention_outputs(attention, device):
    """With each attention kernel: `full` runs the attention forward again in backward (once per
    block), `selective` never does (it keeps its outputs: the kernel is a registered torch op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing

    problem = kernels.why_not("attention", attention, device, torch.bfloat16)
    if problem is not None:
        pytest.skip(problem)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ in ATTENTION_FORWARD_OPS
            return func(*args, **(kwargs or {}))

    def recomputed_attention(mode):
        torch.manual_seed(0)
        cfg = tiny_cfg(d_model=256, n_heads=4, n_kv_heads=2, ffn_hidden=688, attention=attention)
        model = apply_activation_checkpointing(Llama(cfg).to(device), mode)
        ids = torch.randint(0, cfg.vocab_size, (2, 64), device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(ids, targets=ids)
        with Count() as counter:
            loss.backward()
        return counter.n

    assert recomputed_attention("full") >= 2  # two blocks: the kernel is visible to the dispatcher
    assert recomputed_attention("selective") == 0


def test_eager_rope_reference_and_layout():
    """The rope reference in the model's (B, heads, T, E) layout; the helper the GPU tests use."""
    q, k, cos, sin = rope_inputs()()
    out = eager_rope_qk(q, k, cos, sin)
    assert out.shape == (2, 8 * 48 * 64 + 4 * 48 * 64)
    # Position 0 is not rotated (cos 1, sin 0); rotation keeps each pair's norm.
    torch.testing.assert_close(apply_rope(q, cos, sin)[:, :, 0], q[:, :, 0])
    half = q.shape[-1] // 2
    pair_norm = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(
        pair_norm(apply_rope(q, cos, sin)), pair_norm(q), atol=1e-5, rtol=1e-5
    )
