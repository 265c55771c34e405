"""Copies of the run's checkpoints in an object store (`checkpoint.remote_dir`), so that a run
survives the loss of its run dir (a node's local disk, a cluster's scratch filesystem).

    <remote_dir>/step-00000100/state, config.yaml, ...   the files of the local checkpoint
    <remote_dir>/step-00000100/manifest.json             uploaded last, deleted first

As on disk, a remote checkpoint is complete only with its manifest: an interrupted upload or
deletion leaves a prefix without one, which is never used and is deleted once a newer complete
checkpoint exists. Uploads run on global rank 0 in one background thread, in publishing order;
a failure is a warning and is retried at the next save, never an end of training. Resuming
(`checkpoint.resume=auto`) downloads the newest complete remote checkpoint newer than the run
dir's into `step-N.partial/`, verifies it against its manifest (SHA-256) and publishes it with the
same rename as a local save. Rank 0 alone does this: the run dir is shared by every node (like the
checkpoints every rank writes into and loads from), and the path it chose is broadcast.
"""

from __future__ import annotations

import atexit
import json
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from data.storage import ObjectStore, StorageError
from orchestrator.checkpoint.files import fsync_dir, fsync_file
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    MANIFEST_NAME,
    STEP_DIR,
    CheckpointError,
    checkpoint_step,
    dir_size,
    partial_dir,
    retention_victims,
)
from orchestrator.checkpoint.manifest import verify
from orchestrator.config import Config


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _safe_name(name: str) -> str:
    """A manifest entry as a relative key: a manifest from the store must not write elsewhere."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts:
        raise ValueError(f"the manifest lists an unsafe file name {name!r}")
    return path.as_posix()


class RemoteCheckpoints:
    """The checkpoints under one object-store prefix: listing, upload, retention, download."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @classmethod
    def from_config(cls, cfg: Config) -> RemoteCheckpoints | None:
        url = cfg.checkpoint.remote_dir
        return cls(ObjectStore(url, cfg.storage.options())) if url else None

    @property
    def url(self) -> str:
        return self.store.url

    def url_of(self, name: str) -> str:
        return self.store.url_of(name)

    def scan(self) -> tuple[list[str], list[str]]:
        """The complete checkpoints (with a manifest) and the incomplete prefixes, oldest first."""
        keys: dict[str, set[str]] = {}
        for key in self.store.list():
            name, _, rest = key.partition("/")
            if STEP_DIR.match(name) and rest:
                keys.setdefault(name, set()).add(rest)
        names = sorted(keys)
        return (
            [n for n in names if MANIFEST_NAME in keys[n]],
            [n for n in names if MANIFEST_NAME not in keys[n]],
        )

    def complete(self) -> list[str]:
        return self.scan()[0]

    def has_copy(self, ckpt: Path) -> bool:
        """The store holds `ckpt` complete with the same manifest (it was uploaded already)."""
        try:
            remote = self.store.read_bytes(f"{ckpt.name}/{MANIFEST_NAME}")
        except FileNotFoundError:
            return False
        return remote == (ckpt / MANIFEST_NAME).read_bytes()

    def upload(self, ckpt: Path) -> int:
        """Copy the published checkpoint `ckpt`: the files its manifest lists, then the manifest.
        Returns the bytes sent."""
        manifest = (ckpt / MANIFEST_NAME).read_bytes()  # what is uploaded is what it describes
        files = json.loads(manifest)["files"]
        name = ckpt.name
        if self.store.list(name):  # an older copy of this step (a run resumed from before it)
            self.store.delete(f"{name}/{MANIFEST_NAME}")  # incomplete from now on
            self.store.delete_tree(name)
        sent = 0
        for rel in sorted(files):
            self.store.upload(ckpt / rel, f"{name}/{_safe_name(rel)}")
            sent += int(files[rel]["size"])
        self.store.put_bytes(f"{name}/{MANIFEST_NAME}", manifest)
        return sent + len(manifest)

    def prune(self, keep_last: int, keep_every: int = 0, protect: str | None = None) -> list[str]:
        """The local retention rule on the complete remote checkpoints (manifest deleted first,
        so that an interrupted deletion leaves an incomplete prefix), and the incomplete prefixes
        older than the newest complete one (leftovers of interrupted uploads or deletions)."""
        complete, incomplete = self.scan()
        removed = []
        for name in retention_victims(complete, keep_last, keep_every, protect):
            self.store.delete(f"{name}/{MANIFEST_NAME}")
            self.store.delete_tree(name)
            removed.append(name)
        for name in incomplete:
            if complete and name < complete[-1]:
                self.store.delete_tree(name)
                removed.append(name)
        return sorted(removed)

    def saved_config(self, name: str) -> dict[str, Any]:
        """The config saved with remote checkpoint `name` ({} when it has none)."""
        try:
            return yaml.safe_load(self.store.read_text(f"{name}/{CONFIG_NAME}")) or {}
        except FileNotFoundError:
            return {}

    def download(self, name: str, root: Path) -> tuple[Path | None, str | None]:
        """Bring the remote checkpoint `name` into `root/name.partial`, verify every file against
        the manifest (sizes and SHA-256), and publish it as `root/name` with an atomic rename.
        Returns the published path, or None and the reason it cannot be used."""
        final = root / name
        partial = partial_dir(final)
        shutil.rmtree(partial, ignore_errors=True)
        reason = None
        try:
            manifest = self.store.read_bytes(f"{name}/{MANIFEST_NAME}")
            files = json.loads(manifest)["files"]
            partial.mkdir(parents=True)
            for rel in sorted(files):
                local = partial / _safe_name(rel)
                self.store.download(f"{name}/{rel}", local)
                fsync_file(local)
            (partial / MANIFEST_NAME).write_bytes(manifest)
        except FileNotFoundError as e:
            reason = f"missing file ({e})"
        except (StorageError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
        reason = reason or verify(partial, checksums=True)
        if reason is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return None, reason
        fsync_file(partial / MANIFEST_NAME)
        fsync_dir(partial)
        if final.exists():  # a damaged local copy of the same step
            shutil.rmtree(final)
        partial.rename(final)
        fsync_dir(root)
        return final, None


# -- uploads in the background (global rank 0) ------------------------------------------------


ALREADY_THERE = "already in the store"


@dataclass
class UploadReport:
    path: Path  # the local checkpoint
    step: int
    url: str
    seconds: float = 0.0
    size_bytes: int = 0
    error: str | None = None  # the upload failed (retried at the next save)
    skipped: str | None = None  # why nothing was sent
    removed: list[str] = field(default_factory=list)  # remote checkpoints deleted by retention
    retention_error: str | None = None


class Uploader:
    """One worker thread copying published checkpoints to the store in the order they were
    submitted, then applying retention there. Never raises into training: each outcome is an
    UploadReport for the training thread to log (`drain`), and a failed checkpoint is queued
    again at the next `submit` (the next save)."""

    def __init__(self, remote: RemoteCheckpoints, keep_last: int, keep_every: int = 0) -> None:
        self.remote = remote
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._reports: list[UploadReport] = []  # finished, not yet drained
        self._failed: dict[str, Path] = {}  # to retry at the next submit
        self._outcome: dict[str, UploadReport] = {}  # the last report of each checkpoint
        self._newest: Path | None = None  # the newest checkpoint submitted
        self._atexit = False

    def submit(self, ckpt: Path) -> None:
        """Queue `ckpt` (after the earlier failed ones, retried first); returns at once."""
        with self._lock:
            retries = sorted(p for name, p in self._failed.items() if name != ckpt.name)
            self._failed.clear()
            if self._newest is None or ckpt.name >= self._newest.name:
                self._newest = ckpt
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="checkpoint-upload", daemon=True
                )
                self._thread.start()
                if not self._atexit:  # a normal exit waits for the queue (daemon: never hangs)
                    atexit.register(self.close)
                    self._atexit = True
        for path in [*retries, ckpt]:
            self._queue.put(path)

    def _work(self) -> None:
        while True:
            ckpt = self._queue.get()
            try:
                if ckpt is None:
                    return
                try:
                    report = self._upload(ckpt)
                except Exception as e:  # noqa: BLE001 - the thread must outlive any one upload
                    report = UploadReport(ckpt, -1, self.remote.url_of(ckpt.name), error=repr(e))
                with self._lock:
                    self._reports.append(report)
                    self._outcome[ckpt.name] = report
                    if report.error is not None:
                        self._failed[ckpt.name] = ckpt
            finally:
                self._queue.task_done()

    def _upload(self, ckpt: Path) -> UploadReport:
        report = UploadReport(ckpt, checkpoint_step(ckpt), self.remote.url_of(ckpt.name))
        started = time.perf_counter()
        try:
            if not (ckpt / MANIFEST_NAME).is_file():
                report.skipped = "deleted locally (retention) before its upload"
                return report
            if self.remote.has_copy(ckpt):
                report.skipped = ALREADY_THERE
            else:
                report.size_bytes = self.remote.upload(ckpt)
                report.seconds = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - a failed upload must not end training
            if not (ckpt / MANIFEST_NAME).is_file():  # pruned locally while it was being sent
                report.skipped = "deleted locally (retention) during its upload"
            else:
                report.error = (
                    f"{type(e).__name__}: {e}" if not isinstance(e, StorageError) else str(e)
                )
            return report
        try:
            report.removed = self.remote.prune(self.keep_last, self.keep_every, protect=ckpt.name)
        except Exception as e:  # noqa: BLE001
            report.retention_error = str(e)
        return report

    def drain(self) -> list[UploadReport]:
        """The reports finished since the last call."""
        with self._lock:
            reports, self._reports = self._reports, []
        return reports

    def finish(self) -> list[UploadReport]:
        """Wait until every queued upload is done; the reports not drained yet."""
        if self._thread is not None:
            self._queue.join()
        return self.drain()

    def newest_missing(self) -> None:
        """After `finish`: say loudly when the run's newest checkpoint is not in the store."""
        newest = self._newest
        outcome = None if newest is None else self._outcome.get(newest.name)
        if newest is None or outcome is None or outcome.error is None:
            return
        complete = _try(self.remote.complete)  # None: the store cannot even list
        there = ""
        if complete is not None:
            newest_there = complete[-1] if complete else "none"
            there = f"; the newest complete one in {self.remote.url} is {newest_there}"
        print(
            f"error: the run's newest checkpoint {newest.name} was NOT copied to {outcome.url}: "
            f"{outcome.error}\n"
            f"error: it exists only in {newest}{there}. Run the same command again once the "
            "store is reachable (a run resuming from a checkpoint the store lacks uploads it "
            "first), or copy it yourself (every file, manifest.json last).",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        """Finish the queue and stop the thread (also at interpreter exit)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(None)
        thread.join()
        self._thread = None
        for report in self.drain():
            if report.error is not None:
                _warn(f"checkpoint {report.path} was not uploaded to {report.url}: {report.error}")


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - only to enrich an error message
        return None


def record_uploads(monitor: Any, reports: list[UploadReport]) -> None:
    """Print and log finished uploads like local saves: a line per upload in metrics.jsonl and
    TensorBoard's checkpoint/upload_* (rank 0 has the reports; `monitor` is the run's Monitor)."""
    for r in reports:
        if r.skipped == ALREADY_THERE:
            continue
        if r.skipped is not None:
            print(f"Not uploading checkpoint {r.path}: {r.skipped}", flush=True)
            continue
        if r.error is not None:
            _warn(
                f"uploading checkpoint {r.path} to {r.url} failed: {r.error.rstrip('.')}. "
                "Training goes on; the upload is retried at the next save"
            )
            monitor.record({"step": r.step, "remote_checkpoint": r.url, "upload_error": r.error})
            continue
        values = {
            "checkpoint/upload_seconds": r.seconds,
            "checkpoint/upload_mb": r.size_bytes / 2**20,
        }
        removed = f"; removed {', '.join(r.removed)} there" if r.removed else ""
        print(
            f"Uploaded checkpoint {r.path.name} to {r.url} ({r.size_bytes / 2**20:,.1f} MB in "
            f"{r.seconds:.2f}s{removed})",
            flush=True,
        )
        if r.retention_error is not None:
            _warn(f"retention in {r.url.rsplit('/', 1)[0]} failed: {r.retention_error}")
        monitor.fabric.log_dict(values, step=r.step)
        monitor.record(
            {
                "step": r.step,
                "remote_checkpoint": r.url,
                "upload_seconds": r.seconds,
                "upload_bytes": r.size_bytes,
                **({"remote_removed": r.removed} if r.removed else {}),
            }
        )


# -- resuming from the store (global rank 0, before the choice is broadcast) --------------------


def fetch_newer(
    cfg: Config,
    root: Path,
    local: Path | None,
    model_mismatch: Callable[[dict[str, Any]], str | None] | None = None,
) -> Path | None:
    """The newest complete remote checkpoint newer than `local` (the run dir's newest good one),
    downloaded, verified and published under `root`; None when there is none or none is good
    (each damaged one is passed over with a warning naming it). `model_mismatch(saved_config)`
    says how a checkpoint's model differs from this run's (checked before downloading it)."""
    remote = RemoteCheckpoints.from_config(cfg)
    if remote is None:
        return None
    try:
        complete = remote.complete()
    except StorageError as e:
        if local is not None:
            _warn(f"{e}; resuming from the local {local} without looking for newer remote ones")
            return None
        raise CheckpointError(
            f"{e}. checkpoint.remote_dir may hold this run's checkpoints, so the run does not "
            "start from scratch: fix the store (storage.endpoint_url / AWS_ENDPOINT_URL, "
            "credentials), or pass --checkpoint.remote_dir null to start without it"
        ) from e
    local_step = -1 if local is None else checkpoint_step(local)
    newer = [name for name in complete if checkpoint_step(Path(name)) > local_step]
    for name in reversed(newer):
        url = remote.url_of(name)
        if model_mismatch is not None:
            saved = _try(lambda: remote.saved_config(name)) or {}  # noqa: B023 - called at once
            differs = model_mismatch(saved)
            if differs:
                raise CheckpointError(
                    f"remote checkpoint {url} was trained with a different model ({differs}): "
                    "use the same model settings, another checkpoint.remote_dir, or "
                    "--checkpoint.resume never"
                )
        print(f"Downloading checkpoint {url} (newer than the run dir's) into {root}", flush=True)
        started = time.perf_counter()
        path, reason = remote.download(name, root)
        if path is not None:
            print(
                f"Downloaded {url} ({dir_size(path) / 2**20:,.1f} MB in "
                f"{time.perf_counter() - started:.2f}s, verified against its manifest)",
                flush=True,
            )
            return path
        _warn(f"skipping damaged remote checkpoint {url}: {reason}; trying an older one")
    if newer:
        _warn(
            f"no remote checkpoint in {remote.url} newer than the run dir's could be used; "
            + (f"resuming from the local {local}" if local is not None else "starting from scratch")
        )
    return None
