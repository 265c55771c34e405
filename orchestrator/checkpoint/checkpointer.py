"""Saving and restoring the training state: checkpoints that are either complete and verified,
or never used.

`Checkpointer` writes into `step-N.partial/` (every rank hashing what it writes), rank 0 writes the
manifest last and publishes with an atomic rename; async saves, remote uploads (remote.py) and
verified loading: docs/checkpoints.md, "How a checkpoint is written and read".
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning_fabric.wrappers import _unwrap_objects

from orchestrator.checkpoint.consolidate import load_model_state
from orchestrator.checkpoint.digests import (
    HashingFileSystemWriter,
    gather_digests,
    hashing_deepspeed_engine,
    mapped_deepspeed_loads,
    verify_together,
)
from orchestrator.checkpoint.files import (
    fsync_dir,
    refuse_unsafe_pickles,
    write_state_file,
)
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    META_NAME,
    STATE_NAME,
    CheckpointError,
    checkpoint_root,
    dir_size,
    initial_progress,
    list_checkpoints,
    partial_dir,
    prune,
    step_dir,
)
from orchestrator.checkpoint.manifest import config_hash, write_manifest
from orchestrator.checkpoint.remote import (
    EXIT_UPLOAD_FAILED,
    RemoteCheckpoints,
    StoreUnavailableError,
    Uploader,
    fetch_newer,
    record_uploads,
)
from orchestrator.checkpoint.resume import choose_resume
from orchestrator.checkpoint.rng import capture_rng, restore_rng
from orchestrator.config import Config, save_config
from orchestrator.parallel.fsdp import FSDP2Strategy
from orchestrator.parallel.launch import gather_object, on_rank_zero
from orchestrator.parallel.strategy import load_full_model_state


@dataclass
class SaveReport:
    path: Path
    step: int
    stall_seconds: float  # training was blocked this long
    write_seconds: float | None = None  # total time to publish (None while an async save runs)
    size_bytes: int | None = None
    total_bytes: int | None = None  # all checkpoints of the run, after retention
    extra: dict[str, Any] = field(default_factory=dict)


def writes_single_file(fabric: Fabric) -> bool:
    """DDP and single-device runs hold the full state on rank 0, which writes one file; sharded
    strategies (DeepSpeed, FSDP) write one file per rank through Fabric."""
    strategy = fabric.strategy
    return isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) and not isinstance(
        strategy, DeepSpeedStrategy
    )


def writes_async_shards(fabric: Fabric) -> bool:
    """FSDP with sharded checkpoints: every rank can write its shard in the background."""
    strategy = fabric.strategy
    return isinstance(strategy, FSDP2Strategy) and strategy._save_distributed_checkpoint


def _publish(
    cfg: Config,
    partial: Path,
    final: Path,
    info: dict[str, Any],
    known: dict[str, str] | None = None,
    uploading: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Rank 0: config, manifest (last), atomic rename, retention (never of the checkpoints
    still `uploading` to checkpoint.remote_dir)."""
    save_config(cfg, partial / CONFIG_NAME)
    write_manifest(partial, info, known)
    if final.exists():  # the same step again (after resuming from an older checkpoint)
        shutil.rmtree(final)
    partial.rename(final)
    fsync_dir(final.parent)
    c = cfg.checkpoint
    prune(final.parent, c.keep_last, c.keep_every, protect=final, keep=uploading)


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
        self._async_group = None  # FSDP async saves: the writing threads' own process group
        self.completed: list[SaveReport] = []
        remote = RemoteCheckpoints.from_config(cfg) if fabric.is_global_zero else None
        self.uploader = (
            None
            if remote is None
            else Uploader(remote, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        )

    # -- save ------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Every checkpoint.interval steps, and at the last step."""
        interval = self.cfg.checkpoint.interval
        return bool(interval and step % interval == 0) or step == self.cfg.train.max_steps

    def maybe_save(self, state: dict[str, Any], step: int) -> SaveReport | None:
        """Save the checkpoint of `step` when one is due (collective: every rank calls it)."""
        if not self.due(step):
            return None
        return self.save(state, step, state["progress"]["tokens_seen"])

    def save(self, state: dict[str, Any], step: int, tokens_seen: int) -> SaveReport:
        """Write the checkpoint of `step` (collective: every rank calls it)."""
        self.wait()  # one save at a time; also surfaces an earlier async failure
        final = step_dir(self.root, step)
        partial = partial_dir(final)
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
            elif writes_async_shards(self.fabric):
                # Every rank hashes the shard files it writes, as it writes them.
                writer = HashingFileSystemWriter(partial / STATE_NAME)
                self.fabric.strategy.save_sharded_checkpoint(
                    partial / STATE_NAME, _unwrap_objects(full_state), writer
                )
                known = writer.relative_digests(STATE_NAME)
            else:  # DeepSpeed: each rank hashes the files its engine saves
                with hashing_deepspeed_engine(_unwrap_objects(full_state), partial) as known:
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
        # Rank 0's manifest takes every rank's digests: it hashes only what no rank hashed.
        known = gather_digests(known, lambda digests: gather_object(self.fabric, digests))

        def publish() -> None:
            try:
                _publish(self.cfg, partial, final, info, known, self._uploading())
            except Exception:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            self._upload(final)

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
        if writes_single_file(self.fabric):
            snapshot = None
            if self.fabric.is_global_zero:
                snapshot = _to_cpu_copy(self._state_dicts(full_state))

            def write() -> dict[str, str] | None:  # rank 0 only
                return {STATE_NAME: write_state_file(snapshot, partial / STATE_NAME)}

            writers = self.fabric.is_global_zero
        elif writes_async_shards(self.fabric):
            error, future = None, None
            group = self._shard_writers_group()
            writer = HashingFileSystemWriter(partial / STATE_NAME)
            try:
                future = self.fabric.strategy.async_save_checkpoint(
                    partial / STATE_NAME, _unwrap_objects(full_state), group, storage_writer=writer
                )
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = e
            try:
                _agree_on_errors(self.fabric, error, f"snapshotting checkpoint {partial}")
            except CheckpointError:
                on_rank_zero(self.fabric, lambda: shutil.rmtree(partial, ignore_errors=True))
                raise

            def write() -> dict[str, str] | None:  # every rank: its shard (DCP's collectives)
                try:
                    future.result()
                    digests = writer.relative_digests(STATE_NAME)
                except BaseException:
                    digests = None
                    raise
                finally:  # every rank's thread gathers, failed or not: none waits forever
                    gathered = gather_object(self.fabric, digests, group=group)
                if any(d is None for d in gathered):
                    raise CheckpointError("another rank failed to write its shards")
                return gather_digests({}, lambda _: gathered)

            writers = True
        else:
            raise CheckpointError(
                "checkpoint.async_save works with strategy.name ddp, single, and fsdp with "
                "strategy.sharded_checkpoint=true; set it to false for this run"
            )
        self.fabric.barrier()
        stall = time.perf_counter() - started
        is_zero = self.fabric.is_global_zero

        def write_and_publish() -> None:
            try:
                known = write()
                if is_zero:  # every rank's files are on disk (the future waited for them)
                    _publish(self.cfg, partial, final, info, known, self._uploading())
                    self._upload(final)
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
                if is_zero:
                    shutil.rmtree(partial, ignore_errors=True)
                self._async_error = _without_tracebacks(e)

        if writers:
            self._thread = threading.Thread(
                target=write_and_publish, name=f"checkpoint-{final.name}", daemon=False
            )
            self._thread.start()
        return SaveReport(final, info["step"], stall_seconds=stall)

    def _shard_writers_group(self):
        """A gloo group of every rank for the writing threads' collectives (created once, by the
        first async save, on every rank): the default group stays the training thread's."""
        if self._async_group is None:
            timeout = timedelta(seconds=self.cfg.strategy.timeout_s)
            self._async_group = dist.new_group(backend="gloo", timeout=timeout)
        return self._async_group

    def _state_dicts(self, full_state: dict[str, Any]) -> dict[str, Any]:
        """What Fabric itself would save: module / optimizer / stateful objects as state dicts."""
        return self.fabric.strategy._convert_stateful_objects_in_state(
            _unwrap_objects(full_state), filter={}
        )

    def _uploading(self) -> set[str]:
        """The checkpoints queued or in flight to checkpoint.remote_dir (rank 0)."""
        return set() if self.uploader is None else self.uploader.waiting()

    def _upload(self, final: Path) -> None:
        """Rank 0: queue a published checkpoint for checkpoint.remote_dir (returns at once)."""
        if self.uploader is not None:
            self.uploader.submit(final)

    def log_uploads(self, monitor: Any) -> None:
        """Log the uploads finished since the last call in `monitor` (the run's Monitor), like
        saves (rank 0; nothing elsewhere)."""
        if self.uploader is not None:
            record_uploads(monitor, self.uploader.drain())

    def finish_uploads(self, monitor: Any) -> int:
        """The end of a run (collective): rank 0 waits until every checkpoint is in the store,
        logs the uploads, and says loudly when the newest is not there, while the other ranks
        wait (so that no launcher takes rank 0 for hung after the others exited). Returns, on
        every rank, the run's exit code for it: EXIT_UPLOAD_FAILED when the newest is missing."""
        missing = False
        if self.uploader is not None:
            record_uploads(monitor, self.uploader.finish())
            missing = self.uploader.newest_missing()
        if self.cfg.checkpoint.remote_dir:
            missing = self.fabric.broadcast(missing)
        return EXIT_UPLOAD_FAILED if missing else 0

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
        with refuse_unsafe_pickles(path), mapped_deepspeed_loads(_unwrap_objects(state)):
            self.fabric.load(path / STATE_NAME, state, weights_only=True)
        rng_per_rank = state.pop("rng")
        if rng_per_rank is not None:
            # Same world size: each rank takes its own stream; otherwise rank 0's is all we can offer.
            same_world = len(rng_per_rank) == self.fabric.world_size
            restore_rng(rng_per_rank[self.fabric.global_rank if same_world else 0])
        if path.parent == self.root:
            # The store lacks it after a failed final upload (or with a new remote_dir): send it
            # now; one that is there already is skipped.
            self._upload(path)

    def verify(self, path: Path) -> str | None:
        """manifest.verify of checkpoint `path`, shared among the ranks (collective): each checks
        the checksums of the files it will read (digests.verify_together); the same verdict on
        every rank."""
        return verify_together(
            path,
            self.cfg.checkpoint.verify_checksums,
            self.fabric.global_rank,
            self.fabric.world_size,
            lambda reason: gather_object(self.fabric, reason),
        )

    def choose_resume(self, remote: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
        """resume.choose_resume on every rank together (collective): rank 0 lists the checkpoints
        (and, with `remote`, downloads a newer one from checkpoint.remote_dir), every rank
        verifies its share of each candidate, and all return the same choice."""
        fabric = self.fabric

        def listing(root: Path) -> list[Path]:
            return fabric.broadcast(list_checkpoints(root) if fabric.is_global_zero else None)

        def fetch(*args: Any) -> Path | None:
            # Rank 0 downloads; a store that stays unavailable stops every rank with the same
            # error and exit code (not rank 0 alone while the others wait in the broadcast).
            outcome = None
            if fabric.is_global_zero:
                try:
                    outcome = (fetch_newer(*args), None)
                except StoreUnavailableError as e:
                    outcome = (None, str(e))
            fetched, unavailable = fabric.broadcast(outcome)
            if unavailable is not None:
                raise StoreUnavailableError(unavailable)
            return fetched

        chosen = choose_resume(self.cfg, remote, check=self.verify, listing=listing, fetch=fetch)
        return fabric.broadcast(chosen)

    def load_weights(self, path: Path, model: torch.nn.Module) -> None:
        """Only the model weights of checkpoint `path` (a new run starting from pretrained weights)."""
        reason = self.verify(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint.init_from={path} cannot be used: {reason}")
        # Any strategy's checkpoint (file, FSDP shards, DeepSpeed ZeRO) into any strategy's model.
        with refuse_unsafe_pickles(path):
            try:
                weights = load_model_state(path)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        load_full_model_state(self.fabric, model, weights, strict=True)


def _without_tracebacks(error: BaseException) -> BaseException:
    """torch.distributed.checkpoint's CheckpointException (every rank gets the same one) prints
    each failed rank's traceback; the run's error message needs only who failed, and why."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return error
    why = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(failures.items()))
    return CheckpointError(f"writing the shards failed on {why}")


def _to_cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return obj


def write_weights_checkpoint(
    out: Path, model_state: dict[str, torch.Tensor], cfg: Config, info: dict[str, Any]
) -> Path:
    """A model-only checkpoint (step 0, no optimizer) that `--checkpoint.init_from` starts a run
    from, published like the trainer's: written under `.partial`, manifest last, renamed into
    place. Files already in `out.partial` (e.g. a tokenizer) become part of it."""
    partial = partial_dir(out)
    partial.mkdir(parents=True, exist_ok=True)
    digest = write_state_file(
        {"model": model_state, "progress": initial_progress()}, partial / STATE_NAME
    )
    save_config(cfg, partial / CONFIG_NAME)
    info = {
        "step": 0,
        "tokens_seen": 0,
        "config_hash": config_hash(cfg),
        "world_size": 1,
        "time": time.time(),
        "model_only": True,
        **info,
    }
    (partial / META_NAME).write_text(json.dumps(info, indent=2))
    write_manifest(partial, info, {STATE_NAME: digest})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    fsync_dir(out.parent)
    return out
