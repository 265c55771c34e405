"""Smoke test of benchmarks/scale.py at `tiny` size (the figures of record are at 1.1B): two
ranks sampled, a checkpoint at step 2, the resumed run bitwise equal to the straight one."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark

pytestmark = pytest.mark.slow


def test_scale_benchmark_samples_every_rank_and_resumes_bitwise(sample_data, tmp_path):
    bench = load_benchmark("scale")
    tokens, tokenizer = sample_data
    out = tmp_path / "scale.json"
    argv = ["--strategy", "fsdp", "--model", "tiny", "--seq-len", "32", "--work", str(tmp_path),
            "--data", str(tokens), str(tokenizer), "--json", str(out), "--model.vocab_size", "512"]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    straight, resumed = result["straight"], result["resumed"]
    assert straight["steps"] == [1, 2, 3, 4] and resumed["steps"] == [3, 4]
    assert resumed["bitwise"] and resumed["resume_seconds"] > 0
    assert [c["step"] for c in straight["checkpoints"]] == [2, 4]
    assert [r["rank"] for r in straight["ranks"]] == [0, 1]
    for rank in straight["ranks"]:
        assert 0 < rank["peak_before_first_step_gib"] <= rank["peak_gib"]
        assert len(rank["peak_per_step_gib"]) == 4
