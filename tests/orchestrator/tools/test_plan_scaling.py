"""`orchestrator plan` (Chinchilla compute-optimal sizes) and `orchestrator fit` (power laws over runs)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from data.util import parse_count
from models.config import REDLLM_PAIRS, model_config
from orchestrator.cli import main as cli_main
from orchestrator.tools.plan import (
    DEFAULT_RESULTS,
    compute_optimal,
    decoder_size_of,
    decoder_sizes,
    make_plan,
    named_sizes,
    nearest_size,
    read_results,
    size_of,
    strategy_costs,
)
from orchestrator.tools.scaling import fit_power_law, fit_runs, read_run
from tests.training import REPO_ROOT

# Chinchilla (arXiv 2203.15556), table 3 via shared/notes/anchors.md: parameters -> (FLOPs, tokens).
CHINCHILLA = {400e6: (1.92e19, 8.0e9), 1e9: (1.21e20, 20.2e9), 10e9: (1.23e22, 205.1e9)}
LADDER = [
    "llama-20m",
    "llama-60m",
    "llama-124m",
    "llama-400m",
    "llama-700m",
    "tinyllama-1.1b",
    "llama-2b",
]


@pytest.mark.parametrize("params", sorted(CHINCHILLA))
def test_plan_reproduces_the_chinchilla_table(params):
    flops, tokens = CHINCHILLA[params]
    by_size = make_plan(params=params)
    assert by_size["optimal_tokens"] == pytest.approx(tokens, rel=0.05)
    assert by_size["flops"] == pytest.approx(flops, rel=0.05)
    by_budget = make_plan(flops=flops)  # and back: the budget gives the size and the tokens
    assert by_budget["optimal_params"] == pytest.approx(params, rel=0.05)
    assert by_budget["optimal_tokens"] == pytest.approx(tokens, rel=0.05)


def test_plan_from_gpu_hours_names_a_size_and_a_wall_time(tmp_path):
    # 1,000 H100 GPU-hours at 40% MFU: C = 1000 * 3600 * 989e12 * 0.4.
    plan = make_plan(gpu_hours=1000, device="h100", gpus=8, mfu=0.4, results=tmp_path / "none.md")
    assert plan["flops"] == pytest.approx(1000 * 3600 * 989e12 * 0.4)
    n, d = compute_optimal(plan["flops"])
    assert d == pytest.approx(20 * n) and 6 * n * d == pytest.approx(plan["flops"])
    assert plan["model"] == nearest_size(n)
    assert plan["wall_seconds"] == pytest.approx(1000 / 8 * 3600)  # the budget is spent on 8 GPUs
    assert plan["gpu_hours_needed"] == pytest.approx(1000)

    # A measured throughput (benchmarks/RESULTS.md format) sets the wall time of a size.
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Throughput\n\n| model | device | GPUs | tokens/s/GPU | MFU |\n|---|---|---|---|---|\n"
        "| tinyllama-1.1b | H100 SXM | 8 | 40,000 | 41% |\n| llama-124m | A100 | 1 | 100,000 | - |\n"
    )
    assert [(r.model, r.tokens_per_sec) for r in read_results(results)] == [
        ("tinyllama-1.1b", 40000.0),
        ("llama-124m", 100000.0),
    ]
    plan = make_plan(model="tinyllama-1.1b", device="h100", gpus=8, results=results)
    assert plan["tokens_per_sec_per_gpu"] == 40000
    assert plan["model_tokens"] == pytest.approx(20 * 1_100_048_384)
    assert plan["wall_seconds"] == pytest.approx(20 * 1_100_048_384 / (40000 * 8))
    assert "measured" in plan["throughput_source"]
    # Another size on the same device: the measured MFU carries over through the FLOPs per token.
    other = make_plan(model="llama-400m", device="a100", results=results)
    assert "measured with llama-124m" in other["throughput_source"]
    # Given on the command line, it wins.
    assert (
        make_plan(params="1B", device="h100", tokens_per_sec=12345, results=results)[
            "tokens_per_sec_per_gpu"
        ]
        == 12345
    )


def test_plan_cli(capsys):
    assert cli_main(["plan", "--params", "400M"]) == 0
    out = capsys.readouterr().out
    assert "N = 400M parameters, D = 8B tokens" in out and "1.92e+19" in out and "llama-400m" in out
    assert cli_main(["plan", "--gpu-hours", "100", "--device", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "Wall time:" in out and "12.5h on 8 GPU(s)" in out
    assert cli_main(["plan", "--gpu-hours", "100", "--device", "tpu"]) == 2
    assert parse_count("1.1B") == 1.1e9 and parse_count("400m") == 4e8 and parse_count("1e9") == 1e9


def test_plan_reads_the_packaged_throughput_table(tmp_path, capsys):
    # The default table is package data (read without a checkout, tests/test_install.py) ...
    assert DEFAULT_RESULTS.is_file()
    # ... and holds every throughput row measured in benchmarks/RESULTS.md.
    key = lambda r: (r.model, r.device, r.tokens_per_sec)  # noqa: E731
    packaged = {key(r) for r in read_results(DEFAULT_RESULTS)}
    missing = {key(r) for r in read_results(REPO_ROOT / "benchmarks" / "RESULTS.md")} - packaged
    assert not missing, f"add these rows of benchmarks/RESULTS.md to {DEFAULT_RESULTS}: {missing}"
    # --results FILE reads another table instead.
    mine = tmp_path / "mine.md"
    mine.write_text(
        "| model | device | tokens/s/GPU |\n|---|---|---|\n| llama-400m | H100 | 123,456 |\n"
    )
    assert (
        cli_main(["plan", "--model", "llama-400m", "--device", "h100", "--results", str(mine)]) == 0
    )
    assert (
        "123,456 tokens/s per GPU (measured, mine.md: llama-400m on H100)"
        in capsys.readouterr().out
    )


def test_plan_keeps_to_the_decoder_ladder(tmp_path, capsys):
    # The plan is for decoder-only pretraining: the encoder-decoder redllm-* sizes of SIZES are
    # neither recommended, nor taken for a decoder's measurement, nor planned.
    assert list(named_sizes()) == LADDER
    assert all(model_config(n).arch == "decoder" for n in decoder_sizes())
    for params in (2.1e7, 5.4e7, 1.2e8, 3.9e8, 7e8, 1.1e9, 2.1e9, 1e12):
        assert nearest_size(params) in LADDER
    for red, (dec, _) in REDLLM_PAIRS.items():
        assert size_of(f"| {red} |") == red and decoder_size_of(red) is None
        assert size_of(dec) == dec == decoder_size_of(f"{dec} (bf16, FSDP)")
    assert (
        size_of("tinyllama-1.1b") == "tinyllama-1.1b"
        and size_of("TinyLlama-1.1B") == "tinyllama-1.1b"
    )
    assert size_of("redllm-tiny") == "redllm-tiny" and size_of("gpt-2") is None
    # An encoder-decoder's throughput row is not a decoder's: llama-2b's comes from its own row,
    # and with only redllm rows on a device the MFU is assumed.
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "| model | device | tokens/s/GPU |\n|---|---|---|\n"
        "| redllm-2b | H100 | 99,999 |\n| llama-2b | H100 | 11,111 |\n| redllm-400m | A100 | 77,777 |\n"
    )
    assert (
        make_plan(model="llama-2b", device="h100", results=results)["tokens_per_sec_per_gpu"]
        == 11111
    )
    assert (
        "assumed"
        in make_plan(model="llama-400m", device="a100", results=results)["throughput_source"]
    )
    assert "assumed" in make_plan(gpu_hours=100, device="a100", results=results)["budget"]
    with pytest.raises(ValueError, match="--model tinyllama-1.1b"):
        make_plan(model="redllm-1.1b")
    assert cli_main(["plan", "--model", "redllm-2b"]) == 2
    assert "decoder-only" in capsys.readouterr().err


def write_synthetic_runs(root, E, A, alpha, noise, seed=0):
    """A ladder of finished runs, each trained compute-optimally (D = 20 N), whose final validation
    loss follows L(N) = E + A N^-alpha (times lognormal noise); along a run the loss falls as
    E + A N^-alpha (D_final / D)^alpha, so intermediate points lie above the final-point law."""
    rng = np.random.default_rng(seed)
    dirs = []
    for name in LADDER:
        run = root / name
        run.mkdir(parents=True)
        n = model_config(name).num_params()
        d_final = 20 * n
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": name}}))
        lines = [{"step": 0, "val_loss": 10.4, "tokens_seen": 0}]
        for k in range(1, 11):
            tokens = d_final * k / 10
            loss = (E + A * n**-alpha * (d_final / tokens) ** alpha) * math.exp(
                rng.normal(0, noise)
            )
            lines.append(
                {"step": 100 * k, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_seen": tokens}
            )
            lines.append(
                {
                    "step": 100 * k,
                    "val_loss": loss,
                    "val_perplexity": math.exp(loss),
                    "tokens_seen": tokens,
                }
            )
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        dirs.append(run)
    return dirs


@pytest.mark.parametrize("E, A, alpha", [(1.69, 406.4, 0.34), (2.2, 60.0, 0.25)])
def test_fit_recovers_known_exponents(tmp_path, E, A, alpha):
    # Exact data: the fit finds the law to numerical precision. C = 6 N D here (--compute 6nd):
    # alpha_C = alpha_N / 2 at D = 20 N holds for it (the FLOPs count bends it, test_families.py).
    dirs = write_synthetic_runs(tmp_path / "exact", E, A, alpha, noise=0.0)
    runs = [read_run(d, compute="6nd") for d in dirs]
    fits = fit_runs(runs)
    assert fits["params"].alpha == pytest.approx(alpha, abs=1e-6)
    assert fits["params"].E == pytest.approx(E, abs=1e-5)
    assert fits["params"].A == pytest.approx(A, rel=1e-4)
    assert fits["compute"].alpha == pytest.approx(alpha / 2, abs=1e-6)  # C = 120 N^2 at D = 20 N
    # 0.2% lognormal noise on every loss, 20 independent ladders of 7 runs: the exponents are
    # unbiased (mean error < 2% of the exponent), typically within 6% (median error), and the
    # reported one-sigma uncertainties are honest (>= 75% of fits within 2 sigma of the truth).
    errors = {"params": [], "compute": []}
    for seed in range(20):
        dirs = write_synthetic_runs(tmp_path / f"noisy{seed}", E, A, alpha, noise=0.002, seed=seed)
        fits = fit_runs([read_run(d, compute="6nd") for d in dirs])
        for key, true in (("params", alpha), ("compute", alpha / 2)):
            errors[key].append((fits[key].alpha - true, fits[key].alpha_err))
    for key, true in (("params", alpha), ("compute", alpha / 2)):
        err, sigma = np.array(errors[key]).T
        assert abs(err.mean()) < 0.02 * true, (key, err)
        assert np.median(abs(err)) < 0.06 * true, (key, err)
        assert np.mean(abs(err) < 2 * sigma) >= 0.75, (key, err, sigma)


def test_fit_power_law_needs_three_points():
    with pytest.raises(ValueError, match="need >= 3 runs"):
        fit_power_law(np.array([1e8, 1e9]), np.array([3.0, 2.5]))
    three = fit_power_law(np.array([1e8, 1e9, 1e10]), np.array([3.0, 2.5, 2.2]))
    assert math.isnan(three.alpha_err)  # no degrees of freedom left for an uncertainty


def test_fit_cli_writes_the_plot_and_reads_tensorboard_logs(tmp_path):
    dirs = write_synthetic_runs(tmp_path / "runs", 1.69, 406.4, 0.34, noise=0.0)
    # One run has only TensorBoard logs (no metrics.jsonl).
    from torch.utils.tensorboard import SummaryWriter

    tb_run = dirs[0]
    records = [json.loads(line) for line in (tb_run / "metrics.jsonl").read_text().splitlines()]
    (tb_run / "metrics.jsonl").unlink()
    writer = SummaryWriter(str(tb_run / "tensorboard"))
    for r in records:
        if "val_loss" in r:
            writer.add_scalar("val/loss", r["val_loss"], r["step"])
        elif "loss" in r:
            writer.add_scalar("train/tokens_seen", r["tokens_seen"], r["step"])
    writer.close()
    assert read_run(tb_run).loss == pytest.approx(records[-1]["val_loss"])

    png, out_json = tmp_path / "fit.png", tmp_path / "fit.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "fit",
            *map(str, dirs),
            "--plot",
            str(png),
            "--json",
            str(out_json),
            "--compute",
            "6nd",  # alpha_C = alpha_N / 2 holds for C = 6 N D
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss vs parameters: L(N) = (1.69 ± " in proc.stdout and "N^-(0.34 ± " in proc.stdout
    assert "loss vs compute:    L(C) = (1.69 ± " in proc.stdout and "C^-(0.17 ± " in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    fits = json.loads(out_json.read_text())["fits"]
    assert fits["params"]["alpha"] == pytest.approx(0.34, abs=1e-5)


def test_plan_compares_the_strategies_for_a_1b_model_on_two_nodes():
    """1.1B parameters on 2 nodes of 8 GPUs (docs/distributed.md): HSDP holds 16 B x N / 8 per
    GPU and sends across nodes only the all-reduce of its fp32 gradient shards, 8N x 1/2 per node,
    where FSDP's ring over all 16 GPUs sends 8N x 15/16, and (4A + 4) N x 15/16 with A micro-batches
    (the weights are gathered again for each); on one node, DDP fits."""
    n = 1.1e9
    ddp, fsdp, hsdp, *zero = strategy_costs(n, gpus=16, gpus_per_node=8)
    assert "HSDP 2 x 8" in hsdp.name and [z.name[-6:] for z in zero] == [
        "ZeRO-1",
        "ZeRO-2",
        "ZeRO-3",
    ]
    assert ddp.state_bytes == pytest.approx(20 * n) and fsdp.state_bytes == pytest.approx(n)
    assert hsdp.state_bytes == pytest.approx(2 * n)
    assert fsdp.node_bytes == fsdp.gpu_bytes == pytest.approx(8 * n * 15 / 16)
    assert ddp.node_bytes == pytest.approx(8 * n * 15 / 16)
    assert hsdp.node_bytes == pytest.approx(8 * n / 2)  # 8 rings (local ranks) x 2 x 4N/8 x 1/2
    assert hsdp.gpu_bytes == pytest.approx(8 * n * 7 / 8 + n / 2)
    accumulating = strategy_costs(n, gpus=16, gpus_per_node=8, micro_batches=4)
    assert accumulating[1].node_bytes == pytest.approx(20 * n * 15 / 16)
    assert accumulating[2].node_bytes == pytest.approx(8 * n / 2)  # still one all-reduce
    assert all(c.node_bytes == 0 for c in strategy_costs(n, gpus=8, gpus_per_node=8))

    two_nodes = make_plan(model="tinyllama-1.1b", device="h100", gpus=16)
    assert two_nodes["strategy"].startswith("fsdp with strategy.fsdp_shard_size 8 (HSDP)")
    one_node = make_plan(model="tinyllama-1.1b", device="h100", gpus=8)
    assert one_node["strategy"].startswith("ddp") and len(one_node["strategies"]) == 5  # no HSDP
    assert "strategies" not in make_plan(model="tinyllama-1.1b", device="h100")  # one GPU
    assert make_plan(model="tinyllama-1.1b", gpus=12)["strategy"].startswith("fsdp (full")
