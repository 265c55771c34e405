"""Reading SlimPajama-style JSON-lines shards (``.jsonl`` or ``.jsonl.zst``).

Bad records are skipped but never silently: every skip is counted by reason in a
:class:`SkipStats`, which callers report (``prepare_stats.json``) so that a corrupt shard
shows up as a number instead of as a quietly smaller dataset.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

__all__ = [
    "SHARD_SUFFIXES",
    "SKIP_REASONS",
    "SkipStats",
    "find_shards",
    "iter_documents",
    "iter_records",
]

SHARD_SUFFIXES = (".jsonl", ".jsonl.zst")

# Why a line did not become a document. Fixed names so stats from different runs compare.
SKIP_REASONS = (
    "blank_line",  # an empty / whitespace-only line
    "invalid_utf8",  # the line's bytes are not UTF-8
    "invalid_json",  # the line does not parse as JSON
    "missing_text",  # valid JSON, but not an object with a string "text" field
    "empty_text",  # "text" is a string with no non-whitespace character
)


@dataclass
class SkipStats:
    """Counts of documents read and lines skipped (by reason), plus documents per set name."""

    docs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # Documents per meta.redpajama_set_name ("unknown" when absent): useful for mixtures.
    sets: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.skipped[reason] += 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SkipStats) -> None:
        self.docs += other.docs
        self.skipped.update(other.skipped)
        self.sets.update(other.sets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "skipped_total": self.total_skipped,
            "sets": dict(sorted(self.sets.items())),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipStats:
        return cls(docs=int(d["docs"]), skipped=Counter(d.get("skipped", {})),
                   sets=Counter(d.get("sets", {})))


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def find_shards(directory: str | Path) -> list[Path]:
    """All ``*.jsonl`` / ``*.jsonl.zst`` files under ``directory`` (recursive), sorted by path."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(
            f"Input directory {d} does not exist. Point it at a folder of .jsonl or .jsonl.zst "
            f"shards (SlimPajama layout), or create the built-in sample corpus with "
            f"`orchestrator sample-data`."
        )
    if not d.is_dir():
        raise NotADirectoryError(f"Input path {d} is not a directory; expected a folder of shards.")
    shards = sorted(p for p in d.rglob("*") if _is_shard(p))
    if not shards:
        raise FileNotFoundError(
            f"No .jsonl or .jsonl.zst shards found under {d}. Expected SlimPajama-style files "
            f"such as {d}/train/chunk1/example_train_0.jsonl.zst."
        )
    return shards


_READ_SIZE = 1 << 20


def _zstd_blocks(raw: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompress a (possibly multi-frame) zstd stream piece by piece.

    ``ZstdDecompressor.stream_reader`` reports a truncated file as a clean, shorter EOF, which
    would silently drop the rest of a shard; a decompressobj tells us whether the last frame
    was complete.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False  # consumed part of a frame that has not ended yet
    try:
        while data := raw.read(_READ_SIZE):
            while data:
                out = dobj.decompress(data)
                in_frame = True
                if out:
                    yield out
                if dobj.eof:  # frame finished; anything after it starts the next frame
                    data = dobj.unused_data
                    dobj = dctx.decompressobj()
                    in_frame = False
                else:
                    data = b""
    except zstandard.ZstdError as e:
        raise ValueError(f"Corrupt zstd shard {path}: {e}. Re-download or remove it.") from e
    if in_frame:
        raise ValueError(f"Truncated zstd shard {path}: the last frame is incomplete. "
                         f"Re-download or remove it.")


def _open_lines(path: Path) -> Iterator[bytes]:
    """Yield raw lines (bytes, line ending stripped) of a plain or zstd-compressed JSONL file.

    Streams in ~1 MiB pieces: shards can be far larger than memory.
    """
    with open(path, "rb") as raw:
        pieces = _zstd_blocks(raw, path) if path.name.endswith(".zst") else iter(
            lambda: raw.read(_READ_SIZE), b"")
        pending = b""
        for piece in pieces:
            lines = (pending + piece).split(b"\n")
            pending = lines.pop()  # possibly incomplete last line
            for line in lines:
                yield line.rstrip(b"\r")
        if pending:
            yield pending.rstrip(b"\r")


def iter_records(path: str | Path, stats: SkipStats | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(text, set_name)`` for every valid record in one shard, counting skips in ``stats``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Shard {p} does not exist or is not a file.")
    st = stats if stats is not None else SkipStats()
    for raw in _open_lines(p):
        if not raw.strip():
            st.skip("blank_line")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            st.skip("invalid_utf8")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            st.skip("invalid_json")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            st.skip("missing_text")
            continue
        if not text.strip():
            st.skip("empty_text")
            continue
        meta = record.get("meta")
        set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        set_name = set_name if isinstance(set_name, str) else "unknown"
        st.docs += 1
        st.sets[set_name] += 1
        yield text, set_name


def iter_documents(path: str | Path, stats: SkipStats | None = None) -> Iterator[str]:
    """Yield the ``text`` of every valid record in one shard, counting skips in ``stats``."""
    for text, _ in iter_records(path, stats):
        yield text
