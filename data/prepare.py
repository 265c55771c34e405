"""Tokenize JSONL shards into litdata token chunks (one dataset per split).

Output layout::

    output_dir/train/index.json + chunk-*.bin      (litdata, TokensLoader format)
    output_dir/val/index.json   + chunk-*.bin
    output_dir/prepare_stats.json                  (docs, tokens, skipped-by-reason per split)
    output_dir/_COMPLETE                           (written last; see is_prepared)

Every document becomes ``[bos] + ids + [eos]``; the token stream of a split is the
concatenation of these, which ``TokensLoader(block_size=seq_len + 1)`` cuts into blocks.

Splits:

* SlimPajama layout (``input_dir/train`` and ``input_dir/validation``): used as they are
  (``validation`` -> ``val``; ``test/`` is ignored).
* ``input_dir/train`` without ``validation/``, or a flat folder of shards: validation is
  held out by content hash -- a document goes to ``val`` iff ``crc32(text) % val_every == 0``
  (about 1/val_every of documents). The rule depends only on the text, so it is the same for
  any number of workers and any sharding, and exact duplicates never straddle the split.

Workers are forked (where available) rather than spawned: see ``prepare_dataset``. A bad
shard (corrupt zstd, unreadable file) fails the whole prepare with the shard's path; bad
*lines* are skipped and counted by reason (``data.shards.SKIP_REASONS``).

Token ids are stored as ``uint16`` when the vocabulary fits (``vocab_size <= 65536``,
halving disk and I/O versus int32) and as ``int32`` otherwise; ``make_dataloader``
returns int64 batches either way. The dtype is recorded in ``prepare_stats.json``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import signal
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.shards import SkipStats, find_shards, iter_records
from data.tokenizer import Tokenizer

__all__ = ["COMPLETE_MARKER", "STATS_FILE", "is_prepared", "prepare_dataset", "read_stats"]

COMPLETE_MARKER = "_COMPLETE"
STATS_FILE = "prepare_stats.json"
# Input split folder (SlimPajama) -> output dataset folder (what the trainer reads).
SPLIT_DIRS = {"train": "train", "validation": "val"}
# Where per-shard worker stats go while optimize runs (removed afterwards).
_WORK_DIR = ".prepare_work"

# Selection modes for a shard's documents.
_ALL = "all"  # every document (explicit split folder)
_KEEP = "keep"  # documents NOT held out (train side of a hash holdout)
_HOLDOUT = "holdout"  # documents held out (val side of a hash holdout)


@dataclass(frozen=True)
class _Task:
    shard: str
    select: str
    count_skips: bool  # held-out passes re-read shards: count bad lines only once


def is_prepared(output_dir: str | Path) -> bool:
    """True only for a prepare that ran to the end (marker written after everything else)."""
    out = Path(output_dir)
    return (
        (out / COMPLETE_MARKER).is_file()
        and (out / STATS_FILE).is_file()
        and all((out / name / "index.json").is_file() for name in SPLIT_DIRS.values())
    )


def read_stats(output_dir: str | Path) -> dict[str, Any]:
    """The ``prepare_stats.json`` of a finished prepare."""
    out = Path(output_dir)
    if not is_prepared(out):
        raise ValueError(f"{out} is not a finished prepared dataset; run `orchestrator prepare`.")
    return json.loads((out / STATS_FILE).read_text())


def _is_held_out(text: str, val_every: int) -> bool:
    return zlib.crc32(text.encode("utf-8")) % val_every == 0


def _plan(input_dir: Path, val_every: int) -> tuple[str, dict[str, list[_Task]]]:
    """Decide which shards (and which of their documents) feed each output split."""
    train_dir, val_dir = input_dir / "train", input_dir / "validation"
    if train_dir.is_dir():
        train_shards = find_shards(train_dir)
        if val_dir.is_dir():
            val_shards = find_shards(val_dir)
            return "slimpajama", {
                "train": [_Task(str(s), _ALL, True) for s in train_shards],
                "val": [_Task(str(s), _ALL, True) for s in val_shards],
            }
        source, layout = train_shards, "train_only_hash_holdout"
    elif val_dir.is_dir():
        raise FileNotFoundError(
            f"{input_dir} has a validation/ folder but no train/ folder. Put the training "
            f"shards in {train_dir} (SlimPajama layout)."
        )
    else:
        source, layout = find_shards(input_dir), "flat_hash_holdout"
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 to hold out a validation split, got {val_every}.")
    return layout, {
        "train": [_Task(str(s), _KEEP, True) for s in source],
        "val": [_Task(str(s), _HOLDOUT, False) for s in source],
    }


def _token_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


# One tokenizer per worker process, loaded on first use and reused for all its shards.
_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenize_shard(
    index: int,
    *,
    tasks: list[_Task],
    tokenizer_path: str,
    stats_dir: str,
    dtype_name: str,
    val_every: int,
) -> Iterator[torch.Tensor]:
    """litdata ``fn``: yield one ``[bos] + ids + [eos]`` tensor per selected document.

    Receives an index into ``tasks`` rather than a path: litdata treats existing file paths
    in ``inputs`` as files to download/cache (and may delete cached copies), which we never
    want for local input shards.
    """
    task = tasks[index]
    tok = _TOKENIZERS.get(tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_path] = Tokenizer(tokenizer_path)
    dtype = getattr(torch, dtype_name)
    stats = SkipStats()
    shard_stats = stats if task.count_skips else SkipStats()
    selected = SkipStats()  # docs/sets of the documents that land in this split
    tokens = 0
    error: str | None = None
    try:
        for text, set_name in iter_records(task.shard, shard_stats):
            if task.select != _ALL and _is_held_out(text, val_every) != (task.select == _HOLDOUT):
                continue
            ids = tok.encode(text, bos=True, eos=True)
            tokens += len(ids)
            selected.docs += 1
            selected.sets[set_name] += 1
            yield torch.tensor(ids, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        # Don't let the exception reach litdata: on a worker error it SIGTERMs the worker and
        # orphans the worker's helper processes (they linger forever, holding stdout open).
        # We finish cleanly instead and the parent raises this message after optimize returns.
        error = f"{type(e).__name__}: {e}"
    # Reached only once litdata has consumed every item: the stats describe a whole shard.
    stats.docs, stats.sets = selected.docs, selected.sets
    record = {"shard": task.shard, "tokens": tokens, "error": error, **stats.to_dict()}
    path = Path(stats_dir) / f"{index:07d}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_same_inputs(
    existing: dict[str, Any], in_dir: Path, tok_path: Path, val_every: int, out: Path
) -> None:
    """A finished prepare is reused only for the same corpus and tokenizer: token ids from
    another tokenizer would silently train the model on the wrong vocabulary."""
    problems = []
    if existing.get("input_dir") != str(in_dir.resolve()):
        problems.append(f"input_dir {existing.get('input_dir')} (now {in_dir.resolve()})")
    if existing.get("tokenizer_sha256") != _sha256(tok_path):
        problems.append(f"a different tokenizer ({existing.get('tokenizer_path')}, now {tok_path})")
    if existing.get("val_every") not in (None, val_every):
        problems.append(f"val_every={existing.get('val_every')} (now {val_every})")
    if problems:
        raise ValueError(
            f"{out} was already prepared from {' and '.join(problems)}. Use another output "
            f"directory, or pass overwrite=True (`orchestrator prepare --overwrite`) to redo it."
        )


@contextlib.contextmanager
def _litdata_cache_env(cache_root: Path) -> Iterator[None]:
    """Point litdata's optimizer caches under our own folder for the duration of the call.

    By default they live in /tmp/chunks and /tmp/data, shared by every run on the machine, so
    two prepares (e.g. parallel tests) could collide. Workers inherit the environment.
    """
    keys = {
        "DATA_OPTIMIZER_CACHE_FOLDER": cache_root / "chunks",
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": cache_root / "data",
    }
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k, v in keys.items():
            v.mkdir(parents=True, exist_ok=True)
            os.environ[k] = str(v)
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextlib.contextmanager
def _keep_sigint_handler() -> Iterator[None]:
    """litdata's optimize installs a SIGINT handler that calls ``os._exit(0)`` and never
    removes it; restore ours so Ctrl-C later in the process still raises KeyboardInterrupt."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: installed outside Python, nothing we can restore
            signal.signal(signal.SIGINT, previous)


def prepare_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer_path: str | Path,
    num_workers: int = 1,
    chunk_bytes: str | int = "16MB",
    val_every: int = 100,
    overwrite: bool = False,
    verbose: bool = False,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Tokenize ``input_dir`` into ``output_dir/{train,val}``; return the stats dict.

    If ``output_dir`` already holds a finished prepare, its stats are returned without any
    work unless ``overwrite=True``. A half-finished prepare (no ``_COMPLETE`` marker) is
    always redone. Only the entries this function creates (``train/``, ``val/``, the stats
    file, the marker, and a scratch folder) are ever removed from ``output_dir``.
    """
    in_dir, out = Path(input_dir), Path(output_dir)
    tok_path = Path(tokenizer_path)
    # Cheap checks first: nothing expensive runs before the inputs are known to be usable.
    if not tok_path.is_file():
        raise FileNotFoundError(
            f"Tokenizer model {tok_path} not found. Train one first with `orchestrator tokenizer`."
        )
    if is_prepared(out) and not overwrite:
        existing = read_stats(out)
        _check_same_inputs(existing, in_dir, tok_path, val_every, out)
        return existing
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    layout, plan = _plan(in_dir, val_every)  # raises for a missing/empty input dir
    tokenizer = Tokenizer(tok_path)
    dtype = _token_dtype(tokenizer.vocab_size)

    # Start from a clean slate: drop an unfinished or overwritten previous attempt.
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    for name in (*SPLIT_DIRS.values(), _WORK_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / STATS_FILE).unlink(missing_ok=True)

    # Import here: litdata is heavy and only needed for the actual work.
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    # fork by default where available: spawn re-imports torch in every worker (~4 s per split
    # on a 2-core box, most of a small prepare) and needs an `if __name__ == "__main__"` guard
    # in whatever script calls us. The parent has no helper threads at this point, so fork is
    # safe; pass start_method="spawn" to get litdata's default back.
    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else None)
    work = out / _WORK_DIR
    split_stats: dict[str, Any] = {}
    try:
        with _litdata_cache_env(work / "litdata_cache"), _keep_sigint_handler():
            for split, tasks in plan.items():
                stats_dir = work / "stats" / split
                stats_dir.mkdir(parents=True, exist_ok=True)
                fn = functools.partial(
                    _tokenize_shard,
                    tasks=tasks,
                    tokenizer_path=str(tok_path.resolve()),
                    stats_dir=str(stats_dir),
                    dtype_name=str(dtype).removeprefix("torch."),
                    val_every=val_every,
                )
                optimize(
                    fn=fn,
                    inputs=list(range(len(tasks))),
                    output_dir=str((out / split).resolve()),
                    chunk_bytes=chunk_bytes,
                    item_loader=TokensLoader(),
                    num_workers=min(num_workers, len(tasks)),
                    # Keep shard order (and thus token order) independent of file sizes and
                    # worker timing, so a 1-worker prepare is exactly reproducible.
                    reorder_files=False,
                    keep_data_ordered=True,
                    start_method=method,
                    verbose=verbose,
                )
                split_stats[split] = _collect_stats(stats_dir, tasks, split, in_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stats = {
        "input_dir": str(in_dir.resolve()),
        "tokenizer_path": str(tok_path.resolve()),
        "tokenizer_sha256": _sha256(tok_path),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": str(dtype).removeprefix("torch."),
        "layout": layout,
        "val_every": val_every if layout != "slimpajama" else None,
        "splits": split_stats,
    }
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    (out / COMPLETE_MARKER).write_text("ok\n")  # last: marks everything above as finished
    return stats


def _collect_stats(stats_dir: Path, tasks: list[_Task], split: str, in_dir: Path) -> dict[str, Any]:
    """Sum the per-shard stats files written by the workers; every shard must report."""
    total = SkipStats()
    tokens = 0
    reports = sorted(stats_dir.glob("*.json"))
    if len(reports) != len(tasks):
        raise RuntimeError(
            f"Only {len(reports)} of {len(tasks)} shards of split {split!r} reported stats; "
            f"a litdata worker failed. Check the log above and rerun the prepare."
        )
    for report in reports:
        d = json.loads(report.read_text())
        if d.get("error"):
            raise ValueError(f"Failed to read shard {d['shard']} ({split!r} split): {d['error']}")
        total.merge(SkipStats.from_dict(d))
        tokens += int(d["tokens"])
    if total.docs == 0:
        raise ValueError(
            f"Split {split!r} of {in_dir} has no usable documents "
            f"(skipped lines: {total.to_dict()['skipped']}). Check the input shards."
        )
    return {"shards": len(tasks), "tokens": tokens, **total.to_dict()}
