"""The manifest: written last into a checkpoint, it makes the checkpoint complete.

It lists every other file with its size and SHA-256, and the step, tokens seen, config hash,
world size and strategy of the run that wrote it. `verify` compares the files against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from data.util import file_sha256
from orchestrator.checkpoint.files import fsync_dir, fsync_file
from orchestrator.checkpoint.layout import MANIFEST_NAME, STATE_NAME
from orchestrator.config import Config
from orchestrator.schema import to_dict

MANIFEST_VERSION = 1


def config_hash(cfg: Config) -> str:
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MANIFEST_TMP = MANIFEST_NAME + ".tmp"  # a manifest being written (or left by an interrupted write)


def _payload_files(ckpt_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.relative_to(ckpt_dir).as_posix() not in (MANIFEST_NAME, _MANIFEST_TMP)
    )


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
            fsync_file(path)
        files[name] = {"size": path.stat().st_size, "sha256": known.get(name) or file_sha256(path)}
    manifest = {"version": MANIFEST_VERSION, **info, "files": files}
    tmp = ckpt_dir / _MANIFEST_TMP
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(ckpt_dir / MANIFEST_NAME)
    fsync_dir(ckpt_dir)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST_NAME).read_text())


def verify(
    path: Path, checksums: bool = True, hash_only: Callable[[str], bool] | None = None
) -> str | None:
    """None if `path` is a complete checkpoint matching its manifest, else the reason it is not.

    Every listed file must exist with its size; with `checksums`, the SHA-256 of each file (or of
    those `hash_only(name)` selects: a process's share, see digests.verify_together) is checked
    too, several files at once in threads (hashlib and file reads release the GIL)."""
    if not path.is_dir():
        return "not a directory"
    if not (path / MANIFEST_NAME).is_file():
        return "no manifest (the save was interrupted)"
    try:
        files = read_manifest(path)["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # Not JSON, or JSON of the wrong shape: a reason, never an exception (the ranks decide
        # together: one that raised would leave the others waiting for its verdict).
        return f"unreadable manifest ({type(e).__name__}: {e})"
    if not any(name == STATE_NAME or name.startswith(STATE_NAME + "/") for name, _, _ in entries):
        return "manifest lists no state"
    for name, size_expected, _ in entries:
        file = path / name
        try:
            if not file.is_file():
                return f"missing file {name}"
            size = file.stat().st_size
        except OSError as e:  # damage too (an unreadable shard): fall back, never crash
            return f"{name} cannot be read ({type(e).__name__}: {e})"
        if size != size_expected:
            return (
                f"{name} is {size} bytes, manifest says {size_expected} (truncated or overwritten)"
            )
    if not checksums:
        return None
    to_hash = [(n, sha) for n, _, sha in entries if hash_only is None or hash_only(n)]
    for name, matches in zip((n for n, _ in to_hash), _hash_matches(path, to_hash)):
        if not matches:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def _hash_matches(path: Path, entries: list[tuple[str, str]]) -> list[bool]:
    """Whether each file's SHA-256 is the expected one (an unreadable file is not); up to 8
    files hashed at a time."""

    def matches(entry: tuple[str, str]) -> bool:
        try:
            return file_sha256(path / entry[0]) == entry[1]
        except OSError:
            return False

    if len(entries) <= 1:
        return [matches(e) for e in entries]
    workers = min(len(entries), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        return list(pool.map(matches, entries))


def check_matches_manifest(ckpt_dir: Path, checksums: bool = True) -> None:
    """For the offline tools: raise ValueError when the files differ from the manifest (a
    checkpoint without one, e.g. a file made elsewhere, is taken as it is)."""
    if not (ckpt_dir / MANIFEST_NAME).is_file():
        return
    reason = verify(ckpt_dir, checksums=checksums)
    if reason is not None:
        raise ValueError(f"{ckpt_dir} does not match its manifest: {reason}")


def manifest_step(path: Path) -> int | None:
    """The step in `path`'s manifest, or None when it has no readable one (no verification)."""
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        return int(read_manifest(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
