"""Copies of the run's checkpoints in an object store (`checkpoint.remote_dir`), so that a run
survives the loss of its run dir.

Uploads on global rank 0 in one background thread, manifest last; resume downloads the newest
complete remote checkpoint; a damaged one is passed over, a failing store is retried for
checkpoint.remote_retry_s and then stops the run (StoreUnavailableError). The rules:
docs/checkpoints.md, "Checkpoints in object storage".
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
from orchestrator.checkpoint.files import fsync_dir, fsync_file, unsafe_reason
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

# Exit codes of `orchestrator train` for the object store (docs/checkpoints.md).
EXIT_UPLOAD_FAILED = 74  # the run finished, but its newest checkpoint is not in the store
EXIT_STORE_UNAVAILABLE = 75  # the store failed at the start; nothing was started or changed

# Failures of the store that may pass: throttling and server errors (by code or HTTP status),
# and the connection errors and timeouts of botocore, s3transfer and urllib3 (by class name).
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
}
_TRANSIENT_ERRORS = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProxyConnectionError",
    "ProtocolError",
    "IncompleteRead",
}


class StoreUnavailableError(CheckpointError):
    """checkpoint.remote_dir failed while a run chose its checkpoint (not a damaged checkpoint):
    the run stops with `exit_code`, the store and the run dir untouched."""

    exit_code = EXIT_STORE_UNAVAILABLE


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_transient(error: BaseException) -> bool:
    """Whether a store operation's failure may pass when retried (a StorageError's cause: 5xx,
    throttling, a timeout, a dropped connection), unlike refused credentials or a missing bucket."""
    seen: BaseException | None = error
    for _ in range(8):  # the chain: StorageError <- botocore / s3transfer <- urllib3
        if seen is None:
            return False
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(response.get("Error", {}).get("Code", ""))
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
        if isinstance(seen, (ConnectionError, TimeoutError)) or (
            type(seen).__name__ in _TRANSIENT_ERRORS
        ):
            return True
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    return False


def _safe_name(name: str) -> str:
    """A manifest entry as a relative key: a manifest from the store must not write elsewhere."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts:
        raise ValueError(f"the manifest lists an unsafe file name {name!r}")
    return path.as_posix()


class RemoteCheckpoints:
    """The checkpoints under one object-store prefix: listing, upload, retention, download.
    `retry_s`: how long reads at resume retry a transiently failing store (checkpoint.remote_retry_s);
    `upload_warn_s`: how long an upload may wait for an answer before a warning."""

    def __init__(self, store: ObjectStore, retry_s: float = 120.0, upload_warn_s: float = 60.0):
        self.store = store
        self.retry_s = retry_s
        self.upload_warn_s = upload_warn_s

    @classmethod
    def from_config(cls, cfg: Config) -> RemoteCheckpoints | None:
        url = cfg.checkpoint.remote_dir
        if not url:
            return None
        c = cfg.checkpoint
        return cls(ObjectStore(url, cfg.storage.options()), c.remote_retry_s, c.upload_warn_s)

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

    def retrying(self, fn: Callable[[], Any]) -> Any:
        """`fn()` (a read from the store), retried with exponential backoff for `retry_s` while the
        store fails transiently. A failure that persists, or one that retrying cannot fix (refused
        credentials, a missing bucket), is a StoreUnavailableError naming the URL and what to do;
        FileNotFoundError (no such object) passes through."""
        started = time.monotonic()
        delay = min(1.0, max(self.retry_s, 0.01) / 8)
        attempt = 1
        while True:
            try:
                return fn()
            except StorageError as e:
                waited = time.monotonic() - started
                error = str(e).rstrip(".")
                if not is_transient(e):
                    cause, advice = error, "fix the store's settings or the credentials"
                elif waited + delay > self.retry_s:
                    cause = f"{error} (still failing after {attempt} attempts over {waited:.0f}s)"
                    advice = (
                        "rerun once the store answers again (checkpoint.remote_retry_s="
                        f"{self.retry_s:g} sets how long a start keeps retrying)"
                    )
                else:
                    _warn(f"{e}; retrying in {delay:.1f}s (attempt {attempt + 1})")
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    attempt += 1
                    continue
                raise StoreUnavailableError(
                    f"{cause}. This is a failure of the store, not a damaged "
                    "checkpoint: the run did not start and nothing was changed in the store or the "
                    f"run dir (exit code {EXIT_STORE_UNAVAILABLE}). To continue, {advice}; or pass "
                    "--checkpoint.remote_dir null to go on without the store (from the run dir's "
                    "own checkpoints, or from scratch without any)"
                ) from e

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
        the manifest (sizes and SHA-256) and the state against the trainer's safe load, and
        publish it as `root/name` with an atomic rename. Returns the published path, or None and
        the reason it cannot be used (damage); a failing store raises StoreUnavailableError
        (after `retrying`), with `root` as it was."""
        final = root / name
        partial = partial_dir(final)
        shutil.rmtree(partial, ignore_errors=True)
        reason = None
        try:
            manifest = self.retrying(lambda: self.store.read_bytes(f"{name}/{MANIFEST_NAME}"))
            files = json.loads(manifest)["files"]
            partial.mkdir(parents=True)
            for rel in sorted(files):
                local = partial / _safe_name(rel)
                self.retrying(lambda: self.store.download(f"{name}/{rel}", local))  # noqa: B023
                fsync_file(local)
            (partial / MANIFEST_NAME).write_bytes(manifest)
        except FileNotFoundError as e:
            reason = f"missing file ({e})"
        except StoreUnavailableError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
        reason = reason or verify(partial, checksums=True) or _load_refusal(partial)
        if reason is not None:
            reason = reason.replace(str(partial), self.url_of(name))  # it never got published
            shutil.rmtree(partial, ignore_errors=True)
            return None, reason
        fsync_file(partial / MANIFEST_NAME)
        fsync_dir(partial)
        if final.exists():  # a damaged local copy of the same step
            shutil.rmtree(final)
        partial.rename(final)
        fsync_dir(root)
        return final, None


UNSAFE = "unsafe: "  # how download's reason starts for a state the safe load refuses


def _load_refusal(ckpt: Path) -> str | None:
    """Why the trainer's safe load would refuse the (verified) checkpoint `ckpt`, or None."""
    try:
        unsafe = unsafe_reason(ckpt)
    except Exception as e:  # noqa: BLE001 - an unreadable state is damage like any other
        return f"its state cannot be read ({type(e).__name__}: {e})"
    return None if unsafe is None else UNSAFE + unsafe


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
    again at the next `submit` (the next save). The checkpoints queued, in flight or to be
    retried (`waiting`) are kept by local retention; an upload that has had no answer from the store for
    `remote.upload_warn_s` is a warning."""

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
        self._waiting: dict[str, int] = {}  # queued or in flight: how many times
        self._last_answer = 0.0  # time.monotonic() of the store's last response
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
                self._waiting[path.name] = self._waiting.get(path.name, 0) + 1
                self._queue.put(path)

    def waiting(self) -> set[str]:
        """The checkpoints queued, being uploaded, or failed and to be retried (names): local
        retention must keep them (during a long outage they accumulate on the local disk)."""
        with self._lock:
            return set(self._waiting) | set(self._failed)

    def _work(self) -> None:
        while True:
            ckpt = self._queue.get()
            try:
                if ckpt is None:
                    return
                done = threading.Event()
                try:
                    self._listen_for_answers()
                    threading.Thread(
                        target=self._watch, args=(ckpt, done), name="upload-watch", daemon=True
                    ).start()
                    report = self._upload(ckpt)
                except Exception as e:  # noqa: BLE001 - the thread must outlive any one upload
                    report = UploadReport(ckpt, -1, self.remote.url_of(ckpt.name), error=repr(e))
                finally:
                    done.set()
                with self._lock:
                    if self._waiting.get(ckpt.name, 0) > 1:
                        self._waiting[ckpt.name] -= 1
                    else:
                        self._waiting.pop(ckpt.name, None)
                    self._reports.append(report)
                    self._outcome[ckpt.name] = report
                    if report.error is not None:
                        self._failed[ckpt.name] = ckpt
            finally:
                self._queue.task_done()

    def _answered(self, response: Any = None, **_: Any) -> None:
        """botocore's needs-retry event, after every attempt of every request: a response (of
        any status) is an answer; a timeout or a dropped connection is not. Returns None (a
        value would be taken for a retry delay)."""
        if response is not None:
            self._last_answer = time.monotonic()

    def _listen_for_answers(self) -> None:
        """Count the store's answers from now on (in the worker thread: the client it uploads
        with, created here if need be)."""
        self._last_answer = time.monotonic()
        events = getattr(getattr(self.remote.store.client, "meta", None), "events", None)
        if events is not None:  # s3://: boto3's client (registered once: unique_id)
            events.register("needs-retry.s3", self._answered, unique_id="checkpoint-upload-watch")

    def _watch(self, ckpt: Path, done: threading.Event) -> None:
        """While `ckpt` is being uploaded: one warning once the store has not answered for
        upload_warn_s (a store that stops answering, rather than refusing, is otherwise silent
        until the client's read timeout)."""
        bound = self.remote.upload_warn_s
        if bound <= 0:
            return
        while not done.wait(min(bound / 4, 1.0)):
            quiet = time.monotonic() - self._last_answer
            if quiet >= bound:
                _warn(
                    f"uploading checkpoint {ckpt.name} to {self.remote.url_of(ckpt.name)}: no "
                    f"answer from the store for {quiet:.0f}s (checkpoint.upload_warn_s={bound:g}); "
                    "it may have stopped answering. Training goes on, and the upload keeps "
                    "waiting until the client's read timeout (then it is retried at the next save)"
                )
                return

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

    def newest_missing(self) -> bool:
        """After `finish`: say loudly when the run's newest checkpoint is not in the store, and
        whether it is not (the run then exits with EXIT_UPLOAD_FAILED)."""
        newest = self._newest
        outcome = None if newest is None else self._outcome.get(newest.name)
        if newest is None or outcome is None or outcome.error is None:
            return False
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
            "first), or copy it yourself (every file, manifest.json last). Exit code "
            f"{EXIT_UPLOAD_FAILED}.",
            file=sys.stderr,
            flush=True,
        )
        return True

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
    (each damaged or unsafe one is passed over with a warning naming it, never published).
    `model_mismatch(saved_config)` says how a checkpoint's model differs from this run's (checked
    before downloading it). A failing store raises StoreUnavailableError (RemoteCheckpoints.retrying),
    except for the listing of a run that has a local checkpoint to resume: a warning."""
    remote = RemoteCheckpoints.from_config(cfg)
    if remote is None:
        return None
    try:
        complete = remote.retrying(remote.complete)
    except StoreUnavailableError as e:
        if local is None:  # checkpoint.remote_dir may hold this run's checkpoints: no fresh start
            raise
        _warn(
            f"{e.__cause__}; resuming from the local {local} without looking for newer remote ones"
        )
        return None
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
        if reason.startswith(UNSAFE):
            _warn(
                f"skipping unsafe remote checkpoint {url} (refused before it was published in "
                f"the run dir): {reason.removeprefix(UNSAFE)}; trying an older one"
            )
        else:
            _warn(f"skipping damaged remote checkpoint {url}: {reason}; trying an older one")
    if newer:
        _warn(
            f"no remote checkpoint in {remote.url} newer than the run dir's could be used; "
            + (f"resuming from the local {local}" if local is not None else "starting from scratch")
        )
    return None
