"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (logging.trackers).

Each tracker is a Fabric logger fed on one background thread (a failing tracker warns once and
never stops training); a resume continues the same tracker run without logging a step twice;
servers and credentials come only from the environment. docs/tracking.md has the details.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import Logger
from lightning_fabric.utilities.rank_zero import rank_zero_only

from orchestrator.schema import ConfigError, to_dict

TRACKERS = ("tensorboard", "wandb", "mlflow")
EXTERNAL = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module it needs (and extra name)
QUEUE_SIZE = 10_000  # calls waiting for the background thread (one per log_dict call)
RETRY_AFTER_S = 60.0  # after a failed call, drop what comes for this long before trying again
FINISH_TIMEOUT_S = 30.0  # the most the end of a run waits for queued calls
MLFLOW_PARAM_VALUE_MAX = 6000  # MLflow's limit on a parameter's value


def check_trackers(cfg) -> None:
    """Before anything starts: every tracker of logging.trackers has its package installed."""
    for name in cfg.logging.trackers:
        module = EXTERNAL.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.trackers includes {name!r} but the {module} package is not installed: "
                f"pip install 'orchestrator[{name}]' (or remove {name!r} from logging.trackers)"
            )


def make_trackers(cfg, resume_step: int | None) -> list[Tracker]:
    """The wandb / mlflow trackers of logging.trackers; `resume_step` None starts new runs."""
    kinds = {"wandb": WandbTracker, "mlflow": MLflowTracker}
    return [kinds[n](cfg, fresh=resume_step is None) for n in cfg.logging.trackers if n in kinds]


def redact(text: str) -> str:
    """Credentials a URL may carry (scheme://user:password@host) out of a message."""
    return re.sub(r"://[^/\s@]+@", "://***@", text)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker(Logger):
    """A Fabric logger whose client calls run on a background thread (rank 0 only)."""

    kind = ""  # "wandb" / "mlflow"

    def __init__(self, cfg, fresh: bool) -> None:
        self.cfg = cfg
        self.fresh = fresh
        self.run_dir = Path(cfg.run.dir)
        self.state_path = self.run_dir / "trackers" / f"{self.kind}.json"
        self.project = cfg.logging.tracker_project
        self.run_name = cfg.logging.tracker_run_name or self.run_dir.resolve().name
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()  # bounded by hand: finish always gets in
        self._thread: threading.Thread | None = None
        self._finished = False
        self._started = False  # the client's run exists (background thread only)
        self._failing_until = 0.0
        self._warned = False  # one warning per tracker and run, whatever goes wrong after it
        self._sent: dict[str, int] = {}  # key -> last step handed over (main thread)
        self._done: dict[str, int] = {}  # key -> last step processed (background thread)

    # -- Fabric's Logger interface ---------------------------------------------------------
    @property
    def name(self) -> str:
        return self.kind

    @property
    def version(self) -> str | None:
        return self.run_id

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = 0 if step is None else int(step)
        new = {k: float(v) for k, v in metrics.items() if self._is_new(k, step)}
        if new:
            self._submit("metrics", (new, step), dict.fromkeys(new, step))

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self._submit("params", (dict(params),))

    @rank_zero_only
    def log_text(self, tag: str, text: str, step: int) -> None:
        """Text (the resolved config at every (re)start): where the tracker keeps text."""
        if self._is_new(f"text:{tag}", step):
            self._submit("text", (tag, text, step), {f"text:{tag}": step})

    @rank_zero_only
    def log_samples(self, step: int, prompts: list[str], texts: list[str]) -> None:
        if self._is_new("text:samples", step):
            self._submit("samples", (step, list(prompts), list(texts)), {"text:samples": step})

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._thread is None or self._finished:
            return
        self._finished = True
        self._queue.put(("finish", (status,), None))
        failing = time.monotonic() < self._failing_until
        # A tracker that is failing gets no wait: its calls would only time out.
        self._thread.join(timeout=0.0 if failing else FINISH_TIMEOUT_S)
        if self._thread.is_alive() and not failing:  # (a failing one has warned already)
            self._warn(
                f"still sending after {FINISH_TIMEOUT_S:.0f}s at the end of the run; "
                f"{self._queue.qsize()} queued call(s) not sent",
            )

    # -- the main thread's side ------------------------------------------------------------
    def _is_new(self, key: str, step: int) -> bool:
        self._load()
        if step <= self._sent.get(key, -1):
            return False
        self._sent[key] = step
        return True

    def _load(self) -> None:
        if self._thread is not None:
            return
        state = {}
        if not self.fresh and self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, ValueError):
                state = {}
        self.run_id = state.get("run_id")
        self._sent = dict(state.get("steps", {}))
        self._done = dict(self._sent)
        self._thread = threading.Thread(target=self._work, name=f"{self.kind}-tracker", daemon=True)
        self._thread.start()

    def _submit(self, kind: str, args: tuple, marks: dict[str, int] | None = None) -> None:
        """Queue a call; `marks` (key -> step) is recorded in the state file once it is done."""
        self._load()
        if self._finished:
            return
        if self._queue.qsize() >= QUEUE_SIZE:
            self._warn("falling behind training; dropping logging calls")
            return
        self._queue.put((kind, args, marks))

    def _warn(self, message: str) -> None:
        if self._warned:
            return
        self._warned = True
        print(
            f"warning: {self.kind} tracker: {redact(message)}; training goes on "
            "(metrics.jsonl and TensorBoard have every value)",
            file=sys.stderr,
            flush=True,
        )

    # -- the background thread -------------------------------------------------------------
    def _work(self) -> None:
        while True:
            kind, args, marks = self._queue.get()
            if kind == "finish":
                if self._started and time.monotonic() >= self._failing_until:
                    try:
                        self._finish(*args)
                    except Exception as e:  # a tracker never ends the run
                        self._warn(f"finishing failed ({type(e).__name__}: {e})")
                return
            if time.monotonic() < self._failing_until:
                continue  # dropped: a failing tracker is left alone for RETRY_AFTER_S
            try:
                if not self._started:
                    self.run_id = self._start()
                    self._started = True
                    self._save()
                getattr(self, f"_{kind}")(*args)
                if marks:
                    self._done.update(marks)
                    self._save()
            except Exception as e:  # a tracker never ends the run
                self._failing_until = time.monotonic() + RETRY_AFTER_S
                self._warn(f"{kind} call failed ({type(e).__name__}: {e})")

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "steps": self._done}, indent=1))
        tmp.replace(self.state_path)

    # What each tracker implements (background thread only).
    def _start(self) -> str:
        raise NotImplementedError

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError

    def _samples(self, step: int, prompts: list[str], texts: list[str]) -> None:
        raise NotImplementedError

    def _finish(self, status: str) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """Weights & Biases: scalars against a `step` metric (not W&B's own, which must only grow:
    a key new after a rollback would be refused), the resolved config as the run's config,
    samples as a table. WANDB_MODE=offline keeps the run under <run.dir>/wandb."""

    kind = "wandb"

    def _start(self) -> str:
        import wandb

        run_id = self.run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=self.project or os.environ.get("WANDB_PROJECT") or "orchestrator",
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=to_dict(self.cfg),
            allow_val_change=True,  # a resume may change the config (train.max_steps)
            reinit="create_new",
            # The trainer's stdout stays its own; no git or requirements scan at start.
            settings=wandb.Settings(console="off", disable_git=True, x_save_requirements=False),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        return self.run.id

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def _params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _text(self, tag: str, text: str, step: int) -> None:
        if tag != "config":  # the config is the run's config already
            self.run.log({tag: self._table([[step, text]], ["step", "text"]), "step": step})

    def _samples(self, step: int, prompts: list[str], texts: list[str]) -> None:
        rows = [[step, p, t] for p, t in zip(prompts, texts, strict=True)]
        self.run.log({"samples": self._table(rows, ["step", "prompt", "text"]), "step": step})

    @staticmethod
    def _table(rows: list[list[Any]], columns: list[str]):
        import wandb

        return wandb.Table(columns=columns, data=rows)

    def _finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "success" else 1)


class MLflowTracker(Tracker):
    """MLflow (MlflowClient against MLFLOW_TRACKING_URI): scalars as metrics, the resolved config
    as parameters (dotted keys) and as the artifact config/step_<N>.txt of every (re)start,
    samples as text artifacts samples/step_<N>.txt."""

    kind = "mlflow"

    def _start(self) -> str:
        # MLflow retries a failing request for minutes by default; fail fast (the tracker backs
        # off on its own). An explicit setting in the environment wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient()
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
            except MlflowException:
                pass  # gone from the server (or another server): a new run
        name = self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "orchestrator"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # created meanwhile by another run
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        return self.client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # A parameter cannot change once logged: a resumed run adds only the new keys (its
        # config/step_<N>.txt artifact has the config of every start).
        present = self.client.get_run(self.run_id).data.params
        new = [
            Param(k, str(v)[:MLFLOW_PARAM_VALUE_MAX])
            for k, v in flatten(params).items()
            if k not in present
        ]
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def _text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:06d}.txt")

    def _samples(self, step: int, prompts: list[str], texts: list[str]) -> None:
        self._text("samples", "\n\n".join(texts), step)

    def _finish(self, status: str) -> None:
        self.client.set_terminated(
            self.run_id, status="FINISHED" if status == "success" else "FAILED"
        )
