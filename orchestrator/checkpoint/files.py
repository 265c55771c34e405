"""Bytes on disk: state files written while they are hashed, flushed to disk, and read back
without ever running pickled code."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from orchestrator.checkpoint.layout import STATE_NAME, CheckpointError


class UnsafeCheckpointError(CheckpointError, ValueError):
    """The file holds pickled objects other than tensors and plain containers."""


@contextmanager
def refuse_unsafe_pickles(path: Path) -> Iterator[None]:
    """Turn torch's weights-only refusal (inside the block) into one clear error about `path`."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors and plain "
            f"containers, which could run arbitrary code ({str(e).splitlines()[0]}). Only load "
            "checkpoints written by this trainer or exported as safetensors."
        ) from e


def load_tensors(path: Path) -> Any:
    """torch.load of a checkpoint file: memory-mapped (the optimizer state, twice the model, is
    never read into memory) and weights-only (a checkpoint never runs pickled code)."""
    with refuse_unsafe_pickles(path):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


# The files of a checkpoint that the trainer reads weights-only: `state` itself (ddp, single,
# gathered fsdp), and the metadata file Lightning writes beside the shards of a sharded fsdp one.
# (DeepSpeed's engine reads its own files, not weights-only.)
_WEIGHTS_ONLY_FILES = (STATE_NAME, f"{STATE_NAME}/meta.pt")


def unsafe_reason(ckpt_dir: Path) -> str | None:
    """Why loading checkpoint `ckpt_dir` would be refused as unsafe (pickled objects other than
    tensors and plain containers), or None. Checks what the trainer's load reads weights-only,
    without reading the tensors (memory-mapped): cheap, also for a large checkpoint."""
    for rel in _WEIGHTS_ONLY_FILES:
        if (ckpt_dir / rel).is_file():
            try:
                load_tensors(ckpt_dir / rel)
            except UnsafeCheckpointError as e:
                return str(e)
    return None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


class HashingFile:
    """A binary file open for writing that hashes what passes through it (saves re-reading a
    multi-GB file); `on_close(hexdigest)` runs when it is closed. No `fileno`: given one,
    torch.save's legacy format writes tensor data straight to the descriptor, past the hash."""

    def __init__(self, file: BinaryIO, on_close: Callable[[str], None] | None = None) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.on_close = on_close

    @property
    def closed(self) -> bool:
        return self.file.closed

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            if self.on_close is not None:
                self.on_close(self.digest.hexdigest())

    def close_synced(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        return self.digest.hexdigest()

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_state_file(state: dict[str, Any], path: Path, **save_options: Any) -> str:
    """torch.save straight to disk (fsynced), returning the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = HashingFile(path.open("wb"))
    try:
        torch.save(state, out, **save_options)
    except BaseException:
        out.file.close()
        raise
    return out.close_synced()
