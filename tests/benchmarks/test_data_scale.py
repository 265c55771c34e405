"""Fast smoke test of benchmarks/data_scale.py at minimal sizes (no figures are judged, only that
every row is there, positive, and that the checks the benchmark makes on itself pass)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("data_scale")


def test_chunk_writer_matches_litdata(bench, tmp_path):
    config = bench.litdata_config(tmp_path)  # raises if our chunk bytes differ from litdata's
    assert config["item_loader"] == "TokensLoader"
    assert config["data_format"][0].startswith("no_header_tensor:")


def test_minimal_run_reports_every_row(bench, tmp_path, capsys):
    have_s3 = importlib.util.find_spec("moto") is not None
    out = tmp_path / "figures.json"
    work = tmp_path / "work"
    report = bench.main(
        ["--chunks", "10,20", "--chunk-mb", "4", "--tokens", "200000", "--stream-chunk-mb", "0.1",
         "--repeats", "1", "--min-seconds", "0.2", "--positions", "10", "--elastic-chunks", "2",
         "--workdir", str(work), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["versions"]["litdata"] == report["versions"]["litdata"]
    for key in ("python", "torch", "litdata", "boto3", "moto"):
        assert saved["versions"][key]
    assert saved["cpu_count"] >= 1 and len(saved["load_average_at_end"]) == 3
    assert not any(work.iterdir())  # cleaned up

    # 1. start-up: one row per index size, both worker counts, positive figures
    startup = report["startup"]
    blocks_per_chunk = startup["chunk_tokens"] // 2049
    assert list(startup["sizes"]) == [10, 20]
    for n, row in startup["sizes"].items():
        assert row["read_index_s"] > 0 and row["index_mb"] > 0
        for nw in (0, 2):
            c = row[f"nw{nw}"]
            assert c["startup_s"] > 0 and c["main_peak_mib"] > 0 and c["state_dict_bytes"] > 0
            assert c["samples"] == n * blocks_per_chunk
        assert row["nw0"]["workers_found"] == [0]
        assert row["nw2"]["workers_found"] == [2]  # the DataLoader workers were found and read
        assert row["nw2"]["worker_peak_mib"] > 0
    assert startup["per_1k_chunks"]["nw2"]["startup_s"] is not None
    assert "| per 1k chunks |" in printed

    # 2. streaming: local, cold and warm cache, each worker count (when moto is installed)
    streaming = report["streaming"]
    assert streaming["tokens"] == 200_000 and streaming["chunks"] == 4
    if have_s3:
        rows = streaming["rows"]
        assert set(rows) == {"raw GET (boto3, sequential)"} | {
            f"{src}|{nw}" for src in ("local", "s3 cold", "s3 warm") for nw in (0, 2)
        }
        for key, runs in rows.items():
            assert runs[0]["tokens_per_s"] > 0, key
        for nw in (0, 2):
            assert rows[f"s3 cold|{nw}"][0]["epochs"] == 1
            assert rows[f"s3 warm|{nw}"][0]["cached_chunks"] == 4  # all chunks stayed cached
        assert set(streaming["warm_goal_1m_tokens_per_s"]) == {0, 2}
        assert "| s3 warm | 2 |" in printed
    else:
        assert "moto" in streaming["skipped"]

    # 3. resume: bitwise on the real-token split, synthesized late positions on the index
    strict = report["resume"]["strict"]
    assert set(strict) == {f"{name}|{nw}" for nw in (0, 2) for name in
                           ("local streaming split (real tokens)", "synthetic, 20 chunks")}  # fmt: skip
    for key, res in strict.items():
        assert "error" not in res, res.get("error")
        kinds = {row["kind"] for row in res["positions"].values()}
        assert "synthesized" in kinds, key
        for k, row in res["positions"].items():
            assert row["resume_s"][0] > 0
            if row["kind"] == "iterated":
                assert row["match"] == [True], (key, k)  # resumed exactly where it stopped
    elastic = report["resume"]["elastic"]
    assert elastic[2]["resume_s"] > 0 and not elastic[2]["errors"]
    assert "Elastic resume" in printed
