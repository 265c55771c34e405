"""optimizer.name and optimizer.implementation: torch's AdamW (fused / foreach / for-loop) or
Adafactor (foreach / for-loop), chosen and configured by the config."""

import math

import pytest
import torch

from models.config import model_config
from models.llama import Llama
from orchestrator.config import Config, load_config
from orchestrator.schema import ConfigError
from orchestrator.training import optim
from orchestrator.training.optim import (
    adafactor_implementation,
    adamw_implementation,
    build_optimizer,
)
from orchestrator.training.schedule import build_scheduler


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(model_config("tiny", n_layers=2, vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2,
                              ffn_hidden=128, max_seq_len=32))  # fmt: skip


def test_auto_is_fused_on_cpu_and_foreach_where_fused_cannot_run():
    params = list(tiny_model().parameters())
    assert adamw_implementation("auto", params) == {"fused": True, "foreach": False}
    meta = [torch.empty(3, device="meta", requires_grad=True)]
    assert adamw_implementation("auto", meta) == {"fused": False, "foreach": True}
    assert adamw_implementation("for-loop", params) == {"fused": False, "foreach": False}
    optimizer = build_optimizer(tiny_model(), Config())
    assert all(group["fused"] for group in optimizer.param_groups)


def test_every_implementation_takes_the_same_steps():
    """Three AdamW steps (weight decay on matrices, none on norms) agree across implementations."""
    finals = {}
    for implementation in ("for-loop", "foreach", "fused"):
        model = tiny_model()
        cfg = load_config(["--optimizer.implementation", implementation, "--optimizer.lr", "1e-2"])
        optimizer = build_optimizer(model, cfg)
        ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finals[implementation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert optimizer.state_dict()["state"], implementation
    start = dict(tiny_model().named_parameters())
    for implementation in ("foreach", "fused"):
        for name, value in finals["for-loop"].items():
            torch.testing.assert_close(finals[implementation][name], value, atol=1e-6, rtol=1e-5)
            assert not torch.equal(value, start[name])  # every parameter moved


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.implementation"):
        load_config(["--optimizer.implementation", "apex"])


# Adafactor (optimizer.name: adafactor): torch.optim.Adafactor, configured from optimizer.*.

ADAFACTOR = ["--optimizer.name", "adafactor"]
EPS1 = torch.finfo(torch.float32).eps  # torch's eps1 default (None): the parameter dtype's epsilon
EPS2 = 1e-3  # torch's eps2 default: floor of RMS(parameter)


def test_adafactor_is_built_from_the_config():
    model = tiny_model()
    cfg = load_config(
        ADAFACTOR
        + ["--optimizer.lr", "0.01", "--optimizer.beta2_decay", "-0.7"]
        + ["--optimizer.clip_threshold", "1.5", "--optimizer.weight_decay", "0.05"]
    )
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.Adafactor
    matrices, vectors = optimizer.param_groups
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert {id(p) for p in matrices["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert {id(p) for p in vectors["params"]} == {id(p) for p in model.parameters() if p.ndim < 2}
    assert vectors["params"]  # the norm gains
    for group in optimizer.param_groups:
        assert (group["lr"], group["beta2_decay"], group["d"]) == (0.01, -0.7, 1.5)
        assert group["eps"] == (None, EPS2) and group["foreach"] is False  # auto on a CPU
    cfg = load_config(ADAFACTOR + ["--optimizer.implementation", "foreach"])
    assert all(g["foreach"] for g in build_optimizer(model, cfg).param_groups)
    assert type(build_optimizer(model, Config())) is torch.optim.AdamW  # the default


def test_adafactor_auto_is_foreach_where_foreach_kernels_exist(monkeypatch):
    params = list(tiny_model().parameters())
    assert adafactor_implementation("auto", params) == {"foreach": False}  # CPU: no foreach kernels
    assert adafactor_implementation("foreach", params) == {"foreach": True}
    assert adafactor_implementation("for-loop", params) == {"foreach": False}
    monkeypatch.setattr(optim, "_get_foreach_kernels_supported_devices", lambda: ["cuda", "cpu"])
    assert adafactor_implementation("auto", params) == {"foreach": True}
    with pytest.raises(ValueError, match="no fused"):
        adafactor_implementation("fused", params)


def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


def reference_adafactor(
    param: torch.Tensor, grads: list[torch.Tensor], lr: float, beta2_decay: float, d: float,
    weight_decay: float,
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """Adafactor (Shazeer & Stern 2018, Algorithms 4 and 5, without first moment) written out in
    float64, with torch's conventions: relative step min(lr, 1/sqrt(t)) times max(eps2, RMS(x)),
    means instead of sums, eps1 as a floor of the denominators, decay x *= 1 - lr * weight_decay.
    Returns the parameter after the steps, and each step's clipping divisor max(1, RMS(U)/d)."""
    x = param.detach().double().clone()
    row = torch.zeros(x.shape[0], 1, dtype=torch.float64)  # matrices: one running mean per row
    col = torch.zeros(1, x.shape[-1], dtype=torch.float64)  # ... and per column
    v = torch.zeros_like(x)  # vectors: one per element
    divisors = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        beta2 = 1 - t**beta2_decay  # 0 at t=1: the first step's squares alone
        alpha = max(EPS2, rms(x)) * min(lr, 1 / math.sqrt(t))
        x = x * (1 - lr * weight_decay)
        if x.ndim == 2:
            row = beta2 * row + (1 - beta2) * (g * g).mean(dim=1, keepdim=True)
            col = beta2 * col + (1 - beta2) * (g * g).mean(dim=0, keepdim=True)
            v_hat = row * col / max(row.mean().item(), EPS1)  # rank-1 estimate of E[g^2]
        else:
            v = beta2 * v + (1 - beta2) * g * g
            v_hat = v
        u = g / v_hat.clamp(min=EPS1 * EPS1).sqrt()
        divisors.append(max(1.0, rms(u) / d))
        x = x - alpha * u / divisors[-1]
    return x, divisors


def adafactor_case() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A non-square matrix (RMS 0.05), a zero bias (RMS under eps2) and a norm gain (RMS 1), and two
    steps of gradients: rows and columns of different scales, the second step's 3x the first's (so
    that step 2 is clipped)."""
    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(0.05 * torch.randn(4, 5, generator=g))
    module.bias = torch.nn.Parameter(torch.zeros(4))
    module.gain = torch.nn.Parameter(torch.ones(5))
    scale = torch.outer(torch.tensor([1.0, 0.1, 3.0, 0.5]), torch.tensor([2.0, 1.0, 0.2, 1.0, 5.0]))
    grads = [
        {
            "weight": k * scale * torch.randn(4, 5, generator=g),
            "bias": k * torch.randn(4, generator=g),
            "gain": k * torch.tensor([1.0, -0.5, 2.0, 0.1, -3.0]) * torch.randn(5, generator=g),
        }
        for k in (1.0, 3.0)
    ]
    return module, grads


@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
@pytest.mark.parametrize(
    "lr, beta2_decay, d, weight_decay",
    [(0.01, -0.8, 1.0, 0.1), (0.9, -0.5, 1.25, 0.0)],  # lr 0.9: the 1/sqrt(t) cap binds at t=2
)
def test_adafactor_gives_the_expected_updates(implementation, lr, beta2_decay, d, weight_decay):
    """Two steps of the configured optimizer against the formulas (factored second moment for the
    matrix, plain for the vectors; weight decay on the matrix only)."""
    module, grads = adafactor_case()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    cfg = load_config(
        ADAFACTOR
        + ["--optimizer.implementation", implementation, "--optimizer.lr", str(lr)]
        + ["--optimizer.beta2_decay", str(beta2_decay), "--optimizer.clip_threshold", str(d)]
        + ["--optimizer.weight_decay", str(weight_decay), "--optimizer.min_lr", "0"]
    )
    optimizer = build_optimizer(module, cfg)
    for step in grads:
        for name, p in module.named_parameters():
            p.grad = step[name].clone()
        optimizer.step()
    clipped = False
    for name, p in module.named_parameters():
        decay = weight_decay if p.ndim == 2 else 0.0
        expected, divisors = reference_adafactor(
            start[name], [s[name] for s in grads], lr, beta2_decay, d, decay
        )
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), start[name]), name
        clipped |= divisors[-1] > 1
    assert clipped  # the case exercises the update clipping
    state = optimizer.state[module.weight]
    assert state["row_var"].shape == (4, 1) and state["col_var"].shape == (1, 5)  # factored
    assert optimizer.state[module.bias]["variance"].shape == (4,)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--optimizer.name", "adam"],
            r"optimizer.name='adam' is not one of 'adamw' \| 'adafactor'",
        ),
        (["--optimizer.beta2_decay", "0.8"], r"optimizer.beta2_decay must be <= 0"),
        (["--optimizer.beta2_decay", "nan"], r"optimizer.beta2_decay must be <= 0"),
        (["--optimizer.clip_threshold", "0"], r"optimizer.clip_threshold must be >= 1"),
        (["--optimizer.clip_threshold", "0.5"], r"optimizer.clip_threshold must be >= 1"),
        (["--optimizer.clip_threshold", "nan"], r"optimizer.clip_threshold must be >= 1"),
        (
            ADAFACTOR + ["--optimizer.implementation", "fused"],
            r"optimizer.implementation=fused is not available with optimizer.name=adafactor",
        ),
        (
            ADAFACTOR + ["--strategy.name", "deepspeed"],
            r"optimizer.name=adafactor does not work with strategy.name=deepspeed: ZeRO .* 1-D"
            r".*use strategy.name=ddp",
        ),
        (
            ADAFACTOR + ["--strategy.name", "fsdp"],
            r"optimizer.name=adafactor does not work with strategy.name=fsdp: .*DTensors"
            r".*use strategy.name=ddp",
        ),
    ],
)
def test_adafactor_config_errors_name_the_keys(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_adafactor_settings_that_load():
    for args in (
        ADAFACTOR + ["--strategy.name", "ddp", "--optimizer.clip_threshold", "inf"],
        ADAFACTOR + ["--strategy.name", "single", "--optimizer.beta2_decay", "0"],
        ["--strategy.name", "deepspeed", "--optimizer.implementation", "fused"],  # adamw: as before
    ):
        load_config(args)


def test_the_redllm_schedule_is_expressible():
    """RedLLM (arXiv 2510.26622): Adafactor (decay 0.8), 2K warmup steps to a peak lr of 0.01, then
    a cosine decay by a factor 0.1: linear to 0.01 at step 2000, cosine to 0.001 at the end."""
    warmup, max_steps, peak = 2000, 6000, 0.01
    cfg = load_config(
        ADAFACTOR
        + [
            "--optimizer.lr",
            "0.01",
            "--optimizer.min_lr",
            "0.001",
            "--optimizer.beta2_decay",
            "-0.8",
        ]
        + ["--schedule.warmup_steps", str(warmup), "--schedule.decay", "cosine"]
        + ["--train.max_steps", str(max_steps)]
    )
    module = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []  # lrs[s]: the lr of the optimizer step after s steps
    for _ in range(max_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == lrs[-1]
        optimizer.step()  # no gradients: a no-op, but in the order LambdaLR expects
        scheduler.step()
    assert lrs[0] == pytest.approx(peak / warmup)  # step 0: the first warmup step
    for s in range(warmup):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warmup, rel=1e-9)  # linear
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    for s in range(warmup, max_steps + 1):
        progress = (s - warmup) / (max_steps - warmup)
        cosine = 0.001 + (peak - 0.001) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lrs[s] == pytest.approx(cosine, rel=1e-9)
    assert lrs[max_steps // 2 + warmup // 2] == pytest.approx((peak + 0.001) / 2)  # mid-decay
    assert lrs[max_steps - 1] == pytest.approx(0.001, rel=1e-5)  # the last step trained
    assert lrs[max_steps] == pytest.approx(0.001)  # 0.1 x the peak
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))


def fsdp2_adafactor_worker(rank: int, port: int, foreach: bool, results) -> None:
    """One rank: a small model under FSDP2 (gloo) and one torch.optim.Adafactor step."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
        fully_shard(model)
        optimizer = torch.optim.Adafactor(model.parameters(), lr=0.01, foreach=foreach)
        model(torch.randn(8, 6)).square().sum().backward()
        try:
            optimizer.step()
            results.put((rank, "stepped", type(model[0].weight).__name__))
        except RuntimeError as e:
            results.put((rank, "failed", str(e).splitlines()[0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("foreach", [False, True])
def test_torch_adafactor_cannot_step_fsdp2_parameters(foreach):
    """Why Config.validate refuses adafactor with strategy.name=fsdp: torch's Adafactor step fails on
    FSDP2's DTensor parameters (in-place ops on the partial column sums of a sharded matrix). When
    this test fails because the step runs, check it against one process and lift the refusal."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(
        fsdp2_adafactor_worker, args=(port, foreach, results), nprocs=2, start_method="spawn"
    )
    outcomes = sorted(results.get() for _ in range(2))
    assert [(rank, what) for rank, what, _ in outcomes] == [(0, "failed"), (1, "failed")], outcomes
    assert all("placement" in detail for _, _, detail in outcomes), outcomes
