"""Damaged token data never trains silently: chunk sizes, checksums and token ids, checked.

:func:`check_sizes` (preflight), ``data.loader.TokensLoader`` (each chunk on first open) and
:func:`verify_dataset` (``orchestrator prepare --verify``) check the CRC-32 that ``prepare``
records in index.json; every failure is a :class:`DamagedChunk`. docs/data.md, "Prepare a corpus".
"""

from __future__ import annotations

import mmap
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.instructions import LOSS_FLAG
from data.storage import ObjectStore, is_remote, join

__all__ = [
    "CHECKSUM_KEY",
    "DamagedChunk",
    "TokenRange",
    "check_sizes",
    "chunk_checksum",
    "has_checksums",
    "verify_dataset",
]

CHECKSUM_KEY = "crc32"  # in each chunk entry of index.json: hex CRC-32 of the whole chunk file


class DamagedChunk(ValueError):
    """A prepared chunk is damaged; the message names it, what is wrong and the fix."""


@dataclass(frozen=True)
class TokenRange:
    """Token ids must be in ``[0, limit)``; ``name`` says what the limit is, for messages.
    ``flags``: bits that are not part of the id (instruction data: the loss flag)."""

    limit: int
    name: str = "model.vocab_size"
    flags: int = 0


def chunk_checksum(data: bytes | memoryview | mmap.mmap) -> str:
    return f"{zlib.crc32(data):08x}"


def file_checksum(path: str | Path) -> str:
    """The checksum prepare records for a chunk file (streamed: constant memory)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def has_checksums(index: dict[str, Any]) -> bool:
    """Whether a split's index records chunk checksums (datasets prepared before them do not)."""
    return any(CHECKSUM_KEY in c for c in index["chunks"])


def token_dtype(config: dict[str, Any]) -> np.dtype:
    """The numpy dtype of the tokens of a TokensLoader index's config (uint16 or int32)."""
    from litdata.constants import _TORCH_DTYPES_MAPPING  # torch: imported where tokens are read

    dtype_index = int(config["data_format"][0].split(":")[1])
    return np.dtype(str(_TORCH_DTYPES_MAPPING[dtype_index]).removeprefix("torch."))


def read_prepare_stats(split: str | Path, storage_options: dict | None = None) -> dict:
    """The prepare_stats.json beside a split, or {} (none, or unreadable: nothing recorded)."""
    from data.documents import read_prepare_stats  # imports torch; data.prepare must not

    try:
        return read_prepare_stats(split, storage_options) or {}
    except (OSError, ValueError):
        return {}


def split_token_range(
    split: str | Path, limit: int, name: str, storage_options: dict | None = None
) -> TokenRange:
    """The range for one prepared split: instruction data (its prepare_stats.json says so) carry a
    loss flag beside each id."""
    stats = read_prepare_stats(split, storage_options)
    flags = LOSS_FLAG if stats.get("format") == "instruction" else 0
    return TokenRange(limit, name, flags)


def chunk_problems(
    data: bytes | memoryview | mmap.mmap,
    chunk: dict[str, Any],
    dtype: np.dtype,
    token_range: TokenRange | None,
) -> list[str]:
    """What is wrong with one chunk file's bytes: size, checksum, token ids (empty: nothing)."""
    expected = int(chunk["chunk_bytes"])
    if len(data) != expected:
        how = "truncated" if len(data) < expected else "longer than written"
        return [f"{len(data):,} bytes but index.json records {expected:,} ({how})"]
    problems = []
    recorded = chunk.get(CHECKSUM_KEY)
    if recorded is not None and (actual := chunk_checksum(data)) != recorded:
        problems.append(
            f"its crc32 is {actual}, not the {recorded} recorded when it was prepared "
            "(its bytes changed)"
        )
    if token_range is not None:
        header = (2 + int(chunk["chunk_size"])) * 4  # uint32 num_items, offsets[num_items + 1]
        tokens = np.frombuffer(data, dtype=dtype, offset=header)
        problem = _range_problem(tokens, token_range)
        if problem:
            problems.append(problem)
    return problems


def file_problems(
    path: str | Path, chunk: dict[str, Any], dtype: np.dtype, token_range: TokenRange | None
) -> list[str]:
    """chunk_problems of a local chunk file, read through a memory map (["missing"] if absent)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files
                return chunk_problems(b"", chunk, dtype, token_range)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return chunk_problems(data, chunk, dtype, token_range)
    except FileNotFoundError:
        return ["missing"]


def _range_problem(tokens: np.ndarray, r: TokenRange) -> str | None:
    if tokens.size == 0:
        return None
    ids = np.bitwise_and(tokens, ~r.flags) if r.flags else tokens
    low = 0 if ids.dtype.kind == "u" else int(ids.min())
    if int(ids.max()) < r.limit and low >= 0:
        return None
    at = int(np.flatnonzero((ids >= r.limit) | (ids < 0))[0])
    return (
        f"token id {int(ids[at])} at token {at:,} of the chunk is outside {r.name} "
        f"(ids 0..{r.limit - 1})"
    )


_CHUNK_NAME = re.compile(r"chunk-(\d+)-\d+\.bin$")


def fix_hint(split: str | Path, filename: str, storage_options: dict | None = None) -> str:
    """How to make a damaged chunk again: the prepare's part that wrote it and its input files."""
    stats = read_prepare_stats(split, storage_options)
    root = str(split).rstrip("/").rsplit("/", 1)[0]
    match = _CHUNK_NAME.search(filename)
    part = int(match.group(1)) if match else None
    files = [
        f["file"] for f in stats.get("files", []) if part is not None and f.get("part") == part
    ]
    made_from = f" (part {part} of the prepare, from {', '.join(files)})" if files else ""
    command = (
        f"orchestrator prepare --input {stats['input_dir']} --output {root} --tokenizer "
        f"{stats['tokenizer_path']} --repair"
        if stats.get("input_dir") and stats.get("tokenizer_path")
        else f"orchestrator prepare --output {root} --repair (with the inputs it was prepared from)"
    )
    return (
        f"Re-run prepare for that part{made_from}: `{command}` rewrites the damaged parts "
        f"(`orchestrator prepare --verify {root}` checks the whole dataset)."
    )


def damaged(
    split: str | Path, filename: str, problems: list[str], storage_options: dict | None = None
) -> DamagedChunk:
    return DamagedChunk(
        f"Damaged token chunk {join(split, filename)}: {'; '.join(problems)}. "
        + fix_hint(split, filename, storage_options)
    )


def check_sizes(
    split: str | Path, index: dict[str, Any], storage_options: dict | None = None
) -> None:
    """Every chunk file of a split is there at its recorded size, or a DamagedChunk naming the
    first ones that are not. Cheap: one stat per chunk (s3://: one listing per 1000 objects;
    other object stores: not checked here, their chunks are checked when downloaded)."""
    chunks = index["chunks"]
    if is_remote(split):
        store = ObjectStore(str(split), storage_options)
        if store.scheme != "s3":
            return
        sizes = store.sizes()
    else:
        sizes = {}
        for c in chunks:
            try:
                sizes[c["filename"]] = os.stat(Path(split) / c["filename"]).st_size
            except FileNotFoundError:
                pass
    bad = []
    for c in chunks:
        size, expected = sizes.get(c["filename"]), int(c["chunk_bytes"])
        if size is None:
            bad.append((c["filename"], "missing"))
        elif size != expected:
            how = "truncated" if size < expected else "longer than written"
            bad.append(
                (c["filename"], f"{size:,} bytes but index.json records {expected:,} ({how})")
            )
    if bad:
        more = f" (and {len(bad) - 3} more damaged chunks)" if len(bad) > 3 else ""
        error = damaged(split, bad[0][0], [bad[0][1]], storage_options)
        others = "".join(f" Also {join(split, name)}: {why}." for name, why in bad[1:3])
        raise DamagedChunk(f"{error}{others}{more}")


# ------------------------------------------------------------------------------------------------
# orchestrator prepare --verify
# ------------------------------------------------------------------------------------------------


def verify_dataset(
    root: str | Path,
    vocab_size: int | None = None,
    storage_options: dict | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Check every chunk of a prepared dataset (a prepare output, or one split): size, checksum,
    token ids below ``vocab_size`` (default: the tokenizer's vocabulary recorded in
    prepare_stats.json). Chunks are read ``num_workers`` at a time (default: cores; hashing and
    numpy release the GIL). Returns a report: per split its chunks, bytes, how many have a
    recorded checksum, and the damaged ones ``[(chunk, [problems])]``; ``ok``."""
    from data.loader import read_index  # data.loader imports this module

    if is_remote(root):
        root_store = ObjectStore(str(root), storage_options)
        has = root_store.exists
        names = [s for s in ("train", "val") if has(f"{s}/index.json")]
        splits = [(s, join(root, s)) for s in names] or [("", str(root).rstrip("/"))]
    else:
        p = Path(root)
        names = [s for s in ("train", "val") if (p / s / "index.json").is_file()]
        splits = [(s, p / s) for s in names] or [("", p)]
    report: dict[str, Any] = {"root": str(root), "splits": {}, "ok": True}
    for name, split in splits:
        index = read_index(split, _stream(storage_options))
        stats = read_prepare_stats(split, storage_options)
        limit = vocab_size or stats.get("vocab_size")
        token_range = None
        if isinstance(limit, int):
            what = "the tokenizer's vocabulary" if vocab_size is None else "--vocab-size"
            flags = LOSS_FLAG if stats.get("format") == "instruction" else 0
            token_range = TokenRange(limit, what, flags)
        dtype = token_dtype(index["config"])
        store = ObjectStore(str(split), storage_options) if is_remote(split) else None

        def check(chunk: dict[str, Any], *, split=split, store=store, dtype=dtype, tr=token_range):
            if store is None:
                return file_problems(Path(split) / chunk["filename"], chunk, dtype, tr)
            try:
                return chunk_problems(store.read_bytes(chunk["filename"]), chunk, dtype, tr)
            except FileNotFoundError:
                return ["missing"]

        workers = max(1, num_workers or os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, index["chunks"]))
        bad = [(c["filename"], p) for c, p in zip(index["chunks"], results, strict=True) if p]
        report["splits"][name or str(split)] = {
            "split": str(split),
            "chunks": len(index["chunks"]),
            "bytes": sum(int(c["chunk_bytes"]) for c in index["chunks"]),
            "tokens": sum(int(c["dim"]) for c in index["chunks"]),
            "checksums": sum(CHECKSUM_KEY in c for c in index["chunks"]),
            "vocab_size": token_range.limit if token_range else None,
            "damaged": bad,
            "fix": fix_hint(split, bad[0][0], storage_options) if bad else None,
        }
        report["ok"] = report["ok"] and not bad
    return report


def _stream(storage_options: dict | None) -> Any:
    from data.loader import StreamOptions

    return StreamOptions(storage_options=dict(storage_options or {}))


def damaged_chunks(
    root: str | Path, storage_options: dict | None = None, num_workers: int | None = None
) -> list[tuple[str, str, list[str]]]:
    """(split name, chunk file, problems) of every damaged chunk of a prepared dataset."""
    report = verify_dataset(root, storage_options=storage_options, num_workers=num_workers)
    return [(s, name, why) for s, r in report["splits"].items() for name, why in r["damaged"]]
