"""Checkpoints that are either complete and verified, or never used.

Layout: <run.dir>/checkpoints/step-00000100/ holding `state` (a file, or a directory for
sharded strategies), `config.yaml` and `manifest.json`.

Writing: every rank writes into `step-00000100.partial/`; rank 0 then flushes every file to
disk, writes the manifest (each file's size and SHA-256, step, tokens seen, config hash)
last, and publishes the directory with an atomic rename. A crash at any moment leaves either
the previous checkpoints untouched plus a `.partial` directory (removed at the next start),
or a complete new checkpoint.

Reading: auto-resume takes the newest checkpoint whose manifest matches its files, falls back
to older ones when the newest is damaged, and says why. Loading never runs pickled code:
`torch.load(weights_only=True)` refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric import Fabric

from orchestrator.config import Config, save_config
from orchestrator.distributed import gather_object, on_rank_zero
from orchestrator.schema import to_dict

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


# ----------------------------------------------------------------------------- finding


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step-NNNNNNNN checkpoint directory")
    return int(match.group(1))


def is_published(path: Path) -> bool:
    """Renamed into place with a manifest (cheap; `verify` checks the contents)."""
    return (
        path.is_dir() and STEP_DIR.match(path.name) is not None and (path / MANIFEST_NAME).is_file()
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_published(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: Path) -> list[Path]:
    """Delete leftovers of interrupted saves; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------- manifest


def config_hash(cfg: Config) -> str:
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def _payload_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(
    ckpt_dir: Path, info: dict[str, Any], known: dict[str, str] | None = None
) -> dict[str, Any]:
    """Flush every file of `ckpt_dir` to disk, then write the manifest describing them (last).

    `known`: SHA-256 digests already computed while writing (relative path -> hex), not re-read.
    """
    known = known or {}
    files = {}
    for path in _payload_files(ckpt_dir):
        name = str(path.relative_to(ckpt_dir))
        if name not in known:
            _fsync_file(path)
        files[name] = {"size": path.stat().st_size, "sha256": known.get(name) or file_sha256(path)}
    manifest = {"version": MANIFEST_VERSION, **info, "files": files}
    tmp = ckpt_dir / (MANIFEST_NAME + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(ckpt_dir / MANIFEST_NAME)
    _fsync_dir(ckpt_dir)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST_NAME).read_text())


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if `path` is a complete checkpoint matching its manifest, else the reason it is not."""
    if not path.is_dir():
        return "not a directory"
    if not (path / MANIFEST_NAME).is_file():
        return "no manifest (the save was interrupted)"
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    if not any(name == STATE_NAME or name.startswith(STATE_NAME + "/") for name in files):
        return "manifest lists no state"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, manifest says {expected['size']} (truncated or overwritten)"
        if checksums and file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def choose_resume(cfg: Config) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from per checkpoint.resume, and the damaged ones passed over."""
    if cfg.checkpoint.resume == "never":
        return None, []
    if cfg.checkpoint.resume != "auto":
        path = Path(cfg.checkpoint.resume)
        reason = verify(path, checksums=cfg.checkpoint.verify_checksums)
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume={path} cannot be used: {reason}")
        return path, []
    skipped = []
    for path in reversed(list_checkpoints(checkpoint_root(cfg))):
        reason = verify(path, checksums=cfg.checkpoint.verify_checksums)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def resume_target(cfg: Config) -> Path | None:
    """Where a run would resume from without verifying contents (cheap; for pre-launch checks)."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(checkpoint_root(cfg))
    return Path(cfg.checkpoint.resume)


def resume_step_hint(cfg: Config) -> int | None:
    """The step a run will probably resume at (before verification), from the manifest."""
    path = resume_target(cfg)
    if path is None or not (path / MANIFEST_NAME).is_file():
        return None
    try:
        return int(read_manifest(path)["step"])
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        # As plain types: checkpoints load with torch.load(weights_only=True), which refuses ndarrays.
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- saving


@dataclass
class SaveReport:
    path: Path
    step: int
    stall_seconds: float  # training was blocked this long
    write_seconds: float | None = None  # total time to publish (None while an async save runs)
    size_bytes: int | None = None
    total_bytes: int | None = None  # all checkpoints of the run, after retention
    extra: dict[str, Any] = field(default_factory=dict)


class _HashingFile:
    """A write-only file that hashes what passes through it (saves re-reading a multi-GB file)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close_synced(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.digest.hexdigest()


def write_state_file(state: dict[str, Any], path: Path) -> str:
    """torch.save straight to disk (fsynced), returning the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = _HashingFile(path)
    try:
        torch.save(state, out)
    except BaseException:
        out.file.close()
        raise
    return out.close_synced()


def writes_single_file(fabric: Fabric) -> bool:
    """DDP and single-device runs hold the full state on rank 0, which writes one file; sharded
    strategies (DeepSpeed, FSDP) write one file per rank through Fabric."""
    from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    strategy = fabric.strategy
    return isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) and not isinstance(
        strategy, DeepSpeedStrategy
    )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _publish(
    cfg: Config,
    partial: Path,
    final: Path,
    info: dict[str, Any],
    known: dict[str, str] | None = None,
) -> None:
    """Rank 0: config, manifest (last), atomic rename, retention."""
    save_config(cfg, partial / "config.yaml")
    write_manifest(partial, info, known)
    if final.exists():  # the same step again (after resuming from an older checkpoint)
        shutil.rmtree(final)
    partial.rename(final)
    _fsync_dir(final.parent)
    prune(final.parent, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)


def _manifest_info(fabric: Fabric, cfg: Config, step: int, tokens_seen: int) -> dict[str, Any]:
    return {
        "step": step,
        "tokens_seen": tokens_seen,
        "config_hash": config_hash(cfg),
        "world_size": fabric.world_size,
        "strategy": cfg.strategy.name,
        "time": time.time(),
    }


def _agree_on_errors(fabric: Fabric, error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed, so none waits forever at the next collective."""
    errors = gather_object(fabric, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        details = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
        raise CheckpointError(f"{what} failed ({details})") from error


class Checkpointer:
    """Saves (synchronously, or in a background thread) and restores the training state."""

    def __init__(self, fabric: Fabric, cfg: Config) -> None:
        self.fabric = fabric
        self.cfg = cfg
        self.root = checkpoint_root(cfg)
        self._thread: threading.Thread | None = None
        self._async_error: BaseException | None = None
        self.completed: list[SaveReport] = []

    # -- save ------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], step: int, tokens_seen: int) -> SaveReport:
        """Write the checkpoint of `step` (collective: every rank calls it)."""
        self.wait()  # one save at a time; also surfaces an earlier async failure
        final = self.root / f"step-{step:08d}"
        partial = self.root / f"step-{step:08d}.partial"
        started = time.perf_counter()
        on_rank_zero(
            self.fabric,
            lambda: (self.root.mkdir(parents=True, exist_ok=True), shutil.rmtree(partial, True)),
        )
        self.fabric.barrier()
        # Every rank's RNG state, so each process continues its own random stream.
        full_state = dict(state, rng=gather_object(self.fabric, capture_rng()))
        info = _manifest_info(self.fabric, self.cfg, step, tokens_seen)
        if self.cfg.checkpoint.async_save:
            return self._save_async(full_state, partial, final, info, started)

        error, known = None, {}
        try:
            if writes_single_file(self.fabric):
                # Rank 0 streams the full state to disk, hashing as it writes (no in-memory copy).
                converted = self._state_dicts(full_state)
                if self.fabric.is_global_zero:
                    known[STATE_NAME] = write_state_file(converted, partial / STATE_NAME)
            else:
                self.fabric.save(partial / STATE_NAME, full_state)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
        try:
            _agree_on_errors(self.fabric, error, f"writing checkpoint {partial}")
        except CheckpointError as e:
            on_rank_zero(self.fabric, lambda: shutil.rmtree(partial, ignore_errors=True))
            raise CheckpointError(
                f"{e}. The previous checkpoints are intact; fix the cause (e.g. free disk "
                "space) and rerun to resume from the latest one"
            ) from error
        self.fabric.barrier()

        def publish() -> None:
            try:
                _publish(self.cfg, partial, final, info, known)
            except Exception:
                shutil.rmtree(partial, ignore_errors=True)
                raise

        error = None
        try:
            on_rank_zero(self.fabric, publish)
        except Exception as e:  # noqa: BLE001
            error = e
        _agree_on_errors(self.fabric, error, f"publishing checkpoint {final}")
        self.fabric.barrier()
        elapsed = time.perf_counter() - started
        report = SaveReport(
            final,
            step,
            stall_seconds=elapsed,
            write_seconds=elapsed,
            size_bytes=dir_size(final),
            total_bytes=dir_size(self.root),
        )
        self.completed.append(report)
        return report

    def _save_async(
        self, full_state, partial: Path, final: Path, info, started: float
    ) -> SaveReport:
        """Snapshot the state to CPU memory now; write and publish it in a background thread."""
        if not writes_single_file(self.fabric):
            raise CheckpointError(
                "checkpoint.async_save works with ddp/single-device strategies; set it to false for sharded ones"
            )
        snapshot = None
        if self.fabric.is_global_zero:
            snapshot = _to_cpu_copy(self._state_dicts(full_state))
        self.fabric.barrier()
        stall = time.perf_counter() - started

        def write() -> None:
            try:
                digest = write_state_file(snapshot, partial / STATE_NAME)
                _publish(self.cfg, partial, final, info, {STATE_NAME: digest})
                self.completed.append(
                    SaveReport(
                        final,
                        info["step"],
                        stall_seconds=stall,
                        write_seconds=time.perf_counter() - started,
                        size_bytes=dir_size(final),
                        total_bytes=dir_size(self.root),
                    )
                )
            except BaseException as e:  # noqa: BLE001 - raised on the training thread at the next wait()
                shutil.rmtree(partial, ignore_errors=True)
                self._async_error = e

        if self.fabric.is_global_zero:
            self._thread = threading.Thread(
                target=write, name=f"checkpoint-{final.name}", daemon=False
            )
            self._thread.start()
        return SaveReport(final, info["step"], stall_seconds=stall)

    def _state_dicts(self, full_state: dict[str, Any]) -> dict[str, Any]:
        """What Fabric itself would save: module / optimizer / stateful objects as state dicts."""
        from lightning.fabric.wrappers import _unwrap_objects

        return self.fabric.strategy._convert_stateful_objects_in_state(
            _unwrap_objects(full_state), filter={}
        )

    def wait(self) -> None:
        """Finish a background save; every rank learns if it failed."""
        if not self.cfg.checkpoint.async_save:
            return
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._async_error = self._async_error, None
        _agree_on_errors(self.fabric, error, "a background checkpoint save")

    # -- load ------------------------------------------------------------------------------

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill `state` in place from checkpoint `path` (its stateful objects and plain values)."""
        state["rng"] = None
        with _safe_load_errors(path):
            self.fabric.load(path / STATE_NAME, state, weights_only=True)
        rng_per_rank = state.pop("rng")
        if rng_per_rank is not None:
            # Same world size: each rank takes its own stream; otherwise rank 0's is all we can offer.
            same_world = len(rng_per_rank) == self.fabric.world_size
            restore_rng(rng_per_rank[self.fabric.global_rank if same_world else 0])

    def load_weights(self, path: Path, model: torch.nn.Module) -> None:
        """Only the model weights of checkpoint `path` (a new run starting from pretrained weights)."""
        reason = verify(path, checksums=self.cfg.checkpoint.verify_checksums)
        if reason is not None:
            raise CheckpointError(f"checkpoint.init_from={path} cannot be used: {reason}")
        # Any strategy's checkpoint (file, FSDP shards, DeepSpeed ZeRO) into any strategy's model.
        from orchestrator.consolidate import load_model_state
        from orchestrator.strategies import load_full_model_state

        with _safe_load_errors(path):
            try:
                weights = load_model_state(path)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        load_full_model_state(self.fabric, model, weights, strict=True)


class _safe_load_errors:
    """Turn torch's weights-only refusal into a clear message about an unsafe checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, pickle.UnpicklingError):
            raise CheckpointError(
                f"refusing to load {self.path}: it contains pickled objects other than tensors and plain "
                f"containers, which could run arbitrary code ({str(exc).splitlines()[0]}). Only load "
                "checkpoints written by this trainer or exported as safetensors."
            ) from exc
        return False


def _to_cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return obj


def prune(root: Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Keep the newest `keep_last` checkpoints plus every step that is a multiple of `keep_every`."""
    if keep_last <= 0:
        return []
    removed = []
    for old in list_checkpoints(root)[:-keep_last]:
        if keep_every and checkpoint_step(old) % keep_every == 0:
            continue
        # Unlist it atomically first: a kill during the delete leaves a .partial, never a half checkpoint.
        doomed = old.with_name(old.name + ".deleting.partial")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def saved_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "config.yaml").read_text()) or {}
