"""liger-kernel's Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

An optional group: it runs where triton and liger-kernel are importable (about 1 GB installed; not
part of `make setup`) and skips otherwise. It checks our call path into the library, not the
kernels' speed: the arguments models/kernels.py and models/fused.py pass (keyword wrappers, ignore
index, fp32 weight-gradient accumulation, the z-loss through lse_square_scale / return_z_loss),
the layouts (RoPE on (B, heads, T, E) views, grouped-query K), dtypes (bf16 autocast) and that
gradients reach every input, against the eager code; and a whole model with liger's RoPE and fused
linear + cross-entropy against the eager model (also with QK-norm and the z-loss).

The interpreter runs some kernels and not others: liger-kernel 0.8.5 with triton 3.8.0 runs the
fused linear + cross-entropy, the cross-entropy and RoPE; its RMSNorm and SwiGLU kernels stop in
the interpreter (InterpreterError), and those cases skip saying so. triton 3.6.0 ran none but RoPE
here (numpy 2.4). To run it:

    pip install --target /tmp/tritonlibs triton liger-kernel   # or into any other environment
    PYTHONPATH=/tmp/tritonlibs .venv/bin/python -m pytest -q tests/models/test_triton_interpreter.py

TRITON_INTERPRET must be set before Triton decorates a kernel (at import), and it would turn every
Triton kernel of the process into an interpreted one: the cases run in one child process of their
own, so this file changes nothing for the tests around it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MISSING = [m for m in ("triton", "liger_kernel") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {' and '.join(MISSING)} (an optional group, see the docstring)"
)


# --- the cases, run in the child process (TRITON_INTERPRET=1) ------------------------------------


def rel(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def case_library_loads():
    from models import kernels

    assert kernels.library("liger") is not None, kernels.library_problem("liger")
    # Our partials: the norm in Llama's casting order, not in place; fp32 weight-gradient accumulation.
    lib = kernels.library("liger")
    assert lib.rms_norm.keywords["casting_mode"] == "llama"
    assert lib.rms_norm.keywords.get("in_place", False) is False
    import torch

    if isinstance(lib.fused_linear_cross_entropy, functools.partial):  # releases with accum_dtype
        assert lib.fused_linear_cross_entropy.keywords == {"accum_dtype": torch.float32}


def _loss_case(kernel: str, z_loss: float = 0.0):
    """Our call into liger's loss against float64 maths; with z_loss > 0, liger's own z-loss
    (lse_square_scale) in the loss and its gradients, and the term it hands back for logging."""
    import torch
    import torch.nn.functional as F

    from models import fused, kernels

    torch.manual_seed(0)
    N, D, V = 40, 32, 120
    x0, w0 = torch.randn(1, N, D), torch.randn(V, D) * 0.2
    targets = torch.randint(0, V, (1, N))
    targets[0, ::6] = kernels.IGNORE_INDEX
    xr, wr = x0.clone().double().requires_grad_(), w0.clone().double().requires_grad_()
    logits = xr[0] @ wr.t()
    ref = F.cross_entropy(logits, targets[0], ignore_index=kernels.IGNORE_INDEX)
    valid = targets[0] != kernels.IGNORE_INDEX
    ref_z = z_loss * (logits.logsumexp(-1)[valid] ** 2).mean()
    ref = ref + ref_z
    ref.backward()
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, z_term = fused.output_loss_terms(x, w, targets, kernel, z_loss)
        if z_loss:
            assert z_term.dtype == torch.float32 and not z_term.requires_grad
            assert rel(z_term, ref_z) <= tol, (kernel, autocast, "z term", rel(z_term, ref_z))
        else:
            assert z_term is None
        loss.backward()
        assert loss.dtype == torch.float32 and loss.ndim == 0
        assert (
            x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
        )  # handed back in fp32 (master weights)
        for name, got, want in (
            ("loss", loss, ref),
            ("grad x", x.grad, xr.grad),
            ("grad w", w.grad, wr.grad),
        ):
            assert rel(got, want) <= tol, (kernel, autocast, name, rel(got, want))
    # Every target ignored: loss 0 and zero gradients, not NaN.
    x = x0.clone().requires_grad_()
    loss = fused.output_loss(x, w0, torch.full_like(targets, kernels.IGNORE_INDEX), kernel, z_loss)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def case_fused_linear_cross_entropy():
    _loss_case("liger_fused")


def case_cross_entropy():
    _loss_case("liger")


def case_fused_linear_cross_entropy_z_loss():
    _loss_case("liger_fused", z_loss=1e-2)


def case_cross_entropy_z_loss():
    _loss_case("liger", z_loss=1e-2)


def case_rope():
    import torch

    from models import fused
    from models.llama import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    B, H, K, T, E = 2, 4, 2, 16, 32
    cos, sin = rope_cos_sin(T, E, 10000.0, torch.device("cpu"), torch.float32)
    # The model's layout: (B, heads, T, E) transposed views of (B, T, heads, E) projections.
    q = torch.randn(B, T, H, E).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, K, E).transpose(1, 2).requires_grad_()
    q_before, k_before = q.detach().clone(), k.detach().clone()
    q2, k2 = fused.rope(q, k, cos, sin, "liger")
    assert q2.shape == q.shape and k2.shape == k.shape
    assert torch.equal(q.detach(), q_before) and torch.equal(
        k.detach(), k_before
    )  # inputs untouched
    g = torch.Generator().manual_seed(1)
    uq, uk = torch.randn(q2.shape, generator=g), torch.randn(k2.shape, generator=g)
    ((q2 * uq).sum() + (k2 * uk).sum()).backward()
    qr, kr = q_before.clone().requires_grad_(), k_before.clone().requires_grad_()
    rq, rk = apply_rope(qr, cos, sin), apply_rope(kr, cos, sin)
    ((rq * uq).sum() + (rk * uk).sum()).backward()
    for name, got, want in (
        ("q", q2, rq),
        ("k", k2, rk),
        ("grad q", q.grad, qr.grad),
        ("grad k", k.grad, kr.grad),
    ):
        assert rel(got, want) <= 1e-6, (name, rel(got, want))


def case_model(**options):
    """The whole model with liger's RoPE and fused loss (the choice forced: on a CPU `auto` and a named
    liger kernel are refused) against the all-eager model: loss and every parameter gradient."""
    import dataclasses

    import torch

    from models import kernels, llama
    from models.config import model_config
    from models.kernels import KernelChoice
    from models.llama import Llama

    cfg = model_config("tiny", n_layers=2, vocab_size=256, max_seq_len=32, d_model=64, n_heads=4,
                       n_kv_heads=2, ffn_hidden=176, **options)  # fmt: skip
    eager_fields = dict(attention="eager", rmsnorm_kernel="eager", swiglu_kernel="eager",
                        rope_kernel="eager", loss_kernel="cross_entropy")  # fmt: skip
    torch.manual_seed(0)
    fused, eager = Llama(cfg), Llama(dataclasses.replace(cfg, **eager_fields))
    eager.load_state_dict(fused.state_dict())
    forced = KernelChoice(
        attention="sdpa", rmsnorm="eager", swiglu="eager", rope="liger", loss="liger_fused"
    )
    llama.choose_kernels = lambda cfg, device, dtype: (
        forced if cfg.loss_kernel != "cross_entropy" else kernels.EAGER
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))
    targets[0, :3] = kernels.IGNORE_INDEX
    losses, grads = [], []
    for model in (fused, eager):
        loss = model(ids, targets=targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[0].item() - losses[1].item()) <= 1e-5 * losses[1].item(), losses
    for name in grads[1]:
        assert rel(grads[0][name], grads[1][name]) <= 1e-4, (
            name,
            rel(grads[0][name], grads[1][name]),
        )


def case_model_stability():
    """case_model with QK-norm (before liger's RoPE) and the z-loss (liger's lse_square_scale)."""
    case_model(qk_norm=True, z_loss=1e-2)


def case_rms_norm():
    import torch

    from models import fused
    from models.llama import rms_norm_reference

    torch.manual_seed(0)
    x, w = (
        (torch.randn(2, 8, 64) * 3).requires_grad_(),
        (1 + 0.1 * torch.randn(64)).requires_grad_(),
    )
    out = fused.rms_norm(x, w, 1e-5, "liger")
    assert rel(out, rms_norm_reference(x, w, 1e-5)) <= 1e-5
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def case_swiglu():
    import torch
    import torch.nn.functional as F

    from models import fused

    torch.manual_seed(0)
    gate, up = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    assert rel(fused.silu_mul(gate, up, "liger"), F.silu(gate) * up) <= 1e-5


CASES = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


def _child() -> None:
    """Runs every case; prints one JSON line: case -> "ok" | "interpreter: ..." | "failed: ..."."""
    sys.path.insert(0, str(REPO))
    results = {}
    for name, fn in CASES.items():
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            interpreter = type(e).__name__ == "InterpreterError"
            results[name] = ("interpreter: " if interpreter else "failed: ") + (
                f"{type(e).__name__}: {e}"[:300] if interpreter else traceback.format_exc()[-3000:]
            )
    import liger_kernel  # noqa: F401
    import triton

    results["versions"] = {"triton": triton.__version__, "liger-kernel": _liger_version()}
    print("RESULTS " + json.dumps(results))


def _liger_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return "unknown"


# --- the tests (parent process) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, (
        f"the interpreter run ended without results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(line.removeprefix("RESULTS "))


# Cases the interpreter is known to run with triton >= 3.8 (checked with liger-kernel 0.8.5): there
# they must pass. Elsewhere, and for the other cases, a case the interpreter cannot run skips
# naming its error; any other failure (our call path) fails.
MUST_RUN = ("library_loads", "fused_linear_cross_entropy", "cross_entropy", "rope", "model",
            "fused_linear_cross_entropy_z_loss", "cross_entropy_z_loss", "model_stability")  # fmt: skip


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("+")[0].split(".")[:2] if x.isdigit())


@pytest.mark.parametrize("case", list(CASES))
def test_liger_call_path_in_the_triton_interpreter(results, case):
    outcome, versions = results[case], results["versions"]
    known = case in MUST_RUN and _release(versions["triton"]) >= (3, 8)
    if outcome.startswith("interpreter: ") and not known:
        pytest.skip(f"Triton's interpreter cannot run this liger kernel ({outcome}; {versions})")
    assert outcome == "ok", (outcome, versions)


if __name__ == "__main__":
    _child()
