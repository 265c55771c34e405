"""Tokenize a raw corpus into litdata token chunks: parallel, streaming, resumable, deterministic.

``prepare_dataset(PrepareOptions(input_dir, output_dir, tokenizer_path, ...))`` writes
``output/{train,val}`` (TokensLoader chunks), ``prepare_stats.json`` and, last, ``_COMPLETE``.
The input files are cut into parts, each tokenized by one worker into its own chunks and recorded
when done: a rerun resumes, and the bytes never depend on the worker count. Bad records are
skipped and counted (data.shards); instruction data: data.instructions. Layout, splits, parts,
staging and merge: docs/data.md, "How prepare works".
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from data.instructions import FORMATS as INSTRUCTION_FORMATS
from data.instructions import LOSS_FLAG, LOSS_MASK_BIT, BadRecord, encode_example, to_example
from data.integrity import CHECKSUM_KEY, file_checksum
from data.shards import RecordFilter, ShardReader, SkipStats, find_shards
from data.storage import ObjectStore, is_remote
from data.tokenizer import SEPARATORS, Tokenizer
from data.util import file_sha256, format_duration, parse_size

__all__ = [
    "COMPLETE_MARKER",
    "STATS_FILE",
    "PrepareOptions",
    "is_prepared",
    "prepare_dataset",
    "read_stats",
]

COMPLETE_MARKER = "_COMPLETE"
STATS_FILE = "prepare_stats.json"
SPLITS = ("train", "val")
# Input split folder (SlimPajama) -> output split.
SPLIT_DIRS = {"train": "train", "validation": "val"}
_WORK_DIR = ".prepare_work"
_FORMAT_VERSION = 2
DATA_FORMATS = ("text", "instruction")
# Options added after datasets were prepared without them: their values then, for the comparison
# of a finished prepare with a new call (an older output is the same as one made with these).
_OPTION_DEFAULTS = {"format": "text", "instruction_format": "auto", "max_tokens": 0}
_is_url = is_remote  # s3:// (and S3-compatible), gs://, azure://


@dataclass(frozen=True)
class PrepareOptions:
    """One prepare: its input, output and tokenizer, what decides the output's bytes (the
    ``OUTPUT_FIELDS``, the settings a finished output is compared by), and how it runs.

    Sizes may be given as strings (``chunk_bytes="64MB"``; ``group_bytes`` also ``"auto"``, resolved
    from the input by ``prepare_dataset``); ``exclude_sets`` may be any iterable of set names.
    """

    input_dir: str | Path  # a corpus file or folder (SlimPajama layout or flat, see docs/data.md)
    output_dir: str | Path  # a local directory or an object-store URL (s3://...)
    tokenizer_path: str | Path
    _: KW_ONLY
    # What decides the output's bytes:
    text_field: str = "text"
    exclude_sets: tuple[str, ...] = ()
    min_chars: int = 0
    min_tokens: int = 0
    separator: str = "bos+eos"
    chunk_bytes: int = 64_000_000
    group_bytes: int | str = "auto"  # input bytes per part; "auto": see _auto_group_bytes
    val_every: int = 100
    format: str = "text"  # "text" (pretraining documents) or "instruction" (data.instructions)
    instruction_format: str = "auto"  # format="instruction": "auto" or one of instructions.FORMATS
    max_tokens: int = 0  # format="instruction": longer examples are skipped (too_long); 0: no limit
    # How it runs (never the bytes):
    num_workers: int | None = None  # processes; default: every core
    overwrite: bool = False  # redo a finished output (else it is returned as is)
    progress: bool = False  # a status line on stderr
    work_dir: str | Path | None = None  # staging; default <output>/.prepare_work or ~/.cache/...
    storage_options: dict[str, Any] | None = None
    max_parts: int | None = None  # stop after that many parts (unfinished; for tests and jobs)
    repair: bool = False  # a finished output: tokenize again the parts of damaged chunks
    start_method: str | None = None  # multiprocessing's; default fork where available

    OUTPUT_FIELDS: ClassVar[tuple[str, ...]] = (
        "text_field",
        "exclude_sets",
        "min_chars",
        "min_tokens",
        "separator",
        "chunk_bytes",
        "group_bytes",
        "val_every",
        "format",
        "instruction_format",
        "max_tokens",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "exclude_sets", tuple(sorted(set(self.exclude_sets))))
        set_(self, "chunk_bytes", parse_size(self.chunk_bytes))
        if self.group_bytes != "auto":
            set_(self, "group_bytes", parse_size(self.group_bytes))

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide the output's bytes (``group_bytes`` resolved): the fingerprint's
        ``options``, which finished outputs are compared by (keep its keys and values as they are)."""
        return {name: getattr(self, name) for name in self.OUTPUT_FIELDS}

    def validate(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(
                f"format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}."
            )
        if self.instruction_format not in ("auto", *INSTRUCTION_FORMATS):
            raise ValueError(
                f"instruction_format must be auto or one of {', '.join(INSTRUCTION_FORMATS)}, "
                f"got {self.instruction_format!r}."
            )
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}.")
        if self.format == "instruction":
            unused = {
                "text_field": self.text_field != "text",
                "min_chars": self.min_chars != 0,
                "min_tokens": self.min_tokens != 0,
                "separator": self.separator != "bos+eos",
            }
            if any(unused.values()):
                raise ValueError(
                    f"{', '.join(k for k, v in unused.items() if v)} do not apply to instruction data "
                    "(--format instruction: fields come from the record's format, examples are "
                    "[BOS] prompt response [EOS]; --max-tokens limits their length)."
                )
        elif self.instruction_format != "auto" or self.max_tokens:
            raise ValueError(
                "instruction_format and max_tokens apply to instruction data only (--format instruction)."
            )
        if self.separator not in SEPARATORS:
            raise ValueError(
                f"separator must be one of {', '.join(SEPARATORS)}, got {self.separator!r}."
            )
        for name in ("min_chars", "min_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes must be at least 1KB, got {self.chunk_bytes}.")
        if self.group_bytes != "auto" and self.group_bytes < 1:
            raise ValueError(f"group_bytes must be positive, got {self.group_bytes}.")
        RecordFilter(
            self.text_field, frozenset(self.exclude_sets), self.min_chars
        )  # checks the rest

    def record_filter(self) -> RecordFilter:
        return RecordFilter(self.text_field, frozenset(self.exclude_sets), self.min_chars)


# ------------------------------------------------------------------------------------------------
# Output location: a local directory or an object-store URL
# ------------------------------------------------------------------------------------------------


class _Output:
    """Where the dataset goes. Local paths are used directly; URLs through data.storage."""

    def __init__(self, output: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.remote = _is_url(output)
        self.url = str(output).rstrip("/") if self.remote else None
        self.path = None if self.remote else Path(output)
        self.storage_options = storage_options or {}
        # Picklable; its client is created in the process that uses it (clients are not fork-safe).
        self.store = ObjectStore(self.url, self.storage_options) if self.remote else None

    def __str__(self) -> str:
        return self.url if self.remote else str(self.path)

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts]) if self.remote else str(self.path.joinpath(*parts))

    def exists(self, *parts: str) -> bool:
        if self.remote:
            return self.store.exists("/".join(parts))
        return Path(self.join(*parts)).exists()

    def read_text(self, *parts: str) -> str:
        if self.remote:
            return self.store.read_text("/".join(parts))
        return Path(self.join(*parts)).read_text()

    def put_text(self, text: str, *parts: str) -> None:
        """Write (atomically for local paths) a small text file."""
        if self.remote:
            self.store.put_text("/".join(parts), text)
            return
        dest = Path(self.join(*parts))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, dest)

    def upload(self, local: Path, *parts: str) -> None:
        self.store.upload(local, "/".join(parts))

    def remove(self, *parts: str) -> None:
        """A file, or everything under a directory."""
        if self.remote:
            rel = "/".join(parts)
            self.store.delete(rel)
            if self.store.scheme == "s3":
                self.store.delete_tree(rel)
            return
        p = Path(self.join(*parts))
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail at once, with the reason, if nothing can be written there."""
        probe = f".write_probe_{os.getpid()}"
        try:
            if not self.remote:
                self.path.mkdir(parents=True, exist_ok=True)
            self.put_text("ok\n", probe)
            self.remove(probe)
        except Exception as e:  # noqa: BLE001 - any failure means the same to the user
            raise PermissionError(
                f"Cannot write to the output {self} ({type(e).__name__}: {e}). Choose a writable directory or "
                f"bucket (and credentials) for --output."
            ) from e


def is_prepared(output_dir: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """True only for a prepare that ran to the end (marker written after everything else)."""
    out = _Output(output_dir, storage_options)
    if out.remote:
        return out.exists(COMPLETE_MARKER)
    p = out.path
    return (
        (p / COMPLETE_MARKER).is_file()
        and (p / STATS_FILE).is_file()
        and all((p / name / "index.json").is_file() for name in SPLITS)
    )


def read_stats(
    output_dir: str | Path, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``prepare_stats.json`` of a finished prepare."""
    if not is_prepared(output_dir, storage_options):
        raise ValueError(
            f"{output_dir} is not a finished prepared dataset; run `orchestrator prepare`."
        )
    return json.loads(_Output(output_dir, storage_options).read_text(STATS_FILE))


# ------------------------------------------------------------------------------------------------
# Planning: which files, which splits, which parts
# ------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    index: int
    route: str  # "train", "val", or "holdout" (hash split into train and val)
    files: list[tuple[str, str, int]]  # (absolute path, label relative to the input, size in bytes)

    @property
    def size(self) -> int:
        return sum(f[2] for f in self.files)


def _route_inputs(input_path: Path, val_every: int) -> tuple[str, list[tuple[str, list[Path]]]]:
    """(layout, [(route, files)]) for the input."""
    if not input_path.exists():
        find_shards(input_path)  # raises the uniform "does not exist" message
    train_dir, val_dir = input_path / "train", input_path / "validation"
    if input_path.is_dir() and train_dir.is_dir():
        train_files = find_shards(train_dir)
        if val_dir.is_dir():
            return "slimpajama", [("train", train_files), ("val", find_shards(val_dir))]
        layout, files = "train_only_hash_holdout", train_files
    elif input_path.is_dir() and val_dir.is_dir():
        raise FileNotFoundError(
            f"{input_path} has a validation/ folder but no train/ folder. Put the training "
            f"shards in {train_dir} (SlimPajama layout)."
        )
    else:
        layout, files = "flat_hash_holdout", find_shards(input_path)
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 to hold out a validation split, got {val_every}.")
    return layout, [("holdout", files)]


def _auto_group_bytes(routes: list[tuple[str, list[Path]]]) -> int:
    """Part size for ``group_bytes="auto"``: about 256 parts (enough to keep any worker count busy
    and to make resuming cheap), but never above 16 MB of input (a SlimPajama shard is ~15 MB) nor
    below 64 KB (tiny files are grouped, so that chunk tails -- which TokensLoader cannot use --
    stay a negligible part of the data). Depends only on the input, never on the worker count."""
    total = sum(f.stat().st_size for _, files in routes for f in files)
    return min(16_000_000, max(64_000, total // 256))


def _make_parts(
    input_path: Path, routes: list[tuple[str, list[Path]]], group_bytes: int
) -> list[_Part]:
    base = input_path if input_path.is_dir() else input_path.parent
    parts: list[_Part] = []
    for route, files in routes:
        current: list[tuple[str, str, int]] = []
        for f in files:
            size = f.stat().st_size
            if current and sum(c[2] for c in current) + size > group_bytes:
                parts.append(_Part(len(parts), route, current))
                current = []
            current.append((str(f.resolve()), f.relative_to(base).as_posix(), size))
        if current:
            parts.append(_Part(len(parts), route, current))
    return parts


def _token_dtype(vocab_size: int, data_format: str = "text") -> np.dtype:
    if data_format == "instruction":  # ids with the loss flag (bit 30); litdata has no uint32
        return np.dtype(np.int32)
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """What a worker needs besides the part (sent once, at worker start)."""

    tokenizer_path: str
    options: PrepareOptions
    work_dir: str
    output: str | None  # URL for object-store output (chunks are uploaded per part), else None
    storage_options: dict[str, Any] = field(default_factory=dict)


_STATE: dict[str, Any] = {}


def _init_worker(job: _Job, progress_queue: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    _STATE.clear()
    _STATE.update(job=job, queue=progress_queue, tokenizer=Tokenizer(job.tokenizer_path))
    if job.output is not None:
        _STATE["output"] = _Output(job.output, job.storage_options)


class _Reporter:
    """Accumulates progress in a worker and sends it to the parent about twice a second."""

    def __init__(self, q: Any, callback: Any = None) -> None:
        self.q, self.callback = q, callback
        self.bytes = self.tokens = self.docs = 0
        self.last = time.monotonic()

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        self.maybe_flush()

    def maybe_flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        if self.bytes or self.tokens or self.docs:
            msg = (self.bytes, self.tokens, self.docs)
            if self.q is not None:
                self.q.put(msg)
            if self.callback is not None:
                self.callback(*msg)
            self.bytes = self.tokens = self.docs = 0


# Consecutive documents are stored together in one litdata item of about this many tokens: the
# writer's per-item cost (~15 us) would otherwise be a sizeable share of tokenizing a short
# document. Documents stay recoverable from the separators (see data.loader.read_documents);
# TokensLoader reads a chunk as one token stream anyway. An item never spans two chunks.
_ITEM_TOKENS = 16_384


class _SplitWriter:
    """litdata chunks of one split of one part, named chunk-<part>-<n>.bin."""

    def __init__(self, directory: Path, part_index: int, chunk_bytes: int) -> None:
        # Imported on first use: torch and litdata take seconds to import, and planning, resume
        # checks and input errors (which come first) need neither.
        import torch
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.writer import BinaryWriter

        self._from_numpy = torch.from_numpy
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = BinaryWriter(
            str(directory), chunk_bytes=chunk_bytes, item_loader=TokensLoader()
        )
        self.writer._rank = (
            part_index  # chunk file names: chunk-<part>-<n>.bin, unique across parts
        )
        self.directory = directory
        self.items = 0
        self.docs = 0
        self.tokens = 0
        self.loss_tokens = 0  # instruction data: tokens whose prediction counts in the loss
        self.sets: Counter[str] = Counter()
        self.pending: list[Any] = []
        self.pending_tokens = 0
        # Items stay well below a chunk, so chunks are filled to about chunk_bytes.
        self.item_tokens = max(1, min(_ITEM_TOKENS, chunk_bytes // 8))

    def add(self, tokens: Any, set_name: str, loss_tokens: int = 0) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.docs += 1
        self.tokens += len(tokens)
        self.loss_tokens += loss_tokens
        self.sets[set_name] += 1
        if self.pending_tokens >= self.item_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        item = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.writer.add_item(self.items, self._from_numpy(item))
        self.items += 1
        self.pending, self.pending_tokens = [], 0

    def finish(self) -> dict[str, Any]:
        self._flush()
        self.writer.done()
        # BinaryWriter also writes "<rank>.index.json"; the part record replaces it.
        for f in self.directory.glob("*.index.json"):
            f.unlink()
        # Each chunk's checksum, into its index.json entry: a chunk damaged later (truncated, bytes
        # flipped, locally or in an object store) is then an error when read (data.integrity).
        chunks = [
            {**c, CHECKSUM_KEY: file_checksum(self.directory / c["filename"])}
            for c in self.writer._chunks_info
        ]
        return {
            "chunks": chunks,
            "config": self.writer.get_config(),
            "docs": self.docs,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "sets": dict(sorted(self.sets.items())),
        }


def _is_held_out(text: str, val_every: int) -> bool:
    return zlib.crc32(text.encode("utf-8")) % val_every == 0


def _instruction_file(
    reader: ShardReader,
    part: _Part,
    tok: Tokenizer,
    opts: PrepareOptions,
    writers: dict[str, _SplitWriter],
    part_dir: Path,
    per_split: dict[str, dict[str, int]],
    reporter: _Reporter,
) -> None:
    """The examples of one instruction file into the part's writers (data.instructions)."""
    stats, label = reader.stats, reader.label
    encode, bos, eos = tok._sp.encode, tok.bos_id, tok.eos_id
    for record, set_name, line in reader.objects():
        try:
            example = to_example(record, opts.instruction_format)
        except BadRecord as e:
            stats.skip(e.reason, label, line)
            continue
        if set_name in opts.exclude_sets:
            stats.skip("excluded_set", label, line)
            continue
        arr = encode_example(example, encode, bos, eos)
        n = len(arr)
        if opts.max_tokens and n > opts.max_tokens:
            stats.skip("too_long", label, line)
            continue
        stats.docs += 1
        stats.sets[set_name] += 1
        loss_tokens = int(np.count_nonzero(arr & LOSS_FLAG))
        _emit(
            arr,
            set_name,
            example.text,
            part,
            opts,
            writers,
            part_dir,
            per_split,
            reporter,
            loss_tokens,
        )


def _emit(
    arr: np.ndarray,
    set_name: str,
    text: str,
    part: _Part,
    opts: PrepareOptions,
    writers: dict[str, _SplitWriter],
    part_dir: Path,
    per_split: dict[str, dict[str, int]],
    reporter: _Reporter,
    loss_tokens: int = 0,
) -> None:
    """One tokenized document (or instruction example) into its split's writer, counted."""
    if part.route == "holdout":
        split = "val" if _is_held_out(text, opts.val_every) else "train"
    else:
        split = part.route
    w = writers.get(split)
    if w is None:
        w = writers[split] = _SplitWriter(part_dir / split, part.index, opts.chunk_bytes)
    w.add(arr, set_name, loss_tokens)
    per_split[split]["docs"] += 1
    per_split[split]["tokens"] += len(arr)
    reporter.tokens += len(arr)
    reporter.docs += 1
    if not reporter.docs & 255:
        reporter.maybe_flush()


def _process_part(part: _Part, reporter: _Reporter | None = None) -> dict[str, Any]:
    """Tokenize one part into its own chunks; write and return its record."""
    job: _Job = _STATE["job"]
    tok: Tokenizer = _STATE["tokenizer"]
    opts = job.options
    reporter = reporter or _Reporter(_STATE.get("queue"))
    part_dir = Path(job.work_dir) / "parts" / f"{part.index:07d}"
    if part_dir.exists():  # left over from an interrupted run: redo the part from scratch
        shutil.rmtree(part_dir)
    before, after = tok.separator_ids(opts.separator)
    nb, na = len(before), len(after)
    dtype = _token_dtype(tok.vocab_size, opts.format)
    encode = tok._sp.encode
    record_filter = opts.record_filter()
    writers: dict[str, _SplitWriter] = {}
    files = []
    for path, label, _ in part.files:
        stats = SkipStats()
        per_split: dict[str, dict[str, int]] = {s: {"docs": 0, "tokens": 0} for s in SPLITS}
        reader = ShardReader(path, stats, record_filter, on_bytes=reporter.add_bytes, label=label)
        if opts.format == "instruction":
            _instruction_file(reader, part, tok, opts, writers, part_dir, per_split, reporter)
        for rec in reader if opts.format == "text" else ():
            ids = encode(rec.text)
            if len(ids) < opts.min_tokens:
                stats.docs -= 1
                stats.sets[rec.set_name] -= 1
                stats.skip("too_short", label, rec.line)
                continue
            n = len(ids) + nb + na
            arr = np.empty(n, dtype=dtype)
            if nb:
                arr[0] = before[0]
            arr[nb : n - na] = ids
            if na:
                arr[n - 1] = after[0]
            _emit(arr, rec.set_name, rec.text, part, opts, writers, part_dir, per_split, reporter)
        stats.sets = +stats.sets  # drop zero counts left by too_short
        d = stats.to_dict()
        files.append(
            {
                "file": label,
                "part": part.index,
                "docs": {s: v["docs"] for s, v in per_split.items() if v["docs"]},
                "tokens": {s: v["tokens"] for s, v in per_split.items() if v["tokens"]},
                "skipped": {r: c for r, c in d["skipped"].items() if c},
                "skip_locations": d["skip_locations"],
                "sets": d["sets"],
                "error": reader.error,
            }
        )
    splits = {name: w.finish() for name, w in sorted(writers.items())}
    output: _Output | None = _STATE.get("output")
    if output is not None:  # object store: upload now, keep the local disk small
        for name, s in splits.items():
            for chunk in s["chunks"]:
                local = part_dir / name / chunk["filename"]
                output.upload(local, name, chunk["filename"])
                local.unlink()
    record = {"part": part.index, "route": part.route, "files": files, "splits": splits}
    dest = Path(job.work_dir) / "parts" / f"{part.index:07d}.json"
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, dest)  # the part is done only once this exists
    reporter.maybe_flush(force=True)
    return record


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class _Progress:
    """One status line: parts, input bytes, tokens, tokens/s and ETA (by input bytes)."""

    def __init__(
        self,
        enabled: bool,
        total_parts: int,
        done_parts: int,
        total_bytes: int,
        done_bytes: int,
        tokens: int,
        stream: Any = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_parts, self.done_parts = total_parts, done_parts
        self.total_bytes, self.bytes = total_bytes, done_bytes
        self.start_bytes = done_bytes
        self.tokens, self.start_tokens = tokens, tokens
        self.t0 = time.monotonic()
        self.last_print = 0.0

    def add(self, nbytes: int, tokens: int, docs: int) -> None:
        del docs
        self.bytes += nbytes
        self.tokens += tokens
        self.show()

    def part_done(self) -> None:
        self.done_parts += 1
        self.show()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate_tokens = (self.tokens - self.start_tokens) / elapsed
        rate_bytes = (self.bytes - self.start_bytes) / elapsed
        eta = (self.total_bytes - self.bytes) / rate_bytes if rate_bytes > 0 else float("nan")
        pct = 100.0 * self.bytes / max(self.total_bytes, 1)
        unit, div = ("GB", 1e9) if self.total_bytes >= 1e9 else ("MB", 1e6)
        return (
            f"prepare {pct:5.1f}% | parts {self.done_parts}/{self.total_parts} | "
            f"{self.bytes / div:.2f}/{self.total_bytes / div:.2f} {unit} | {self.tokens:,} tokens | "
            f"{_fmt_count(rate_tokens)} tok/s | ETA {format_duration(eta)}"
        )

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last_print < (0.5 if self.tty else 10.0):
            return
        self.last_print = now
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------
# The prepare
# ------------------------------------------------------------------------------------------------


def _check_same_inputs(existing: dict[str, Any], fingerprint: dict[str, Any], out: Any) -> None:
    """A finished prepare is reused only for the same corpus, tokenizer and settings: token ids
    from another tokenizer would silently train the model on the wrong vocabulary."""
    problems = []
    if existing.get("input_dir") != fingerprint["input_dir"]:
        problems.append(f"input {existing.get('input_dir')} (now {fingerprint['input_dir']})")
    if existing.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        problems.append(
            f"a different tokenizer ({existing.get('tokenizer_path')}, now {fingerprint['tokenizer_path']})"
        )
    old_opts = existing.get("options")
    if old_opts is not None:
        old_opts = {**_OPTION_DEFAULTS, **old_opts}  # made before those options existed
    if old_opts is not None and old_opts != fingerprint["options"]:
        changed = sorted(
            k for k in fingerprint["options"] if old_opts.get(k) != fingerprint["options"][k]
        )
        problems.append(
            "other settings ("
            + ", ".join(
                f"{k}={old_opts.get(k)!r}, now {fingerprint['options'][k]!r}" for k in changed
            )
            + ")"
        )
    elif old_opts is None and existing.get("val_every") not in (
        None,
        fingerprint["options"]["val_every"],
    ):
        problems.append(
            f"val_every={existing.get('val_every')} (now {fingerprint['options']['val_every']})"
        )
    if problems:
        raise ValueError(
            f"{out} was already prepared from {' and '.join(problems)}. Use another output "
            f"directory, or pass overwrite=True (`orchestrator prepare --overwrite`) to redo it."
        )


def prepare_dataset(options: PrepareOptions) -> dict[str, Any]:
    """Tokenize ``options.input_dir`` into ``options.output_dir/{train,val}``; return the stats dict.

    A finished output is returned as is unless ``overwrite`` (and refused if it was made from
    other inputs, tokenizer or settings); with ``repair`` its damaged chunks are verified and made
    again (the stats get ``"repaired": [chunk, ...]``). An unfinished one is resumed: parts already
    done are kept. With ``max_parts`` the call may stop early and return
    ``{"finished": False, "parts_done": ..., "parts": ...}``.
    """
    run = _resolve(options)  # cheap checks first: nothing is created before the inputs are usable
    if is_prepared(options.output_dir, options.storage_options) and not options.overwrite:
        return _finished(run)
    run.out.check_writable()
    work = _stage(run)
    records = _run_pending(run, work)
    if len(records) < len(run.parts):
        return {"finished": False, "parts_done": len(records), "parts": len(run.parts)}
    return _publish(run, work, records)


@dataclass
class _Run:
    """A prepare's inputs, resolved and checked, and its fingerprint."""

    options: PrepareOptions  # group_bytes resolved
    out: _Output
    tokenizer: Tokenizer
    num_workers: int
    layout: str
    parts: list[_Part]
    fingerprint: dict[str, Any]  # as it reads back from plan.json / prepare_stats.json

    def job(self, work_dir: str, upload: bool) -> _Job:
        """What the workers need; ``upload``: they upload each part's chunks to the object store."""
        url = self.out.url if upload else None
        storage = dict(self.options.storage_options or {})
        return _Job(self.fingerprint["tokenizer_path"], self.options, work_dir, url, storage)


def _resolve(options: PrepareOptions) -> _Run:
    """Check the settings, the tokenizer and the input; cut the input into parts; fingerprint."""
    opts = options
    in_path, tok_path = Path(opts.input_dir), Path(opts.tokenizer_path)
    out = _Output(opts.output_dir, opts.storage_options)
    opts.validate()
    if not tok_path.is_file():
        raise FileNotFoundError(
            f"Tokenizer model {tok_path} not found. Train one first with `orchestrator tokenizer`."
        )
    tokenizer = Tokenizer(tok_path)
    tokenizer.separator_ids(opts.separator)  # the separator's tokens exist
    num_workers = opts.num_workers if opts.num_workers is not None else os.cpu_count() or 1
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    layout, routes = _route_inputs(in_path, opts.val_every)  # raises for a missing/empty input
    if opts.group_bytes == "auto":
        opts = replace(opts, group_bytes=_auto_group_bytes(routes))
    parts = _make_parts(in_path, routes, opts.group_bytes)
    fingerprint = {
        "format_version": _FORMAT_VERSION,
        "input_dir": str(in_path.resolve()),
        "tokenizer_path": str(tok_path.resolve()),
        "tokenizer_sha256": file_sha256(tok_path),
        "options": opts.output_settings(),
        "files": [
            [label, size, os.stat(path).st_mtime_ns] for p in parts for path, label, size in p.files
        ],
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples -> lists)
    return _Run(opts, out, tokenizer, num_workers, layout, parts, fingerprint)


def _finished(run: _Run) -> dict[str, Any]:
    """A finished output: its stats if made from the same inputs and settings (else an error),
    after repairing its damaged chunks if asked to."""
    opts, out = run.options, run.out
    existing = read_stats(opts.output_dir, opts.storage_options)
    _check_same_inputs(existing, run.fingerprint, out)
    if opts.repair:  # _repair puts the chunks in place itself
        job = run.job("", upload=False)
        return _repair(out, existing, run.parts, job, opts.work_dir, run.num_workers)
    return existing


def _stage(run: _Run) -> Path:
    """The staging folder of this fingerprint (a folder of another one is started over)."""
    out = run.out
    if run.options.work_dir is not None:
        work = Path(run.options.work_dir)
    elif out.remote:
        key = hashlib.sha256(out.url.encode()).hexdigest()[:16]
        work = Path.home() / ".cache" / "orchestrator" / "prepare" / key
    else:
        work = out.path / _WORK_DIR
    plan_file = work / "plan.json"
    plan_text = json.dumps(run.fingerprint, sort_keys=True)
    if not (plan_file.is_file() and plan_file.read_text() == plan_text):
        shutil.rmtree(work, ignore_errors=True)  # another plan (or none): start over
    (work / "parts").mkdir(parents=True, exist_ok=True)
    plan_file.write_text(plan_text)
    if out.remote and run.options.overwrite:
        out.remove(COMPLETE_MARKER)  # remote chunks are replaced in place: the old dataset ends now
    return work


def _run_pending(run: _Run, work: Path) -> dict[int, dict[str, Any]]:
    """Tokenize the parts without a record (at most max_parts of them); every part's record."""
    parts, opts = run.parts, run.options
    records: dict[int, dict[str, Any]] = {}
    for p in parts:
        f = work / "parts" / f"{p.index:07d}.json"
        if f.is_file():
            records[p.index] = json.loads(f.read_text())
    pending = sorted((p for p in parts if p.index not in records), key=lambda p: (-p.size, p.index))
    if opts.max_parts is not None:
        pending = pending[: opts.max_parts]
    bar = _Progress(
        opts.progress,
        len(parts),
        len(records),
        sum(p.size for p in parts),
        sum(p.size for p in parts if p.index in records),
        _record_tokens(records),
    )
    job = run.job(str(work), upload=True)
    _run_parts(pending, job, run.num_workers, opts.start_method, bar, records)
    bar.tokens = _record_tokens(records)  # exact, not streamed
    bar.show(final=True)
    return records


def _record_tokens(records: dict[int, dict[str, Any]]) -> int:
    return sum(s["tokens"] for r in records.values() for s in r["splits"].values())


def _publish(run: _Run, work: Path, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """All parts done: the stats, checked for an empty split, then the output in place."""
    stats = _summarize(records, run.parts, run.fingerprint, run.layout, run.tokenizer, run.options)
    for split in SPLITS:
        if stats["splits"][split]["docs"] == 0:
            holdout = split == "val" and run.layout != "slimpajama"
            hint = " (hash holdout: lower --val-every)" if holdout else ""
            raise ValueError(
                f"Split {split!r} of {Path(run.options.input_dir)} has no usable documents{hint} "
                f"(skipped records: {stats['skipped']}). Check the input files; staged parts stay in {work}."
            )
    _merge(run.out, work, records, run.parts, stats)
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _repair(
    out: _Output,
    stats: dict[str, Any],
    parts: list[_Part],
    job: _Job,
    work_dir: str | Path | None,
    num_workers: int,
) -> dict[str, Any]:
    """Tokenize again the parts whose chunks are damaged and put their chunks back in place, each
    checked against the checksum its index recorded (a part's bytes depend only on its files and
    the settings, which _check_same_inputs has compared)."""
    from data.integrity import CHECKSUM_KEY, damaged_chunks

    report = damaged_chunks(str(out), out.storage_options, num_workers)
    todo = {int(name.split("-")[1]) for _, name, _ in report}
    if not todo:
        return {**stats, "repaired": []}
    indexes = {s: json.loads(out.read_text(s, "index.json")) for s in SPLITS}
    recorded = {(s, c["filename"]): c for s in SPLITS for c in indexes[s]["chunks"]}
    missing = [f"{s}/{n}" for s, n, _ in report if CHECKSUM_KEY not in recorded[(s, n)]]
    if missing:
        raise ValueError(
            f"{out}: {', '.join(missing)} damaged, and prepared before checksums were recorded: "
            "nothing to check a repair against. Prepare it again with --overwrite."
        )
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="prepare-repair-"))
    job = replace(job, work_dir=str(work))
    _init_state_in_process(job)
    try:
        for p in parts:
            if p.index not in todo:
                continue
            for split, s in _process_part(p, _Reporter(None))["splits"].items():
                for c in s["chunks"]:
                    want = recorded.get((split, c["filename"]), {})
                    if c[CHECKSUM_KEY] != want.get(CHECKSUM_KEY):
                        raise ValueError(
                            f"{out}: part {p.index} ({', '.join(f[1] for f in p.files)}) no longer "
                            f"makes the chunk {split}/{c['filename']} it recorded (changed input "
                            "files?). Prepare it again with --overwrite."
                        )
                    local = work / "parts" / f"{p.index:07d}" / split / c["filename"]
                    if out.remote:
                        out.upload(local, split, c["filename"])
                    else:
                        os.replace(local, out.path / split / c["filename"])
    finally:
        _STATE.clear()
        shutil.rmtree(work, ignore_errors=True)
    return {**stats, "repaired": [f"{s}/{n}" for s, n, _ in report]}


def _run_parts(
    pending: list[_Part],
    job: _Job,
    num_workers: int,
    start_method: str | None,
    bar: _Progress,
    records: dict[int, dict[str, Any]],
) -> None:
    if not pending:
        return
    # Import the chunk writer here, once: forked workers inherit it instead of each importing
    # litdata (seconds per worker on a busy machine).
    import litdata.streaming.writer  # noqa: F401

    workers = min(num_workers, len(pending))
    if workers == 1:  # in this process: no start-up cost, same bytes
        _init_state_in_process(job)
        reporter = _Reporter(None, callback=bar.add)
        try:
            for p in pending:
                records[p.index] = _process_part(p, reporter)
                bar.part_done()
        finally:
            _STATE.clear()
        return
    # fork where available: spawn re-imports torch in every worker (seconds each) and needs an
    # `if __name__ == "__main__"` guard in whatever script calls us.
    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else None)
    ctx = mp.get_context(method)
    q = ctx.Queue()
    failures: list[BaseException] = []
    with ctx.Pool(
        workers, initializer=_init_worker, initargs=(job, q), maxtasksperchild=None
    ) as pool:
        results = [(p, pool.apply_async(_process_part, (p,))) for p in pending]
        try:
            remaining = list(results)
            while remaining:
                _drain(q, bar, timeout=0.2)
                still = []
                for p, r in remaining:
                    if not r.ready():
                        still.append((p, r))
                        continue
                    try:
                        records[p.index] = r.get()
                        bar.part_done()
                    except Exception as e:  # noqa: BLE001 - re-raised below with the part's files
                        failures.append(
                            RuntimeError(
                                f"Tokenizing {', '.join(f[1] for f in p.files)} failed: {type(e).__name__}: {e}"
                            )
                        )
                remaining = still
                if failures:
                    pool.terminate()
                    break
            _drain(q, bar, timeout=0)
        except BaseException:
            pool.terminate()
            raise
    if failures:
        raise failures[0]


def _init_state_in_process(job: _Job) -> None:
    _STATE.clear()
    _STATE.update(job=job, queue=None, tokenizer=Tokenizer(job.tokenizer_path))
    if job.output is not None:
        _STATE["output"] = _Output(job.output, job.storage_options)


def _drain(q: Any, bar: _Progress, timeout: float) -> None:
    try:
        msg = q.get(timeout=timeout) if timeout else q.get_nowait()
        bar.add(*msg)
        while True:
            bar.add(*q.get_nowait())
    except queue.Empty:
        pass


def _summarize(
    records: dict[int, dict[str, Any]],
    parts: list[_Part],
    fingerprint: dict[str, Any],
    layout: str,
    tokenizer: Tokenizer,
    opts: PrepareOptions,
) -> dict[str, Any]:
    totals = SkipStats()
    split_skips = {s: SkipStats() for s in SPLITS}
    split_docs = {
        s: {"docs": 0, "tokens": 0, "loss_tokens": 0, "chunks": 0, "files": 0, "sets": Counter()}
        for s in SPLITS
    }
    files = []
    for p in parts:
        rec = records[p.index]
        for f in rec["files"]:
            fs = SkipStats(
                skipped=Counter(f["skipped"]),
                locations={k: list(v) for k, v in f["skip_locations"].items()},
            )
            totals.merge(fs)
            # Skips belong to a file; for a hash holdout they are reported with train.
            split_skips["val" if p.route == "val" else "train"].merge(fs)
            split_docs["val" if p.route == "val" else "train"]["files"] += 1
            files.append(f)
        for name, s in rec["splits"].items():
            d = split_docs[name]
            d["docs"] += s["docs"]
            d["tokens"] += s["tokens"]
            d["loss_tokens"] += s.get("loss_tokens", 0)
            d["chunks"] += len(s["chunks"])
            d["sets"].update(s["sets"])
    splits = {}
    for name in SPLITS:
        d, sk = split_docs[name], split_skips[name].to_dict()
        splits[name] = {
            "files": d["files"],
            "docs": d["docs"],
            "tokens": d["tokens"],
            **({"loss_tokens": d["loss_tokens"]} if opts.format == "instruction" else {}),
            "chunks": d["chunks"],
            "skipped": sk["skipped"],
            "skipped_total": sk["skipped_total"],
            "sets": dict(sorted(d["sets"].items())),
            "skip_locations": sk["skip_locations"],
        }
    totals.docs = sum(d["docs"] for d in split_docs.values())
    t = totals.to_dict()
    instruction = {"loss_mask_bit": LOSS_MASK_BIT} if opts.format == "instruction" else {}
    return {
        "format_version": _FORMAT_VERSION,
        "format": opts.format,  # "text" or "instruction" (absent in older files: text)
        **instruction,
        "input_dir": fingerprint["input_dir"],
        "tokenizer_path": fingerprint["tokenizer_path"],
        "tokenizer_sha256": fingerprint["tokenizer_sha256"],
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": str(_token_dtype(tokenizer.vocab_size, opts.format)),
        "layout": layout,
        "val_every": opts.val_every if layout != "slimpajama" else None,
        "separator": opts.separator,
        "options": fingerprint["options"],
        "parts": len(parts),
        "docs": totals.docs,
        "tokens": sum(d["tokens"] for d in split_docs.values()),
        "skipped": t["skipped"],
        "skipped_total": t["skipped_total"],
        "skip_locations": t["skip_locations"],
        "splits": splits,
        "files": files,
    }


def _merge(
    out: _Output,
    work: Path,
    records: dict[int, dict[str, Any]],
    parts: list[_Part],
    stats: dict[str, Any],
) -> None:
    """Publish: chunks into place, one index.json per split, stats, then the marker."""
    started = work / "merge_started"
    if not started.exists():
        # From here on the old dataset (if any) is replaced; it stayed usable until now.
        out.remove(COMPLETE_MARKER)
        out.remove(STATS_FILE)
        if not out.remote:
            for split in SPLITS:
                out.remove(split)
        started.write_text("ok\n")
    for split in SPLITS:
        chunks: list[dict[str, Any]] = []
        config = None
        for p in parts:  # file order: the index (and an unshuffled loader) follows the input order
            s = records[p.index]["splits"].get(split)
            if s is None:
                continue
            if config is None:
                config = s["config"]
            elif config["data_format"] != s["config"]["data_format"]:
                raise RuntimeError(
                    f"part {p.index} was written with data format {s['config']['data_format']}, "
                    f"others with {config['data_format']}; rerun with --overwrite"
                )
            for c in s["chunks"]:
                if not out.remote:
                    src = work / "parts" / f"{p.index:07d}" / split / c["filename"]
                    dst = out.path / split / c["filename"]
                    if src.exists():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(
                            src, dst
                        )  # a rename on one filesystem (--work-dir may be elsewhere)
                    elif not dst.exists():
                        raise RuntimeError(
                            f"chunk {src} of a finished part is missing; rerun with --overwrite"
                        )
                chunks.append(c)
        out.put_text(
            json.dumps(
                {"chunks": chunks, "config": config, "updated_at": str(time.time())}, sort_keys=True
            ),
            split,
            "index.json",
        )
    out.put_text(json.dumps(stats, indent=1) + "\n", STATS_FILE)
    out.put_text("ok\n", COMPLETE_MARKER)  # last: marks everything above as finished
