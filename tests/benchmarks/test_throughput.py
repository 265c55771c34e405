"""Fast smoke tests of benchmarks/throughput.py (a 1-layer model, a few steps; no figures are judged)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "throughput_bench", REPO_ROOT / "benchmarks" / "throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput_bench"] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--model", "tiny", "--override", "n_layers=1", "--override", "vocab_size=256", "--batch", "2",
        "--seq-len", "16", "--warmup", "1", "--steps", "3", "--device", "cpu"]  # fmt: skip


def test_compare_writes_figures_and_ratios(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "litgpt_available", lambda: None)
    out = tmp_path / "figures.json"
    report = bench.main(
        [*TINY, "--ours", "default;baseline", "--peers", "hf,litgpt", "--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"], default=str))
    names = [r["name"] for r in saved["results"]]
    assert names == ["ours[default]", "ours[baseline]", "hf LlamaForCausalLM"]
    assert saved["skipped_peers"] == {"litgpt": "litgpt is not installed"}
    for row in saved["results"]:
        assert row["tokens_per_s"] > 0 and row["steps_timed"] == 3
        assert row["mfu"] is None  # no known peak on a CPU
        assert row["peak_mem_mib"] is None or row["peak_mem_mib"] > 0
    # Same weights: our model and LlamaForCausalLM start from the same loss (they are the same model).
    ours, hf = saved["results"][0], saved["results"][2]
    assert abs(ours["initial_loss"] - hf["initial_loss"]) < 1e-4
    assert saved["results"][0]["info"]["kernels"] == {"attention": "sdpa", "rmsnorm": "eager", "swiglu": "eager",
                                                      "rope": "eager", "loss": "chunked"}  # fmt: skip
    assert set(saved["ratios"]) >= {"ours[default] / hf LlamaForCausalLM",
                                    "ours[default] / hf LlamaForCausalLM (paired per round)"}  # fmt: skip
    for key in ("device", "date", "versions", "command", "config", "train_flops_per_token"):
        assert saved[key]
    assert saved["versions"]["torch"] == torch.__version__


def test_sweep_finds_a_batch_and_a_kernel_set(bench, tmp_path):
    report = bench.main([*TINY, "--sweep", "--max-batch", "2", "--no-compile-in-sweep", "--json",
                         str(tmp_path / "sweep.json")])  # fmt: skip
    assert report["largest_micro_batch"] == 2 and list(report["micro_batches"]) == ["1", "2"]
    assert report["best_tokens_per_s"] > 0
    tried = {tuple(sorted(t["kernels"].items())) for t in report["tried"]}
    assert len(tried) >= 2  # baseline and at least the chunked loss (what runs on a CPU)
    assert report["best_kernels"]["attention"] in ("sdpa", "flash_attn", "xformers")


def test_peak_flops_table(bench, monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-32GB", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert bench.peak_flops(cuda, "bf16-mixed") == (peak, name)
        assert bench.peak_flops(cuda, "32-true")[0] is None  # fp32 peaks are not tabulated
    assert bench.peak_flops(torch.device("cpu"), "bf16-mixed")[0] is None


def test_kernel_set_parsing(bench):
    assert bench.parse_kernel_set("baseline")["loss_kernel"] == "cross_entropy"
    assert bench.parse_kernel_set("attention=sdpa,model.compile=true") == {
        "attention": "sdpa",
        "compile": True,
    }
    with pytest.raises(SystemExit, match="not a kernel field"):
        bench.parse_kernel_set("n_layers=3")


def test_curve_compares_kernel_sets_with_the_eager_reference(bench, tmp_path):
    """Loss curves from the same weights and token stream: the default set, eager, and eager in fp32
    as the noise yardstick; on a CPU in fp32 the default set trains like eager to float rounding."""
    report = bench.main(
        [*TINY, "--curve", "30", "--ours", "default", "--json", str(tmp_path / "curve.json")]
    )
    names = [r["name"] for r in report["results"]]
    assert names == ["ours[default]", "ours[eager]", "ours[eager] 32-true"]
    curves = report["losses"]
    assert all(len(v) == 30 for v in curves.values())
    default = report["results"][0]
    assert default["final_loss"] < default["first_loss"] - 0.5  # the stream is learnable
    assert default["mean_abs_gap"] < 1e-3 and default["within_noise"] in (True, False)
    assert curves["ours[eager]"] == curves["ours[eager] 32-true"]  # same precision: the same run
    assert json.loads((tmp_path / "curve.json").read_text())["noise"]["mean_abs_gap"] == 0.0
