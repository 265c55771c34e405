"""Reading raw corpus files: JSON lines (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``) and Parquet.

SlimPajama ships ``*.jsonl.zst`` (``{"text": ..., "meta": {"redpajama_set_name": ...}}``);
StarCoder ships Parquet with the document in a ``content`` column. Both are read as a stream
of :class:`Record` (text, set name, line), whatever the file size: JSON lines are decompressed
in ~1 MiB pieces and Parquet is read one record batch at a time, so memory stays flat.
Instruction data reads whole records instead (:meth:`ShardReader.objects`; data/instructions.py
says which are examples).

Nothing is dropped silently. Every record that does not become a document is counted by
reason in a :class:`SkipStats`, together with the file and line of the first few of each
reason, so that a damaged shard shows up as numbers in ``prepare_stats.json`` instead of as a
quietly smaller dataset. A damaged *file* does not stop the reader either: records before the
damage are kept and the rest of the file is counted as one ``truncated_file`` /
``corrupt_file`` skip at the line where it broke.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import zstandard

__all__ = [
    "SHARD_SUFFIXES",
    "SKIP_REASONS",
    "FILTER_REASONS",
    "Record",
    "RecordFilter",
    "ShardReader",
    "SkipStats",
    "find_shards",
    "iter_documents",
    "iter_records",
]

SHARD_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet")

# Why a record did not become a document. Fixed names so stats from different runs compare.
SKIP_REASONS = (
    "blank_line",  # an empty / whitespace-only line
    "invalid_utf8",  # the line's bytes are not UTF-8
    "invalid_json",  # the line does not parse as JSON
    "missing_text",  # valid JSON, but not an object with a string text field (or a null Parquet cell)
    "empty_text",  # the text has no non-whitespace character
    "excluded_set",  # meta.redpajama_set_name is one of the excluded subsets (a filter)
    "too_short",  # shorter than the minimum length in characters or tokens (a filter)
    "truncated_file",  # the compressed stream ends early: the rest of the file is lost (counted once)
    "corrupt_file",  # undecodable compressed data / unreadable Parquet: the rest of the file (counted once)
    "unreadable_file",  # the file could not be opened or read (permissions, I/O error)
    # Instruction data (``prepare --format instruction``, data.instructions):
    "unknown_format",  # not an object with the keys of any instruction format (auto-detection)
    "missing_field",  # a field of the record's format is missing or of the wrong type
    "empty_response",  # the response (a target, an output, an assistant turn) has no non-whitespace character
    "no_response",  # a chat without an assistant turn
    "too_long",  # more tokens than the maximum (prepare --max-tokens) (a filter)
)
# Reasons that are choices of the user rather than damage in the input.
FILTER_REASONS = ("excluded_set", "too_short", "too_long")
# File and line of at most this many records per reason are kept (counts are always exact).
MAX_LOCATIONS = 20

_READ_SIZE = 1 << 20
_PARQUET_BATCH_ROWS = 1024


class Record(NamedTuple):
    text: str
    set_name: str  # meta.redpajama_set_name, "unknown" when absent
    line: int  # 1-based line (JSON lines) or row (Parquet) in the file


@dataclass
class SkipStats:
    """Documents kept, records skipped (by reason, with the first locations), documents per set."""

    docs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # Documents per meta.redpajama_set_name ("unknown" when absent): useful for mixtures.
    sets: Counter[str] = field(default_factory=Counter)
    # reason -> ["file:line", ...] (the first MAX_LOCATIONS of each reason)
    locations: dict[str, list[str]] = field(default_factory=dict)

    def skip(
        self, reason: str, file: str | Path | None = None, line: int | None = None, count: int = 1
    ) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.skipped[reason] += count
        if file is not None:
            where = self.locations.setdefault(reason, [])
            if len(where) < MAX_LOCATIONS:
                where.append(f"{file}:{line}" if line is not None else str(file))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SkipStats) -> None:
        self.docs += other.docs
        self.skipped.update(other.skipped)
        self.sets.update(other.sets)
        for reason, where in other.locations.items():
            mine = self.locations.setdefault(reason, [])
            mine.extend(where[: max(0, MAX_LOCATIONS - len(mine))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "skipped_total": self.total_skipped,
            "sets": dict(sorted(self.sets.items())),
            "skip_locations": {
                r: list(self.locations[r]) for r in SKIP_REASONS if self.locations.get(r)
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipStats:
        return cls(
            docs=int(d["docs"]),
            skipped=Counter({k: v for k, v in d.get("skipped", {}).items() if v}),
            sets=Counter(d.get("sets", {})),
            locations={k: list(v) for k, v in d.get("skip_locations", {}).items()},
        )


@dataclass(frozen=True)
class RecordFilter:
    """Which field holds the text and which documents to keep."""

    text_field: str = (
        "text"  # SlimPajama: "text"; StarCoder: "content". Dotted for nested JSON keys.
    )
    exclude_sets: frozenset[str] = (
        frozenset()
    )  # meta.redpajama_set_name values to drop (e.g. RedPajamaGithub)
    min_chars: int = 0  # documents with fewer characters (after stripping whitespace) are dropped

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must be a non-empty field name (e.g. text or content).")
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}.")
        object.__setattr__(self, "exclude_sets", frozenset(self.exclude_sets))


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def find_shards(directory: str | Path) -> list[Path]:
    """All corpus files under ``directory`` (recursive, sorted by path); a single file is itself."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(
            f"Input directory {d} does not exist. Point it at a folder of .jsonl, .jsonl.zst, .jsonl.gz or "
            f".parquet files (SlimPajama layout: train/ and validation/), or create the built-in sample corpus "
            f"with `orchestrator sample-data`."
        )
    if d.is_file():
        if not d.name.endswith(SHARD_SUFFIXES):
            raise ValueError(f"Input file {d} is not one of {', '.join(SHARD_SUFFIXES)}.")
        return [d]
    shards = sorted(p for p in d.rglob("*") if _is_shard(p))
    if not shards:
        raise FileNotFoundError(
            f"No .jsonl, .jsonl.zst, .jsonl.gz or .parquet files found under {d}. Expected SlimPajama-style "
            f"files such as {d}/train/chunk1/example_train_0.jsonl.zst (or StarCoder's *.parquet)."
        )
    return shards


# ------------------------------------------------------------------------------------------------
# Byte streams
# ------------------------------------------------------------------------------------------------


class _Damaged(Exception):
    """The file's compressed stream is damaged; ``reason`` is a SKIP_REASONS entry."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _CountingReader:
    """Wraps a binary file and counts the (compressed) bytes read, for progress reporting."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        self.raw = raw
        self.on_bytes = on_bytes

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data


def _zstd_pieces(raw: _CountingReader) -> Iterator[bytes]:
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
        raise _Damaged("corrupt_file", f"corrupt zstd data: {e}") from e
    if in_frame:
        raise _Damaged("truncated_file", "the last zstd frame is incomplete")


def _gzip_pieces(raw: _CountingReader) -> Iterator[bytes]:
    """Decompress a (possibly multi-member) gzip stream piece by piece, detecting truncation."""
    dobj = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    in_member = False
    try:
        while data := raw.read(_READ_SIZE):
            while data:
                out = dobj.decompress(data)
                in_member = True
                if out:
                    yield out
                if dobj.eof:
                    data = dobj.unused_data
                    dobj = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                    in_member = False
                else:
                    data = b""
        if in_member:
            tail = dobj.flush()
            if tail:
                yield tail
            raise _Damaged("truncated_file", "the last gzip member is incomplete")
    except zlib.error as e:
        raise _Damaged("corrupt_file", f"corrupt gzip data: {e}") from e


def _plain_pieces(raw: _CountingReader) -> Iterator[bytes]:
    while data := raw.read(_READ_SIZE):
        yield data


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def _get_field(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _set_name_of(meta: Any) -> str:
    if isinstance(meta, str):  # some exports store meta as a JSON string
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return "unknown"
    name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else "unknown"


class ShardReader:
    """Iterate the :class:`Record` of one corpus file, counting every skip in ``stats``.

    ``on_bytes(n)`` is called with the number of raw (compressed) bytes consumed as reading
    proceeds; ``label`` is how the file is named in skip locations (default: its path).
    """

    def __init__(
        self,
        path: str | Path,
        stats: SkipStats | None = None,
        filter: RecordFilter | None = None,
        on_bytes: Callable[[int], None] | None = None,
        label: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.stats = stats if stats is not None else SkipStats()
        self.filter = filter or RecordFilter()
        self.on_bytes = on_bytes
        self.label = label or str(self.path)

    def __iter__(self) -> Iterator[Record]:
        if not self.path.is_file():
            raise FileNotFoundError(f"Shard {self.path} does not exist or is not a file.")
        if self.path.name.endswith(".parquet"):
            yield from self._parquet()
        else:
            yield from self._jsonl()

    # -- filters shared by both formats --------------------------------------------------------

    def _keep(self, text: Any, set_name: str, line: int) -> bool:
        st, f = self.stats, self.filter
        if not isinstance(text, str):
            st.skip("missing_text", self.label, line)
            return False
        if not text or text.isspace():
            st.skip("empty_text", self.label, line)
            return False
        if set_name in f.exclude_sets:
            st.skip("excluded_set", self.label, line)
            return False
        if f.min_chars and len(text.strip()) < f.min_chars:
            st.skip("too_short", self.label, line)
            return False
        st.docs += 1
        st.sets[set_name] += 1
        return True

    # -- JSON lines ----------------------------------------------------------------------------

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line without its line ending); damage ends the file with one skip."""
        name = self.path.name
        line_no = 0
        try:
            raw_file = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            self.stats.skip("unreadable_file", self.label, 0)
            self.error = f"{type(e).__name__}: {e}"
            return
        with raw_file:
            raw = _CountingReader(raw_file, self.on_bytes)
            if name.endswith(".zst"):
                pieces = _zstd_pieces(raw)
            elif name.endswith(".gz"):
                pieces = _gzip_pieces(raw)
            else:
                pieces = _plain_pieces(raw)
            pending = b""
            try:
                for piece in pieces:
                    lines = (pending + piece).split(b"\n")
                    pending = lines.pop()  # possibly incomplete last line
                    for line in lines:
                        line_no += 1
                        yield line_no, line.rstrip(b"\r")
            except _Damaged as e:
                # The partial line before the damage is part of what was lost.
                self.stats.skip(e.reason, self.label, line_no + 1)
                self.error = str(e)
                return
            except OSError as e:
                self.stats.skip("unreadable_file", self.label, line_no + 1)
                self.error = f"{type(e).__name__}: {e}"
                return
            if pending:
                yield line_no + 1, pending.rstrip(b"\r")

    def _jsonl(self) -> Iterator[Record]:
        st = self.stats
        text_field = self.filter.text_field
        simple = "." not in text_field
        for line_no, raw in self._lines():
            if not raw.strip():
                st.skip("blank_line", self.label, line_no)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                st.skip("invalid_utf8", self.label, line_no)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                st.skip("invalid_json", self.label, line_no)
                continue
            if not isinstance(record, dict):
                st.skip("missing_text", self.label, line_no)
                continue
            text = record.get(text_field) if simple else _get_field(record, text_field)
            meta = record.get("meta")
            name = meta.get("redpajama_set_name") if type(meta) is dict else None
            set_name = name if type(name) is str else _set_name_of(meta)
            if self._keep(text, set_name, line_no):
                yield Record(text, set_name, line_no)

    # -- Whole records (instruction data) -----------------------------------------------------

    def objects(self) -> Iterator[tuple[Any, str, int]]:
        """``(record, set name, line)`` for every parsed record, whatever its fields: a JSON value
        (usually an object) of a JSON line, or a Parquet row as a dict of all its columns. Lines
        that are blank, not UTF-8 or not JSON, and damaged files, are counted as in ``__iter__``;
        what the record's fields mean is the caller's to judge (and count): nothing is counted
        as kept here, and the text field, subset and length filters do not apply."""
        if not self.path.is_file():
            raise FileNotFoundError(f"Shard {self.path} does not exist or is not a file.")
        if self.path.name.endswith(".parquet"):
            yield from self._parquet_rows()
            return
        st = self.stats
        for line_no, raw in self._lines():
            if not raw.strip():
                st.skip("blank_line", self.label, line_no)
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                st.skip("invalid_utf8", self.label, line_no)
                continue
            except json.JSONDecodeError:
                st.skip("invalid_json", self.label, line_no)
                continue
            meta = record.get("meta") if isinstance(record, dict) else None
            yield record, _set_name_of(meta) if meta is not None else "unknown", line_no

    def _parquet_rows(self) -> Iterator[tuple[Any, str, int]]:
        import pyarrow as pa

        st = self.stats
        pf = self._open_parquet()
        if pf is None:
            return
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    row += 1
                    meta = record.get("meta")
                    yield record, _set_name_of(meta) if meta is not None else "unknown", row
        except (pa.ArrowException, OSError) as e:
            st.skip("corrupt_file", self.label, row + 1)
            self.error = f"{type(e).__name__}: {e}"

    # -- Parquet -------------------------------------------------------------------------------

    def _open_parquet(self):
        """The file as a pyarrow ParquetFile, its size reported up front (Parquet is read by row
        group); None, counted as a corrupt file, when pyarrow cannot open it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            self.stats.skip("corrupt_file", self.label, 0)
            self.error = f"{type(e).__name__}: {e}"
            return None
        if self.on_bytes is not None:
            self.on_bytes(self.path.stat().st_size)
        return pf

    def _parquet(self) -> Iterator[Record]:
        # pyarrow: a large import that only Parquet corpora (StarCoder) need.
        import pyarrow as pa

        st = self.stats
        text_field = self.filter.text_field
        pf = self._open_parquet()
        if pf is None:
            return
        names = pf.schema_arrow.names
        if text_field not in names:
            # Every row lacks the field: count them all (one location) rather than fail.
            st.skip("missing_text", self.label, 1, count=pf.metadata.num_rows)
            self.error = f"no column {text_field!r} (columns: {', '.join(names)})"
            return
        columns = [text_field] + (["meta"] if "meta" in names else [])
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                texts = batch.column(0).to_pylist()
                metas: Iterable[Any] = (
                    batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                )
                for text, meta in zip(texts, metas, strict=True):
                    row += 1
                    set_name = _set_name_of(meta) if meta is not None else "unknown"
                    if self._keep(text, set_name, row):
                        yield Record(text, set_name, row)
        except (pa.ArrowException, OSError) as e:
            st.skip("corrupt_file", self.label, row + 1)
            self.error = f"{type(e).__name__}: {e}"

    error: str | None = None  # what damaged the file, if anything (for reports)


def iter_records(
    path: str | Path, stats: SkipStats | None = None, filter: RecordFilter | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(text, set_name)`` for every kept record of one file, counting skips in ``stats``."""
    for rec in ShardReader(path, stats, filter):
        yield rec.text, rec.set_name


def iter_documents(
    path: str | Path, stats: SkipStats | None = None, filter: RecordFilter | None = None
) -> Iterator[str]:
    """Yield the text of every kept record of one file, counting skips in ``stats``."""
    for rec in ShardReader(path, stats, filter):
        yield rec.text
