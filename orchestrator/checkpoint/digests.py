"""Every rank hashes the checkpoint files it writes, while writing them, and verifies the files
it will read: no single process reads a whole multi-GB checkpoint back from a shared filesystem.

Saving: FSDP's shards go through `HashingFileSystemWriter` (torch.distributed.checkpoint's file
writer, hashing each file as it streams it to disk, `.metadata` included), DeepSpeed's per-rank
files through `hashing_deepspeed_engine` (its checkpoint engine's `torch.save`, streamed and
hashed); DDP's single file is hashed as rank 0 streams it (files.write_state_file). `gather_digests`
brings every rank's {relative path: SHA-256} to rank 0, whose manifest then only hashes the small
files it wrote itself (config, Lightning's `meta.pt`, DeepSpeed's `latest`).

Resuming: `verify_together` splits the checksums of a checkpoint among the ranks, each its own
shard files (`state/__R_*.distcp`, `state/*/zero_pp_rank_R_*`; rank 0 the rest), and every rank
gets the same verdict.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, _FileSystemWriter

from orchestrator.checkpoint.files import HashingFile, write_state_file
from orchestrator.checkpoint.manifest import verify

# The writing rank in a shard's name: DCP's `__R_N.distcp`, DeepSpeed's `zero_pp_rank_R_...`
# (its optimizer shards under bf16: `bf16_zero_pp_rank_R_...`).
_RANK_IN_NAME = re.compile(r"(?:^__(\d+)_\d+\.distcp$)|(?:^(?:bf16_)?zero_pp_rank_(\d+)_)")


def reading_rank(name: str, world_size: int) -> int:
    """The rank that checks file `name` (a manifest path) at resume: the writer of a shard
    (modulo the world size: a checkpoint of a larger world spreads over this one), else rank 0."""
    match = _RANK_IN_NAME.match(Path(name).name)
    if match is None:
        return 0
    return int(match.group(1) or match.group(2)) % max(1, world_size)


# -- saving --------------------------------------------------------------------------------------


class _SyncableHashingFile(HashingFile):
    """For DCP, which fsyncs each stream it writes through `fileno()`."""

    def fileno(self) -> int:
        return self.file.fileno()


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, recording the SHA-256 of every file it writes (by final name)."""

    def __init__(self, digests: dict[str, str]) -> None:
        self.digests = digests

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name

        def record(hexdigest: str) -> None:
            self.digests[name] = hexdigest

        with Path(path).open(mode) as file, _SyncableHashingFile(file, record) as stream:
            yield stream

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes `.metadata.tmp`, then renames it
        if Path(path).name in self.digests:
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class HashingFileSystemWriter(_FileSystemWriter):
    """torch.distributed.checkpoint's file writer (the files `dcp.save(checkpoint_id=path)`
    writes, byte for byte) that hashes each file while writing it: `digests` maps the names this
    rank wrote (its `__R_N.distcp` shards; on the coordinator also `.metadata`) to SHA-256.

    Not an AsyncStager (unlike FileSystemWriter): `dcp.async_save` stages with its default
    stager, as without a writer."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.digests: dict[str, str] = {}
        self.fs = _HashingFileSystem(self.digests)

    def relative_digests(self, prefix: str) -> dict[str, str]:
        """`digests` keyed by manifest path (`prefix/NAME`)."""
        return {f"{prefix}/{name}": sha for name, sha in self.digests.items()}


class _HashingCheckpointEngine:
    """DeepSpeed's checkpoint engine with `save` streamed through a hashing file (same bytes)."""

    def __init__(self, engine: Any, digests: dict[Path, str]) -> None:
        self._engine = engine
        self._digests = digests

    def save(self, state_dict, path) -> None:
        zipfile = getattr(self._engine, "zipfile_serialization", True)
        self._digests[Path(path)] = write_state_file(
            state_dict, Path(path), _use_new_zipfile_serialization=zipfile
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _deepspeed_engine(state: dict[str, Any]) -> Any | None:
    """The DeepSpeed engine in `state` when it uses DeepSpeed's plain torch.save engine."""
    module = sys.modules.get("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine")
    if module is None:
        return None
    return next(
        (
            obj
            for obj in state.values()
            if isinstance(getattr(obj, "checkpoint_engine", None), module.TorchCheckpointEngine)
        ),
        None,
    )


@contextmanager
def _checkpoint_engine_replaced(engine: Any, replacement: Any) -> Iterator[None]:
    original = engine.checkpoint_engine
    engine.checkpoint_engine = replacement
    try:
        yield
    finally:
        engine.checkpoint_engine = original


@contextmanager
def hashing_deepspeed_engine(state: dict[str, Any], root: Path) -> Iterator[dict[str, str]]:
    """While inside, the DeepSpeed engine in `state` hashes each file it saves (only when it uses
    DeepSpeed's plain torch.save engine); yields {path relative to `root`: SHA-256}, filled on
    exit."""
    found: dict[str, str] = {}
    engine = _deepspeed_engine(state)
    if engine is None:
        yield found
        return
    digests: dict[Path, str] = {}
    with _checkpoint_engine_replaced(
        engine, _HashingCheckpointEngine(engine.checkpoint_engine, digests)
    ):
        yield found
    for path, sha in digests.items():
        try:
            found[path.resolve().relative_to(root.resolve()).as_posix()] = sha
        except ValueError:  # not under the checkpoint: not in its manifest
            pass


class _MappingCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` memory-mapping each file: its tensors are read
    from the page cache as DeepSpeed copies them into the live state, instead of all at once into
    new memory beside it (ZeRO-3's optimizer shard of TinyLlama-1.1B on 2 ranks: 6.3 GB; the
    kernel killed a rank resuming from it on a 24 GiB machine)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def load(self, path, map_location=None):
        try:  # DeepSpeed's own files hold objects other than tensors: not weights-only
            return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            return self._engine.load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@contextmanager
def mapped_deepspeed_loads(state: dict[str, Any]) -> Iterator[None]:
    """While inside, the DeepSpeed engine in `state` memory-maps the files it loads."""
    engine = _deepspeed_engine(state)
    if engine is None:
        yield
        return
    with _checkpoint_engine_replaced(engine, _MappingCheckpointEngine(engine.checkpoint_engine)):
        yield


def gather_digests(local: dict[str, str], gather: Callable[[Any], list[Any]]) -> dict[str, str]:
    """Every rank's {manifest path: SHA-256}, merged (`gather`: an all-gather of one object per
    rank, e.g. launch.gather_object or the async writers' own group)."""
    merged: dict[str, str] = {}
    for digests in gather(local):
        merged.update(digests or {})
    return merged


# -- resuming ------------------------------------------------------------------------------------


def verify_together(
    path: Path, checksums: bool, rank: int, world_size: int, gather: Callable[[Any], list[Any]]
) -> str | None:
    """`manifest.verify` of `path` shared among the ranks (collective: every rank calls it with
    the same path): each rank checks every file's presence and size, and the checksums of the
    files `reading_rank` gives it. Every rank returns the same verdict (the first reason, in
    rank order)."""
    reason = verify(
        path, checksums=checksums, hash_only=lambda name: reading_rank(name, world_size) == rank
    )
    for found in gather(reason):
        if found is not None:
            return found
    return None
