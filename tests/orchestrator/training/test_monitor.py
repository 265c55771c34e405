"""What a run shows: TensorBoard (through a real `tensorboard` server), the console line, metrics.jsonl.

One short 2-process run (the session fixture `monitored_run` in conftest.py) serves every check."""

import json
import math
import random
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch

from orchestrator.training.monitor import (
    device_peak_flops,
    generate_samples,
    group_grad_norms,
    parameter_group,
    unwrap,
)

pytestmark = pytest.mark.slow

MEMORY = (
    {"memory/allocated_gib", "memory/reserved_gib", "memory/peak_allocated_gib"}
    if torch.cuda.is_available()
    else {"memory/rss_gib", "memory/peak_rss_gib"}
)
EXPECTED_SCALARS = {
    "train/loss", "val/loss", "val/perplexity", "train/lr", "train/grad_norm",
    "grad_norm/block_00", "grad_norm/block_01", "grad_norm/embedding", "grad_norm/lm_head", "grad_norm/other",
    "train/tokens_seen", "train/tokens_per_sec", "perf/mfu", "perf/tflops_per_device",
    "perf/step_time_ms", "perf/data_wait_ms", "perf/compute_ms", "perf/data_wait_fraction",
    "data/tokens_prose", "data/tokens_code", "train/bad_steps", "train/rollbacks",
} | MEMORY  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **params):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture()
def tensorboard_server(monitored_run):
    run_dir, _ = monitored_run
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run_dir / "tensorboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tags = _get(base, "/data/plugin/scalars/tags").get(".", {})
                if EXPECTED_SCALARS <= set(tags):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                break  # the test reports what is missing
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_tensorboard_server_shows_every_scalar(tensorboard_server):
    base = tensorboard_server
    tags = set(_get(base, "/data/plugin/scalars/tags")["."])
    assert EXPECTED_SCALARS <= tags, f"missing: {sorted(EXPECTED_SCALARS - tags)}"

    def series(tag):
        return [
            (step, value)
            for _, step, value in _get(base, "/data/plugin/scalars/scalars", run=".", tag=tag)
        ]

    for tag in sorted(EXPECTED_SCALARS):
        assert series(tag), tag
    assert [s for s, _ in series("train/loss")] == [2, 4, 6]  # train.log_interval 2
    assert [s for s, _ in series("val/loss")] == [0, 3, 6]
    assert all(
        math.isclose(p, math.exp(v), rel_tol=1e-6)
        for (_, v), (_, p) in zip(series("val/loss"), series("val/perplexity"), strict=True)
    )
    assert series("train/tokens_seen")[-1] == (6, 6 * 16 * 64)
    assert series("train/bad_steps")[-1][1] == 1  # the NaN fault at step 3 was skipped
    assert series("train/rollbacks")[-1][1] == 0
    prose, code = series("data/tokens_prose")[-1][1], series("data/tokens_code")[-1][1]
    assert prose + code == 6 * 16 * 64
    assert 0 < series("perf/mfu")[-1][1] < 1 and 0 <= series("perf/data_wait_fraction")[-1][1] <= 1
    # The resolved config and the sample generations are text.
    text_tags = _get(base, "/data/plugin/text/tags")["."]
    assert {"config/text_summary", "samples/text_summary"} <= set(text_tags)
    config = _get(base, "/data/plugin/text/text", run=".", tag="config/text_summary")
    assert "max_steps: 6" in config[0]["text"] and "sample_interval: 3" in config[0]["text"]
    samples = _get(base, "/data/plugin/text/text", run=".", tag="samples/text_summary")
    assert [entry["step"] for entry in samples] == [3, 6]
    assert "Once upon a time" in samples[-1]["text"]


def test_console_line_and_metrics_jsonl(monitored_run):
    run_dir, proc = monitored_run
    progress = re.compile(
        r"^step\s+(\d+)/6 \| loss (\S+) \| lr \S+ \| grad_norm \S+ \| ([\d,]+) tok/s \| MFU ([\d.]+)% \| "
        r"tokens ([\d,]+) \| ETA (\d+m\d\ds)$"
    )
    lines = [m for m in map(progress.match, proc.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [
        2,
        4,
        6,
    ]  # one line per log interval, from rank 0 only
    assert lines[-1].group(5) == f"{6 * 16 * 64:,}" and lines[-1].group(6) == "0m00s"
    assert proc.stdout.count("samples:") == 2 and proc.stdout.count("skipped update") == 1

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"loss", "lr", "grad_norm", "tokens_seen", "time", "batch_hashes"} <= set(r)
    logged = [r for r in steps if r["step"] in (2, 4, 6)]
    for r in logged:
        assert {
            "tokens_per_sec",
            "eta_seconds",
            "perf_mfu",
            "perf_tflops_per_device",
            "perf_step_time_ms",
            "perf_data_wait_ms",
            "perf_compute_ms",
            "perf_data_wait_fraction",
        } <= set(r), r.keys()
        assert {k.replace("/", "_") for k in MEMORY} <= set(r)
        assert r["perf_data_wait_ms"] + r["perf_compute_ms"] == pytest.approx(
            r["perf_step_time_ms"]
        )
        assert r["perf_mfu"] == pytest.approx(
            r["perf_tflops_per_device"] / 1.0
        )  # logging.peak_tflops 1
    assert logged[-1]["eta_seconds"] == 0
    vals = [r for r in records if "val_loss" in r]
    assert [(r["step"], r["tokens_seen"]) for r in vals] == [(0, 0), (3, 3 * 1024), (6, 6 * 1024)]
    assert [r["step"] for r in records if "bad_step" in r] == [3]
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [3, 6]
    assert [s["prompt"] for s in samples[-1]["samples"]] == [
        "The capital of",
        "Once upon a time",
        "def add(a, b):",
    ]
    assert all(s["text"].startswith(s["prompt"]) for s in samples[-1]["samples"])
    assert [r["step"] for r in records if "tokens_by_source" in r] == [2, 4, 6]
    norms = [r for r in records if "grad_norms" in r]
    assert [r["step"] for r in norms] == [2, 4, 6]
    # The per-part norms add up (in squares) to the global norm of the same step (before clipping).
    for r in norms:
        total = math.sqrt(sum(v * v for v in r["grad_norms"].values()))
        assert total == pytest.approx(
            next(s["grad_norm"] for s in steps if s["step"] == r["step"]), rel=1e-4
        )


def test_sample_generation_leaves_the_training_rng_alone(sample_data):
    from data.tokenizer import Tokenizer
    from models.config import model_config
    from models.llama import Llama

    torch.manual_seed(0)
    model = Llama(
        model_config(
            "tiny",
            vocab_size=512,
            n_layers=2,
            d_model=64,
            n_heads=4,
            n_kv_heads=2,
            ffn_hidden=172,
            max_seq_len=64,
        )
    )
    model.train()
    tokenizer = Tokenizer(sample_data[1])
    random.seed(1)
    np.random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = generate_samples(model, tokenizer, ["The capital of", "Once upon a time"], 12)
    second = generate_samples(model, tokenizer, ["The capital of", "Once upon a time"], 12)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    assert first == second and all(
        t.startswith(p) for t, p in zip(first, ["The capital of", "Once upon a time"])
    )
    assert model.training  # back in train mode


def test_device_peaks_and_parameter_groups():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert device_peak_flops("h100") == 989e12
    assert device_peak_flops("Tesla T4") is None
    assert parameter_group("_forward_module.module.blocks.3.attn.q_proj.weight") == "block_03"
    assert parameter_group("embed.weight") == "embedding"
    assert parameter_group("module.lm_head.weight") == "lm_head"
    assert parameter_group("norm.weight") == "other"
    from models.config import model_config
    from models.llama import Llama

    model = Llama(
        model_config("tiny", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64)
    )
    assert unwrap(torch.compile(model)) is model and unwrap(model) is model


def test_group_grad_norms_match_the_global_norm():
    from types import SimpleNamespace

    from models.config import model_config
    from models.llama import Llama

    model = Llama(
        model_config(
            "tiny",
            vocab_size=128,
            n_layers=3,
            d_model=32,
            n_heads=4,
            n_kv_heads=2,
            ffn_hidden=64,
            max_seq_len=16,
        )
    )
    tokens = torch.randint(0, 128, (2, 17))
    torch.nn.functional.cross_entropy(
        model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
    ).backward()
    fabric = SimpleNamespace(device=torch.device("cpu"))
    norms = group_grad_norms(fabric, model)
    assert set(norms) == {"block_00", "block_01", "block_02", "embedding", "lm_head", "other"}
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(float(total), rel=1e-5)
