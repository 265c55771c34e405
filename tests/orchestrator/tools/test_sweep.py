"""`orchestrator sweep` (grids, ladders, parameter matching; local and Slurm executors) and
`orchestrator report`, on real trainer subprocesses of the tiny model (1 process, a few steps)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from models.config import model_config
from orchestrator.cli import main as cli_main
from orchestrator.config import load_config, save_config
from orchestrator.schema import ConfigError
from orchestrator.tools import sweep as sweep_module
from orchestrator.tools.sweep import (
    device_slots,
    match_ffn_hidden,
    merge_flags,
    parse_grid,
    reconcile,
    run_name,
    short_keys,
)
from tests.conftest import local_slurm
from tests.training import REPO_ROOT, TINY, data_args

# TINY (tests/training.py) in one process: global batch 4 x 64 tokens, no accumulation; its
# learning rate is left to the grids (a grid key cannot also be an override of every run).
_LR = TINY.index("--optimizer.lr")
ONE = [*TINY[:_LR], *TINY[_LR + 2 :], "--strategy.devices", "1", "--train.global_batch_size", "4"]
ONE += ["--train.seq_len", "64"]
BASE = {
    "model": {"name": "tiny"},
    "train": {"max_steps": 4},
    "eval": {"interval": 2},
    "checkpoint": {"interval": 2},
    "logging": {"sample_interval": 0},
    "strategy": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
}
# A learning rate of 1e3 blows the loss up at step 2; the guard (spike detection after one good
# step, a rollback after one bad step, one rollback allowed) then stops the run as diverged.
TIGHT_GUARD = [
    "--guard.spike_factor", "2", "--guard.spike_warmup", "1",
    "--guard.rollback_after", "1", "--guard.max_rollbacks", "1",
]  # fmt: skip


@pytest.fixture
def base_config(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LT_"))}
    return dict(e, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))


def sweep_command(base_config, study, sample_data, *args):
    return [
        sys.executable, "-m", "orchestrator", "sweep", "--config", str(base_config),
        "--study-dir", str(study), *args, *ONE, *data_args(sample_data),
    ]  # fmt: skip


def run_sweep(base_config, study, sample_data, *args, check=True, extra_env=None):
    proc = subprocess.run(
        sweep_command(base_config, study, sample_data, *args),
        cwd=REPO_ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def study_json(study):
    return json.loads((Path(study) / "study.json").read_text())


def runs_by_name(study):
    return {r["name"]: r for r in study_json(study)["runs"]}


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --------------------------------------------------------------------------------------------
# Planning (no training)
# --------------------------------------------------------------------------------------------


def test_grid_names_are_readable_and_filesystem_safe():
    axes = [parse_grid("optimizer.lr=1e-3,3e-3"), parse_grid("model.attn_gate=none,headwise")]
    short = short_keys([a.key for a in axes])
    assert run_name({"optimizer.lr": "3e-3", "model.attn_gate": "headwise"}, short) == (
        "lr=3e-3,attn_gate=headwise"
    )
    assert run_name({"data.dir": "/a b/c"}, short_keys(["data.dir"])) == "dir=_a_b_c"
    # two keys with the same last part keep their full names
    assert short_keys(["optimizer.lr", "other.lr"]) == {
        "optimizer.lr": "optimizer.lr",
        "other.lr": "other.lr",
    }
    with pytest.raises(ConfigError, match="SECTION.KEY=V1,V2"):
        parse_grid("lr=1e-3")


def test_parallel_slots_pin_gpus_and_slurm_flags_merge(monkeypatch):
    runs = [{"devices": 2, "num_nodes": 1, "accelerator": "auto"}] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert device_slots(runs, 2) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    with pytest.raises(ConfigError, match="need 6 GPUs, 4 are visible"):
        device_slots(runs, 3)
    assert device_slots(runs, 1) == [{}]  # one at a time: the run sees what the sweep sees
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpu = [{"devices": 1, "num_nodes": 1, "accelerator": "cpu"}] * 2
    assert (
        device_slots(cpu, 2) == [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}] * 2
    )
    assert merge_flags(
        ["--nodes=2", "--cpus-per-task=12", "--requeue"], ["--nodes=1"], ["--cpus-per-task", "1"]
    ) == ["--nodes=1", "--requeue", "--cpus-per-task", "1"]


def test_outcomes_come_from_the_run_dirs_and_slurm_records(tmp_path, monkeypatch):
    def run(index, status, **extra):
        run_dir = tmp_path / f"r{index}"
        run_dir.mkdir()
        attempts = [{"attempt": 1, "job_id": f"7_{index}"}]
        return {"index": index, "name": f"r{index}", "run_dir": str(run_dir), "max_steps": 4,
                "status": status, "attempts": attempts, **extra}  # fmt: skip

    runs = [
        run(
            0, "running"
        ),  # its sweep was killed, nothing finished: interrupted (resumed next time)
        run(1, "running"),  # finished after all (summary.json at max_steps)
        run(2, "running"),  # stopped by the guard
        run(3, "submitted", job_id="7_3"),  # left the queue with exit 1: failed (retried next time)
        run(4, "submitted", job_id="7_4"),  # still queued
        run(5, "submitted", job_id="7_5"),  # requeued by USR1 and ended 0 without finishing
    ]
    (tmp_path / "r1" / "summary.json").write_text(json.dumps({"steps": 4}))
    (tmp_path / "r2" / "logs").mkdir()
    (tmp_path / "r2" / "logs" / "job-9.log").write_text(
        "RuntimeError: step 3: 1 bad steps in a row after 1 rollbacks; stopping instead of diverging"
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "3.status").write_text("job=10 array=7_3 restart=0 exit=1 time=t\n")
    (tmp_path / "tasks" / "5.status").write_text("job=12 array=7_5 restart=1 exit=0 time=t\n")
    monkeypatch.setattr(sweep_module, "slurm_queue", lambda ids: {"7_4": "RUNNING"})
    study = {"runs": runs}
    reconcile(tmp_path, study)
    assert [r["status"] for r in runs] == [
        "interrupted", "finished", "diverged", "failed", "submitted", "stopped",
    ]  # fmt: skip
    assert runs[2]["diverged_at_step"] == 3
    assert runs[3]["attempts"][-1]["exit_code"] == 1 and runs[5]["attempts"][-1]["exit_code"] == 0


def test_every_run_is_checked_before_anything_starts(base_config, sample_data, tmp_path, capsys):
    study = tmp_path / "bad"
    common = [
        "--config",
        str(base_config),
        "--study-dir",
        str(study),
        *ONE,
        *data_args(sample_data),
    ]
    code = cli_main(["sweep", *common, "--grid", "model.attn_gate=none,bogus"])
    err = capsys.readouterr().err
    assert code == 2
    assert "run 'attn_gate=bogus'" in err and "model.attn_gate='bogus'" in err, err
    assert not study.exists()  # nothing written, nothing started
    code = cli_main(["sweep", *common, "--grid", "model.attn_gat=none,headwise"])
    err = capsys.readouterr().err
    assert code == 2 and "run 'attn_gat=none'" in err and "model.attn_gat" in err, err
    code = cli_main(["sweep", *common, "--grid", "run.dir=a,b"])
    assert code == 2 and "run.dir cannot be given" in capsys.readouterr().err


def ladder_args(base_config, study, sample_data):
    """A ladder study's sweep arguments: the sizes' own shapes (no TINY overrides), a small batch."""
    return ["--config", str(base_config), "--study-dir", str(study), *data_args(sample_data),
            "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
            "--train.seq_len", "256"]  # fmt: skip


def test_ladder_sets_max_steps_from_tokens_per_param(base_config, sample_data, tmp_path):
    study = tmp_path / "ladder"
    sizes = ["tiny", "llama-20m", "llama-60m"]
    args = ladder_args(base_config, study, sample_data)
    code = cli_main(
        ["sweep", *args, "--ladder", ",".join(sizes), "--tokens-per-param", "20",
         "--grid", "optimizer.lr=1e-3,2e-3", "--dry-run"]
    )  # fmt: skip
    assert code == 0
    runs = study_json(study)["runs"]
    assert [r["name"] for r in runs] == [
        f"model={s},lr={lr}" for s in sizes for lr in ("1e-3", "2e-3")
    ]
    for run in runs:
        size = run["overrides"]["model.name"]
        params = model_config(size).num_params()
        assert run["params"] == params
        assert run["tokens_per_step"] == 8 * 256
        assert run["max_steps"] == math.ceil(20 * params / (8 * 256))
        assert f"--train.max_steps={run['max_steps']}" in run["args"]
        assert run["status"] == "pending" and run["attempts"] == []
    assert not any(Path(r["run_dir"]).exists() for r in runs)  # a dry run starts nothing


def test_match_params_narrows_ffn_hidden_to_within_half_a_percent(
    base_config, sample_data, tmp_path, capsys
):
    study = tmp_path / "matched"
    code = cli_main(
        ["sweep", "--config", str(base_config), "--study-dir", str(study), *ONE,
         *data_args(sample_data), "--grid", "model.attn_gate=none,headwise,elementwise",
         "--match-params", "--dry-run"]
    )  # fmt: skip
    assert code == 0
    runs = runs_by_name(study)
    baseline = runs["attn_gate=none"]
    assert baseline["ffn_hidden"] == 172 and baseline["params"] == baseline["baseline_params"]
    for gate in ("headwise", "elementwise"):
        run = runs[f"attn_gate={gate}"]
        assert run["baseline_params"] == baseline["params"]
        assert run["unmatched_params"] > run["baseline_params"]  # the gate adds parameters...
        assert run["ffn_hidden"] < 172  # ...which a narrower FFN gives back
        assert abs(run["params"] / run["baseline_params"] - 1) <= 0.005
        assert f"--model.ffn_hidden={run['ffn_hidden']}" in run["args"]
        # the recorded count is the model the trainer will build
        cfg = load_config(run["args"])
        assert cfg.model.num_params() == run["params"] and cfg.model.attn_gate == gate
    out = capsys.readouterr().out
    assert "ffn_hidden 172->" in out
    # TinyLlama with elementwise gates: 45M more parameters, given back within 0.5%.
    big = model_config("tinyllama-1.1b", attn_gate="elementwise")
    target = model_config("tinyllama-1.1b").num_params()
    f = match_ffn_hidden(big, target)
    matched = model_config("tinyllama-1.1b", attn_gate="elementwise", ffn_hidden=f)
    assert f < 5632 and abs(matched.num_params() / target - 1) <= 0.005
    assert match_ffn_hidden(big, target, multiple=64) % 64 == 0
    with pytest.raises(ConfigError, match="cannot match"):
        match_ffn_hidden(big, target // 4)  # the FFN alone cannot give back that much


def _fake_run(run, loss, summary=True):
    """A finished run dir as the trainer leaves it (config.yaml, metrics.jsonl, summary.json)."""
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True)
    save_config(load_config(run["args"]), run_dir / "config.yaml")
    tokens = run["max_steps"] * run["tokens_per_step"]
    lines = [
        {"step": 0, "val_loss": loss + 3.0, "tokens_seen": 0},
        {"step": run["max_steps"], "loss": loss, "tokens_seen": tokens, "tokens_per_sec": 1000.0},
        {"step": run["max_steps"], "val_loss": loss, "tokens_seen": tokens},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({"steps": run["max_steps"]}))


def test_fit_and_report_take_a_ladder_study(base_config, sample_data, tmp_path, capsys):
    study = tmp_path / "ladder"
    sizes = ["tiny", "llama-20m", "llama-60m", "llama-124m"]
    args = ladder_args(base_config, study, sample_data)
    code = cli_main(
        ["sweep", *args, "--ladder", ",".join(sizes), "--tokens-per-param", "20", "--dry-run"]
    )
    assert code == 0
    runs = study_json(study)["runs"]
    # Losses from an exact power law in N (E 1.69, A 406.4, alpha 0.34); the last run never ended.
    for run in runs[:3]:
        _fake_run(run, 1.69 + 406.4 * run["params"] ** -0.34)
    _fake_run(runs[3], 9.0, summary=False)
    capsys.readouterr()
    assert (
        cli_main(
            [
                "fit",
                str(study),
                "--plot",
                str(tmp_path / "fit.png"),
                "--json",
                str(tmp_path / "fit.json"),
            ]
        )
        == 0
    )
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert [r["name"] for r in fit["runs"]] == [r["name"] for r in runs[:3]]  # unfinished: left out
    assert fit["fits"]["params"]["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert cli_main(["report", str(study)]) == 0
    report = json.loads((study / "report" / "report.json").read_text())
    (scaling,) = report["scaling"]
    assert scaling["fits"]["params"]["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert png_size(study / "report" / scaling["file"])[0] > 0
    assert "## Scaling (ladder)" in (study / "report" / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_runs_locally_resumes_after_a_kill_records_divergence_and_reports(
    base_config, sample_data, tmp_path
):
    """2 x 2: a good and a diverging learning rate, without and with a head-wise gate (parameter
    matched). The sweep is SIGKILLed (with its trainers) once the first run has finished and the
    second has written a checkpoint; the same command then finishes the study without redoing the
    finished run; a third time nothing is run (the diverged runs are not retried)."""
    study = tmp_path / "study-lr"
    args = ["--grid", "optimizer.lr=1e-3,1e3", "--grid", "model.attn_gate=none,headwise"]
    args += [
        "--match-params",
        *TIGHT_GUARD,
        "--checkpoint.interval",
        "1",
        "--train.max_steps",
        "12",
    ]
    args += ["--eval.interval", "6"]
    first, second = study / "lr=1e-3,attn_gate=none", study / "lr=1e-3,attn_gate=headwise"
    started = time.perf_counter()
    sweep = subprocess.Popen(
        sweep_command(base_config, study, sample_data, *args),
        cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the trainers die with it
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (second / "checkpoints" / "step-00000002").is_dir():
            assert sweep.poll() is None, sweep.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "the second run never reached its second checkpoint"
            time.sleep(0.05)
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    killed_finished = (second / "summary.json").is_file()  # (only if it ended within the poll)
    state = runs_by_name(study)
    assert state[first.name]["status"] == "finished"
    assert state[second.name]["status"] == ("finished" if killed_finished else "running")
    kept = {p: (first / p).read_bytes() for p in ("metrics.jsonl", "train.log", "summary.json")}
    mtimes = {p: (first / p).stat().st_mtime_ns for p in kept}

    proc = run_sweep(base_config, study, sample_data, *args, "--parallel", "2")  # 2 at a time now
    print(f"2x2 sweep, killed and run again: {time.perf_counter() - started:.1f}s")
    assert f"4 run(s), {2 if killed_finished else 3} to run" in proc.stdout
    runs = runs_by_name(study)
    assert list(runs) == [
        "lr=1e-3,attn_gate=none", "lr=1e-3,attn_gate=headwise",
        "lr=1e3,attn_gate=none", "lr=1e3,attn_gate=headwise",
    ]  # fmt: skip
    # The finished run was not redone: one attempt, its files untouched.
    assert len(runs[first.name]["attempts"]) == 1
    assert {p: (first / p).read_bytes() for p in kept} == kept
    assert {p: (first / p).stat().st_mtime_ns for p in kept} == mtimes
    # The killed one resumed from its checkpoint, its log appended.
    log = (second / "train.log").read_text()
    if not killed_finished:
        attempts = runs[second.name]["attempts"]
        assert [a.get("status") for a in attempts] == ["interrupted", "finished"]
        assert log.count("=== orchestrator sweep: attempt") == 2
        assert "Resumed from" in log and "step-0000000" in log.split("Resumed from")[1][:200]
    steps = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in steps if "loss" in r}) == list(range(1, 13))
    for name, run in runs.items():
        run_dir = Path(run["run_dir"])
        assert (
            run_dir == study / name and (run_dir / "config.yaml").is_file()
        )  # saved by the trainer
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["model"]["attn_gate"] == run["overrides"]["model.attn_gate"]
        assert saved["model"]["ffn_hidden"] == run["ffn_hidden"]
    for gate in ("none", "headwise"):
        good, bad = runs[f"lr=1e-3,attn_gate={gate}"], runs[f"lr=1e3,attn_gate={gate}"]
        assert good["status"] == "finished" and good["attempts"][-1]["exit_code"] == 0
        assert bad["status"] == "diverged" and bad["diverged_at_step"] == 2, proc.stdout
        assert len(bad["attempts"]) == 1 and bad["attempts"][0]["exit_code"] != 0
    assert runs["lr=1e-3,attn_gate=headwise"]["ffn_hidden"] < 172

    report_dir = tmp_path / "report"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "report", str(study), "--out", str(report_dir)],
        cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["name"]: r for r in report["runs"]}
    assert set(rows) == set(runs)
    good, bad = rows["lr=1e-3,attn_gate=none"], rows["lr=1e3,attn_gate=none"]
    assert good["steps"] == 12 and good["tokens"] == 12 * 256 and not good["diverged"]
    assert good["final_val_perplexity"] == pytest.approx(math.exp(good["final_val_loss"]))
    assert good["best_val_loss"] <= good["final_val_loss"] and good["tokens_per_sec"] > 0
    # the diverged run: rolled back once, then stopped; its bad steps are the two at step 2
    assert bad["diverged"] and bad["diverged_at_step"] == 2
    assert bad["rollbacks"] == 1 and bad["bad_steps"] == 2
    matched = rows["lr=1e-3,attn_gate=headwise"]
    assert matched["baseline_params"] == good["params"]
    assert abs(matched["params"] / matched["baseline_params"] - 1) <= 0.005
    lrs = {v["label"]: v for v in report["learning_rates"]}
    assert set(lrs) == {"attn_gate=none", "attn_gate=headwise"}
    assert all(
        v["largest_lr_trained"] == 1e-3 and v["smallest_lr_diverged"] == 1e3 for v in lrs.values()
    )
    md = (report_dir / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| lr=")]
    assert len(table) == 4 and "yes (step 2)" in md and "| attn_gate=none | 0.001 | 1000 |" in md
    assert "baseline params" in md and "(from 172)" in md
    assert report["plots"]["val_loss"]["curves"] == 4
    assert report["plots"]["loss_vs_lr"] == {
        "file": "loss_vs_lr.png",
        "curves": 2,
        "diverged_points": 2,
    }
    for name in ("val_loss.png", "loss_vs_lr.png"):
        width, height = png_size(report_dir / name)
        assert width > 400 and height > 300

    # A third time: nothing runs; the diverged runs are not retried.
    logs = {n: (Path(r["run_dir"]) / "train.log").read_bytes() for n, r in runs.items()}
    again = run_sweep(base_config, study, sample_data, *args)
    assert "4 run(s), 0 to run" in again.stdout
    after = runs_by_name(study)
    assert {n: r["status"] for n, r in after.items()} == {n: r["status"] for n, r in runs.items()}
    assert {n: len(r["attempts"]) for n, r in after.items()} == {
        n: len(r["attempts"]) for n, r in runs.items()
    }
    assert {n: (Path(r["run_dir"]) / "train.log").read_bytes() for n, r in after.items()} == logs


# --------------------------------------------------------------------------------------------
# Slurm: one job array on the local test cluster (cluster/local_slurm.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from local_slurm(tmp_path_factory)


@pytest.mark.slow
def test_slurm_executor_runs_the_study_as_one_job_array(slurm, base_config, sample_data, tmp_path):
    study = tmp_path / "study-slurm"
    args = [
        "--grid", "optimizer.lr=1e-3,2e-3", "--executor", "slurm", "--wait",
        "--slurm-args", "--cpus-per-task=1 --time=15",
    ]  # fmt: skip
    started = time.perf_counter()
    extra = {"SLURM_CONF": slurm.env["SLURM_CONF"], "PYTHON": sys.executable}
    proc = run_sweep(base_config, study, sample_data, *args, extra_env=extra)
    print(f"slurm sweep: {time.perf_counter() - started:.1f}s")
    assert "--array=0,1 " in proc.stdout and "cluster/sweep.slurm" in proc.stdout
    # pretrain.slurm's defaults, the runs' shape (1 node x 1 task, CPU), then --slurm-args
    assert (
        "--requeue" in proc.stdout
        and "--nodes=1 --ntasks-per-node=1 --gpus-per-node=0" in proc.stdout
    )
    assert "--cpus-per-task=12" not in proc.stdout and "--cpus-per-task=1 --time=15" in proc.stdout
    runs = study_json(study)["runs"]
    array = {r["job_id"].split("_")[0] for r in runs}
    assert len(array) == 1  # one job array...
    assert sorted(r["job_id"].split("_")[1] for r in runs) == ["0", "1"]  # ...one task per run
    for run in runs:
        run_dir = Path(run["run_dir"])
        assert run["status"] == "finished", (run, proc.stdout[-3000:])
        assert (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()
        logs = list((run_dir / "logs").glob("job-*.log"))  # pretrain.slurm's log of the run
        assert len(logs) == 1 and "srun exited with 0" in logs[0].read_text()
        status = (study / "tasks" / f"{run['index']}.status").read_text()
        assert f"array={run['job_id']}" in status and "exit=0" in status
