"""Fast smoke tests of benchmarks/throughput.py (a 1-layer model, a few steps; no figures are judged)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, load_benchmark

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("throughput")


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
    # Every row says which kernels ran, as resolved on this device (`auto` resolved away).
    assert default["kernels"] == {"attention": "sdpa", "rmsnorm": "eager", "swiglu": "eager",
                                  "rope": "eager", "loss": "chunked"}  # fmt: skip
    assert report["results"][1]["kernels"]["attention"] == "eager" and not default["compile"]
    assert json.loads((tmp_path / "curve.json").read_text())["noise"]["mean_abs_gap"] == 0.0


def test_cuda_peak_memory_is_each_contenders_own(bench, monkeypatch):
    """Every contender stays resident during a run: the GPU figure is the process's peak over this
    contender's step less what the others hold, so it does not include their memory. The CUDA
    allocator is faked here (CPU tensors, known sizes)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    c = bench.Contender("c", model, None, optimizer, {})
    own = bench.resident_bytes(c)  # weight + exp_avg + exp_avg_sq (fp32) + the step counter
    assert 3 * 64 * 32 * 4 <= own <= 3 * 64 * 32 * 4 + 64
    mib = 2**20
    others, activations = 1000 * mib, 300 * mib
    alloc = {"now": others + own, "peak": 0}

    def fake_step(contender, inputs, targets):
        alloc["peak"] = max(alloc["peak"], alloc["now"] + activations)

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: alloc["peak"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: alloc.update(peak=alloc["now"])
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(bench, "train_step", fake_step)
    alloc["peak"] = 5000 * mib  # an earlier contender's peak must not leak into this one
    out = bench.peak_memory(c, (None, None), torch.device("cuda", 0))
    assert out["peak_mem_mib"] == pytest.approx((own + activations) / mib)
    assert out["others_resident_mib"] == pytest.approx(1000)
    assert out["process_peak_mib"] == pytest.approx((others + own + activations) / mib)
    assert bench.own_peak_bytes(10, 7, 3) == 6  # peak 10, of which 7 - 3 = 4 are the others'
    # Tied weights and views are one storage.
    tied = torch.nn.Module()
    tied.a = torch.nn.Linear(8, 8, bias=False)
    tied.b = torch.nn.Linear(8, 8, bias=False)
    tied.b.weight = tied.a.weight
    t = bench.Contender("t", tied, None, torch.optim.SGD(tied.parameters()), {})
    assert bench.resident_bytes(t) == 8 * 8 * 4


def test_compare_skips_kernel_sets_that_cannot_run_here(bench, tmp_path, capsys):
    report = bench.main([*TINY, "--ours", "default;attention=flash_attn", "--peers", "none",
                         "--skip-unavailable", "--steps", "2"])  # fmt: skip
    assert [r["name"] for r in report["results"]] == ["ours[default]"]
    assert "cannot run" in report["skipped_peers"]["ours[attention=flash_attn]"]
    assert "the other contenders' resident memory excluded" in capsys.readouterr().out
    with pytest.raises(bench.kernels.KernelUnavailable):
        bench.main([*TINY, "--ours", "attention=flash_attn", "--peers", "none"])


def test_sweep_can_stop_after_the_batch_search(bench):
    report = bench.main([*TINY, "--sweep", "--max-batch", "2", "--no-kernel-search"])
    assert report["largest_micro_batch"] == 2 and report["tried"] == []
    assert report["best_tokens_per_s"] == report["micro_batches"]["2"]


BLOCKER = """
import importlib.abc, sys
BLOCK = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
sys.meta_path.insert(0, Block())
sys.argv = ["benchmarks/throughput.py", "--help"]
import runpy
runpy.run_path("benchmarks/throughput.py", run_name="__main__")
"""


def test_benchmark_needs_no_data_stack():
    """The GPU machine has torch, lightning and transformers only: the benchmark's module-level
    imports must not need deepspeed, litdata, sentencepiece (or the rest of the data stack)."""
    import subprocess

    blocked = {
        "deepspeed",
        "litdata",
        "sentencepiece",
        "tensorboard",
        "zstandard",
        "pyarrow",
        "scipy",
        "matplotlib",
        "moto",
        "lm_eval",
        "triton",
        "liger_kernel",
        "xformers",
        "flash_attn",
    }
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=blocked)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--no-kernel-search" in proc.stdout and "--skip-unavailable" in proc.stdout
