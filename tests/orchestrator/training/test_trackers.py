"""logging.trackers: W&B (offline mode, its run files read back) and MLflow (a real `mlflow server`
on loopback, SQLite backend, read back through MlflowClient) get the scalars of TensorBoard with
metrics.jsonl's values; a resume continues the same tracker run without logging a step twice;
a tracker server that dies mid-run does not stop training.

The runs are in-process, one device, 4-6 steps of the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.trackers import check_trackers, redact
from tests.training import TINY, data_args

SECRET = "s3cr3t-credential-5150"


def run_args(sample_data, run_dir: Path, max_steps: int, *trackers: str) -> list[str]:
    return [
        *TINY, *data_args(sample_data), "--run.dir", str(run_dir),
        "--strategy.name", "single", "--strategy.devices", "1", "--train.global_batch_size", "4",
        "--train.max_steps", str(max_steps), "--checkpoint.interval", "2", "--eval.interval", "2",
        "--logging.sample_interval", "2", "--logging.sample_tokens", "4",
        "--logging.trackers", json.dumps(["tensorboard", *trackers]),
    ]  # fmt: skip


def train(argv: list[str]) -> None:
    from orchestrator.train import main as train_main

    assert train_main(argv) == 0


def killed_after_step_4(run_dir: Path) -> None:
    """What a run killed after logging step 4 but before its checkpoint leaves behind: the next
    start resumes at step 2 and trains steps 3 and 4 again."""
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def files_containing(root: Path, needle: str) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()
    ]  # fmt: skip


def test_tracker_names_and_packages_are_checked_before_launch(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.trackers\[1\]='neptune' is not one of"):
        load_config(["--logging.trackers", '["tensorboard", "neptune"]'])
    with pytest.raises(ConfigError, match="logging.trackers lists a tracker twice"):
        load_config(["--logging.trackers", '["mlflow", "mlflow"]'])
    cfg = load_config(["--logging.trackers", '["wandb"]', "--run.dir", str(tmp_path)])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'orchestrator\[wandb\]'"):
        check_trackers(cfg)
    assert redact("http://user:pw@host:5000/api") == "http://***@host:5000/api"


# --- W&B -------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb), decoded with W&B's own protobuf schema.

    wandb 0.31 ships no Python reader of these files (wandb.sdk.internal.datastore is gone), so
    this reads the framing W&B writes (LevelDB's log format behind a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a 32 KiB block's header
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block's end
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST, MIDDLE / LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 20.0) -> list:
    """A run file's records once its exit record is in (W&B's service may still be writing
    when run.finish() returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.2)


def wandb_run(run_dir: Path) -> tuple[set[str], list[dict], dict]:
    """Run ids, history rows and the last config of every offline run file, oldest first."""
    ids, rows, config = set(), [], {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return ids, rows, config


@pytest.mark.slow
def test_wandb_offline_gets_tensorboards_scalars_and_resumes_the_same_run(
    sample_data, tmp_path, monkeypatch, capfd
):
    pytest.importorskip("wandb", reason="wandb not installed (`make setup`)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(run_args(sample_data, run_dir, 4, "wandb"))
    killed_after_step_4(run_dir)
    train(run_args(sample_data, run_dir, 6, "wandb"))

    ids, rows, config = wandb_run(run_dir)
    state = json.loads((run_dir / "trackers" / "wandb.json").read_text())
    assert ids == {state["run_id"]}  # the resumed start continued the same run
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in losses] == [2, 4, 6]  # steps 3-4 trained twice, logged once
    expected = jsonl_losses(run_dir)
    assert all(v == pytest.approx(expected[s], rel=1e-5) for s, v in losses)
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 2, 4, 6]  # eval.at_start
    scalars = {k for r in rows for k in r if "/" in k and not k.startswith(("_", "samples/"))}
    assert scalars == tensorboard_tags(run_dir)
    assert config["train"]["max_steps"] == 6  # the resolved config, as resumed
    tables = [r for r in rows if r.get("samples/_type") == "table-file"]
    assert [r["step"] for r in tables] == [2, 4, 6]
    table = json.loads(
        next(run_dir.glob(f"wandb/*/files/{tables[-1]['samples/path']}")).read_text()
    )
    assert table["columns"] == ["step", "prompt", "text"]
    assert [row[1] for row in table["data"]] == [
        "The capital of",
        "Once upon a time",
        "def add(a, b):",
    ]
    out = capfd.readouterr()
    assert "warning: wandb tracker" not in out.err
    assert SECRET not in out.out + out.err and files_containing(run_dir, SECRET) == []


# --- MLflow ----------------------------------------------------------------------------------


class MLflowServer:
    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")  # noqa: SIM115 (closed in stop)
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"mlflow server did not start: {Path(self.log.name).read_text()[-3000:]}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_starting(tmp_path_factory):
    """The server starts with the module (its start overlaps the tests before it) ..."""
    if shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None:
        yield None
        return
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _start_mlflow_early(request):
    if request.node.get_closest_marker("slow"):
        request.getfixturevalue("mlflow_starting")


@pytest.fixture
def mlflow_server(mlflow_starting, monkeypatch):
    """... and is waited for by the tests that use it, pointed at by their environment."""
    pytest.importorskip("mlflow", reason="mlflow not installed (`make setup`)")
    if mlflow_starting is None:
        pytest.skip("no `mlflow` command (mlflow's server package) in this environment")
    mlflow_starting.wait()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_starting.url)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)  # ignored by a server without auth
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    return mlflow_starting


@pytest.mark.slow
def test_mlflow_server_gets_tensorboards_scalars_and_resumes_the_same_run(
    sample_data, tmp_path, mlflow_server, capfd
):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    train(run_args(sample_data, run_dir, 4, "mlflow") + ["--logging.tracker_project", "resume"])
    killed_after_step_4(run_dir)
    train(run_args(sample_data, run_dir, 6, "mlflow") + ["--logging.tracker_project", "resume"])

    client = MlflowClient(mlflow_server.url)
    run_id = json.loads((run_dir / "trackers" / "mlflow.json").read_text())["run_id"]
    experiment = client.get_experiment_by_name("resume")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert set(run.data.metrics) == tensorboard_tags(run_dir)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6]  # steps 3-4 trained twice, logged once
    expected = jsonl_losses(run_dir)
    assert all(m.value == pytest.approx(expected[m.step], rel=1e-5) for m in history)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [0, 2, 4, 6]
    # The resolved config: parameters of the first start, and the config of every start.
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.d_model"] == "64"
    artifacts = {a.path for d in ("config", "samples") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {
        "config/step_000000.txt", "config/step_000002.txt",
        "samples/step_000002.txt", "samples/step_000004.txt", "samples/step_000006.txt",
    }  # fmt: skip
    resumed = Path(client.download_artifacts(run_id, "config/step_000002.txt", str(tmp_path)))
    assert "max_steps: 6" in resumed.read_text()
    samples = Path(client.download_artifacts(run_id, "samples/step_000006.txt", str(tmp_path)))
    assert "Once upon a time" in samples.read_text()
    out = capfd.readouterr()
    assert "warning: mlflow tracker" not in out.err
    assert SECRET not in out.out + out.err and files_containing(run_dir, SECRET) == []


@pytest.mark.slow
def test_training_goes_on_when_the_mlflow_server_dies(
    sample_data, tmp_path, mlflow_server, monkeypatch, capfd
):
    """Runs last in this module: it stops the module's server at the first checkpoint."""
    from orchestrator.training.monitor import Monitor

    checkpoint = Monitor.checkpoint

    def checkpoint_then_stop_the_server(self, report):
        checkpoint(self, report)
        state = run_dir / "trackers" / "mlflow.json"
        deadline = time.monotonic() + 60
        while not state.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)  # the tracker's run exists: the server dies under a running tracker
        mlflow_server.stop()

    monkeypatch.setattr(Monitor, "checkpoint", checkpoint_then_stop_the_server)
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    train(run_args(sample_data, run_dir, 4, "mlflow"))
    took = time.perf_counter() - started
    assert sorted(jsonl_losses(run_dir)) == [1, 2, 3, 4]
    err = capfd.readouterr().err
    assert err.count("warning: mlflow tracker") == 1, err[-3000:]
    assert SECRET not in err
    assert took < 60, took  # no wait on the dead server (MLflow alone would retry for minutes)
    run_id = json.loads((run_dir / "trackers" / "mlflow.json").read_text())["run_id"]
    assert run_id  # the run was created before the server went away
