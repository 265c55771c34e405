"""Streaming token batches from a prepared split (``output_dir/train`` or ``output_dir/val``).

Each sample is a block of ``seq_len + 1`` consecutive tokens of the split's token stream
(documents are separated by bos/eos), so ``inputs = x[:, :-1]`` and ``targets = x[:, 1:]``.
Batches are ``torch.int64`` tensors of shape ``[batch_size, seq_len + 1]``, whatever dtype the
tokens are stored in on disk (uint16 or int32).

``StreamingDataset`` detects the distributed world (rank / world size) when it is built, so
create loaders *after* the process group is initialised (after ``fabric.launch()``); each rank
then streams a disjoint part of the data. ``loader.state_dict()`` / ``load_state_dict()``
resume exactly where a run stopped.

Several prepared datasets are mixed with :func:`make_mixture_loader` (see ``data.mixture``).

A split may also be an object-store URL (``s3://bucket/tokens/train``, ``gs://``, ``azure://``):
litdata then streams its chunks into a node-local cache bounded in size (:class:`StreamOptions`),
and the index is read through ``data.storage`` (errors name the URL). Resume is the same as for a
local split: the position is in the loader's state, whatever the cache directory of the new node.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.constants import _TORCH_DTYPES_MAPPING
from litdata.streaming import downloader as _litdata_downloader
from litdata.streaming.item_loader import TokensLoader as _LitdataTokensLoader

from data.instructions import TOKEN_MASK
from data.integrity import (
    CHECKSUM_KEY,
    DamagedChunk,
    TokenRange,
    damaged,
    file_problems,
    split_token_range,
)
from data.integrity import token_dtype as _token_dtype
from data.mixture import MixtureDataset
from data.storage import ObjectStore, is_remote, join
from data.util import parse_size

# litdata's TokensLoader builds tensors with torch.frombuffer over a read-only mmap and then
# clones them, which is safe, but torch warns once per process; keep training logs clean.
warnings.filterwarnings(
    "ignore",
    message="The given buffer is not writable",
    category=UserWarning,
    module=r"litdata\.streaming\.item_loader",
)

# litdata fetches chunks from S3 through obstore, whose HTTP client refuses plain-http endpoints
# unless told otherwise, and litdata does not tell it: a streamed split on an on-premises MinIO or
# Ceph at http://HOST:PORT fails on its first chunk ("builder error"). Allowing http does not
# downgrade https endpoints; the endpoint's own scheme decides (tests/orchestrator/training/
# test_remote_data.py streams from an http:// server).
_client_options = getattr(_litdata_downloader, "_OBSTORE_CLIENT_OPTIONS", None)
if isinstance(_client_options, dict):
    _client_options.setdefault("allow_http", "true")

__all__ = [
    "StreamOptions",
    "dataset_num_tokens",
    "make_dataloader",
    "make_mixture_loader",
    "resolve_split",
    "source_samples",
    "make_dataset",
    "read_documents",
    "read_token_ids",
]


@dataclass(frozen=True)
class StreamOptions:
    """How splits given as object-store URLs are streamed (ignored for local splits)."""

    cache_dir: str | None = (
        None  # node-local; None: $LITDATA_CACHE_DIR or <tmp>/orchestrator-data-cache
    )
    max_cache_size: str | int = "50GB"  # per dataset and node; litdata evicts beyond it
    storage_options: dict[str, Any] = field(default_factory=dict)  # endpoint_url; never credentials

    def cache_root(self) -> str:
        if self.cache_dir:
            return str(self.cache_dir)
        return os.environ.get("LITDATA_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), "orchestrator-data-cache"
        )

    def dataset_kwargs(self, split: str | Path) -> dict[str, Any]:
        """StreamingDataset's arguments for one split: its input, and for a URL the cache."""
        if not is_remote(split):
            return {"input_dir": str(Path(split).resolve())}
        return {
            "input_dir": str(split),
            "cache_dir": self.cache_root(),
            "max_cache_size": parse_size(self.max_cache_size),
            "storage_options": dict(self.storage_options),
        }


def resolve_split(
    path: str | Path, split: str = "train", stream: StreamOptions | None = None
) -> str | Path:
    """A prepared split: ``path`` itself if it holds ``index.json``, else ``path/<split>`` (the
    output root of ``orchestrator prepare``). Raises a ValueError that says what is wrong; for a
    URL, a ``data.storage.StorageError`` when the store cannot be read."""
    if is_remote(path):
        store = ObjectStore(str(path), (stream or StreamOptions()).storage_options)
        if store.exists("index.json"):
            return store.url
        if store.exists(f"{split}/index.json"):
            return join(store.url, split)
        store.check_bucket()  # a missing bucket or refused credentials say so, not "no index"
        raise ValueError(
            f"{store.url} is not a prepared litdata dataset (no index.json, nor {split}/index.json). "
            f"Run `orchestrator prepare --output {store.url}` to create it."
        )
    p = Path(path)
    if (p / "index.json").is_file():
        return p
    if (p / split / "index.json").is_file():
        return p / split
    return _check_prepared_split(p / split if (p / split).is_dir() else p)


def _check_prepared_split(data_dir: str | Path) -> str | Path:
    if is_remote(data_dir):
        return str(data_dir).rstrip("/")  # read_index says what is missing
    d = Path(data_dir)
    if not d.is_dir():
        raise ValueError(
            f"Dataset directory {d} does not exist. Run `orchestrator prepare` to tokenize a "
            f"corpus into it (it should contain train/ and val/ with index.json)."
        )
    index = d / "index.json"
    if not index.is_file():
        hint = ""
        if (d / "train" / "index.json").is_file():
            hint = f" It looks like the prepare output root; use {d / 'train'} or {d / 'val'}."
        raise ValueError(
            f"{d} is not a prepared litdata dataset (no index.json).{hint} "
            f"Run `orchestrator prepare` to create it."
        )
    return d


# Indexes read from object stores, by URL: a run reads each one several times while it starts
# (preflight, epoch size, loader), and a 50k-chunk index is megabytes.
_REMOTE_INDEXES: dict[str, dict[str, Any]] = {}


def read_index(d: str | Path, stream: StreamOptions | None = None) -> dict[str, Any]:
    """The ``index.json`` of a prepared split (local or URL), checked to be TokensLoader chunks."""
    where = join(d, "index.json")
    if is_remote(d):
        cached = _REMOTE_INDEXES.get(where)
        if cached is not None:
            return cached
        store = ObjectStore(str(d), (stream or StreamOptions()).storage_options)
        try:
            text = store.read_text("index.json")
        except FileNotFoundError:
            store.check_bucket()
            raise ValueError(
                f"{d} is not a prepared litdata dataset (no index.json). "
                f"Run `orchestrator prepare --output <its parent URL>` to create it."
            ) from None
    else:
        text = Path(where).read_text()
    try:
        index: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is corrupt ({e}); rerun `orchestrator prepare`.") from e
    loader = (index.get("config") or {}).get("item_loader")
    if loader != "TokensLoader":
        raise ValueError(
            f"{d} holds a litdata dataset written with item_loader={loader!r}, not TokensLoader; "
            f"it was not made by `orchestrator prepare`. Rerun `orchestrator prepare`."
        )
    if is_remote(d):
        _REMOTE_INDEXES[where] = index
    return index


def dataset_num_tokens(data_dir: str | Path, stream: StreamOptions | None = None) -> int:
    """Total tokens stored in a prepared split (from index.json, no data read)."""
    index = read_index(_check_prepared_split(data_dir), stream)
    return sum(int(chunk["dim"]) for chunk in index["chunks"])


def num_blocks(data_dir: str | Path, seq_len: int, stream: StreamOptions | None = None) -> int:
    """Training blocks of ``seq_len + 1`` tokens in a split (TokensLoader drops each chunk's tail)."""
    index = read_index(_check_prepared_split(data_dir), stream)
    return sum(int(c["dim"]) // (seq_len + 1) for c in index["chunks"])


def _to_int64(batch: list[torch.Tensor]) -> torch.Tensor:
    # Module-level (picklable) so it also works in DataLoader worker processes. Tokens may be
    # stored as uint16, which embeddings and cross-entropy do not accept.
    return torch.stack(batch).to(torch.int64)


# Chunk files this process has checked: (path, (inode, mtime_ns, size), checksum, token range).
_VERIFIED: set[tuple[Any, ...]] = set()


class TokensLoader(_LitdataTokensLoader):
    """litdata's TokensLoader that verifies each chunk file before its first item is read, once
    per process and file version (a new download is checked again; each epoch's DataLoader
    workers, new processes, check the chunks they read): size and checksum against index.json,
    and token ids against ``token_range``.

    (It keeps litdata's class name: litdata checks it against the index's ``item_loader``.)
    Hooks, all on litdata's own paths: ``_load_chunk`` (a chunk opened, by the reader or by the
    download thread right after a download), ``load_item_from_chunk`` (a local or downloaded file
    of the wrong size would otherwise make litdata wait for the rest of a download that never
    comes) and the wait loop's ``_raise_if_prefetch_crashed`` (a download published while the
    reader waits; an error found by the download thread is raised as it is)."""

    def __init__(
        self,
        block_size: int,
        split: str | Path = "",
        token_range: TokenRange | None = None,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__(block_size=block_size)
        self._split = str(split)
        self._token_range = token_range
        self._storage_options = dict(storage_options or {})
        self._verified: dict[str, tuple[int, int, int]] = {}  # path -> (inode, mtime_ns, size)
        self._verify_lock: threading.Lock | None = threading.Lock()
        self._by_name: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_verify_lock"] = None  # not picklable; made again where it is used
        return state

    def setup(self, config: dict, chunks: list, serializers: dict, region_of_interest=None) -> None:
        super().setup(config, chunks, serializers, region_of_interest)
        self._by_name = {c["filename"]: i for i, c in enumerate(chunks)}
        self._np_dtype = _token_dtype(config)

    def verify_chunk(self, chunk_filepath: str) -> None:
        """Check a chunk file that is there, once per file version (a DamagedChunk if damaged)."""
        try:
            st = os.stat(chunk_filepath)
        except FileNotFoundError:
            return  # not downloaded yet (or evicted): litdata fetches it, it is checked then
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._verified.get(chunk_filepath) == identity:
            return
        if self._verify_lock is None:
            self._verify_lock = threading.Lock()
        with self._verify_lock:  # the reader waits for the download thread's check, not twice
            if self._verified.get(chunk_filepath) == identity:
                return
            name = os.path.basename(chunk_filepath)
            chunk = self._chunks[self._by_name[name]]
            key = (chunk_filepath, identity, chunk.get(CHECKSUM_KEY), self._token_range)
            if key in _VERIFIED:  # by another loader of this process (validation makes one per run)
                self._verified[chunk_filepath] = identity
                return
            problems = file_problems(chunk_filepath, chunk, self._np_dtype, self._token_range)
            if problems == ["missing"]:
                return  # evicted meanwhile: litdata fetches it again, it is checked then
            if problems:
                split = self._split or os.path.dirname(chunk_filepath)
                raise damaged(split, name, problems, self._storage_options)
            self._verified[chunk_filepath] = identity
            _VERIFIED.add(key)

    def _load_chunk(self, chunk_index: int, chunk_filepath: str) -> None:
        i = int(chunk_index)
        if not (i in self._mmaps and i in self._buffers):  # opened now: checked first
            self.verify_chunk(chunk_filepath)
        super()._load_chunk(chunk_index, chunk_filepath)

    def load_item_from_chunk(
        self, index: int, chunk_index: int, chunk_filepath: str, begin: int, filesize_bytes: int
    ) -> Any:
        if chunk_filepath not in self._verified:
            self.verify_chunk(chunk_filepath)
        return super().load_item_from_chunk(
            index, chunk_index, chunk_filepath, begin, filesize_bytes
        )

    def pre_load_chunk(self, chunk_index: int, chunk_filepath: str) -> None:
        try:  # litdata's download thread, right after a download
            super().pre_load_chunk(chunk_index, chunk_filepath)
        except DamagedChunk:
            pass  # the reader raises it at this chunk: one clear error, not a download-thread crash

    def _raise_if_prefetch_crashed(self, chunk_filepath: str) -> None:
        super()._raise_if_prefetch_crashed(chunk_filepath)
        # Called while litdata waits for a download: once published, a wrong size stays wrong.
        self.verify_chunk(chunk_filepath)


def _token_dataset(
    name: str,
    split: str | Path,
    seq_len: int,
    shuffle: bool,
    seed: int,
    stream: StreamOptions,
    vocab_size: int | None = None,
) -> StreamingDataset:
    """litdata's dataset of ``seq_len + 1``-token blocks over one split, refused when empty. Each
    chunk is verified when a process first opens it (data.integrity: size, checksum and, with
    ``vocab_size``, every id below it)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    index = read_index(split, stream)
    # TokensLoader drops each chunk's tail shorter than one block; if every chunk is shorter
    # than a block the dataset is empty and training would silently do nothing.
    blocks = sum(int(c["dim"]) // (seq_len + 1) for c in index["chunks"])
    if blocks == 0:
        raise ValueError(
            f"{name}{split} holds {sum(int(c['dim']) for c in index['chunks'])} tokens, fewer than "
            f"one block of seq_len + 1 = {seq_len + 1} per chunk. Use a shorter seq_len or prepare "
            f"more data (`orchestrator prepare`)."
        )
    token_range = None
    if vocab_size is not None:
        token_range = split_token_range(
            split, vocab_size, f"model.vocab_size={vocab_size}", stream.storage_options
        )
    return StreamingDataset(
        **stream.dataset_kwargs(split),
        item_loader=TokensLoader(seq_len + 1, split, token_range, stream.storage_options),
        shuffle=shuffle,
        seed=seed,
    )


def make_dataset(
    data_dir: str | Path,
    seq_len: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = True,
    stream: StreamOptions | None = None,
    vocab_size: int | None = None,
) -> StreamingDataset:
    """A ``StreamingDataset`` of ``seq_len + 1``-token blocks over one prepared split; with
    ``vocab_size``, a chunk holding an id >= it is an error naming the chunk when first read."""
    split = _check_prepared_split(data_dir)
    ds = _token_dataset("", split, seq_len, shuffle, seed, stream or StreamOptions(), vocab_size)
    ds.set_drop_last(drop_last)
    return ds


class TokenBlockLoader(StreamingDataLoader):
    """litdata's stateful loader; a saved position also resumes on a node whose cache directory
    differs (another node, a per-job temporary directory): for a streamed split the cache is
    where chunks are kept, not which data is read, which the URL decides and litdata checks."""

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        state = obj.get("dataset") or {}
        dataset = self.dataset
        if (
            isinstance(dataset, StreamingDataset)
            and dataset.input_dir.url
            and state.get("input_dir_url") == dataset.input_dir.url
        ):
            obj = {
                **obj,
                "dataset": {
                    **state,
                    "input_dir_path": dataset.input_dir.path,
                    "cache_dir_path": dataset.cache_dir.path,
                },
            }
        super().load_state_dict(obj)


def make_dataloader(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = True,
    stream: StreamOptions | None = None,
    vocab_size: int | None = None,
) -> StreamingDataLoader:
    """Batches of shape ``[batch_size, seq_len + 1]`` (int64) from a prepared split (every id
    checked below ``vocab_size`` when given, see make_dataset)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    dataset = make_dataset(
        data_dir,
        seq_len,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        stream=stream,
        vocab_size=vocab_size,
    )
    return TokenBlockLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=_to_int64,
    )


def _read_items(d: Path) -> list[torch.Tensor]:
    """Every stored litdata item of a split, in stored order (int64)."""
    index = read_index(d)
    config = index["config"]
    if config.get("compression") or config.get("encryption"):
        raise ValueError(f"{d} is compressed or encrypted; read_documents only reads plain chunks.")
    serializer, dtype_index = config["data_format"][0].split(":")
    if serializer != "no_header_tensor":
        raise ValueError(f"{d}: unexpected data format {config['data_format']!r}.")
    dtype = _TORCH_DTYPES_MAPPING[int(dtype_index)]
    items: list[torch.Tensor] = []
    for chunk in index["chunks"]:
        raw = (d / chunk["filename"]).read_bytes()
        n = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
        offsets = np.frombuffer(raw, dtype=np.uint32, count=n + 1, offset=4)
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            items.append(torch.frombuffer(bytearray(raw[start:end]), dtype=dtype).to(torch.int64))
    return items


def read_documents(data_dir: str | Path) -> list[torch.Tensor]:
    """Every document of a prepared split -- ``before + ids + after`` with the prepare's
    separator (default ``[bos] + ids + [eos]``) -- in stored order, as int64 tensors. For tests
    and inspection; loads everything into memory.

    Parses litdata's chunk layout directly (``uint32 num_items``, ``uint32 offsets[num_items+1]``
    of byte positions, then the item bytes), independently of TokensLoader's block logic, so
    nothing is dropped at block or chunk boundaries. Items hold several consecutive documents;
    they are split at the separator recorded in the prepare's ``prepare_stats.json`` (sentencepiece
    never emits bos/eos inside a document). Without that file, every item is one document.
    Instruction data (``"format": "instruction"``) is returned as stored, loss flags included
    (``data.instructions.decode`` separates ids and flags).
    """
    d = _check_prepared_split(data_dir)
    items = _read_items(d)
    stats_file = d.parent / "prepare_stats.json"
    if not stats_file.is_file():
        return items
    stats = json.loads(stats_file.read_text())
    separator = stats.get("separator", "bos+eos")
    if separator == "bos":
        marker, after = int(stats["bos_id"]), False  # a document starts at each bos
    else:
        marker, after = int(stats["eos_id"]), True  # a document ends at each eos
    flags = stats.get("format") == "instruction"
    docs: list[torch.Tensor] = []
    for item in items:
        ids = item & TOKEN_MASK if flags else item  # instruction data: without the loss flag
        cuts = torch.nonzero(ids == marker).flatten().tolist()
        bounds = [c + 1 for c in cuts] if after else cuts
        edges = sorted({0, *bounds, len(item)})
        docs += [item[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    return docs


def read_token_ids(data_dir: str | Path) -> torch.Tensor:
    """The whole token stream of a prepared split in stored order (int64; small data only)."""
    docs = read_documents(data_dir)
    return torch.cat(docs) if docs else torch.empty(0, dtype=torch.int64)


def make_mixture_loader(
    sources: list[tuple[str, str | Path, float]],
    seq_len: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    stream: StreamOptions | None = None,
    vocab_size: int | None = None,
) -> StreamingDataLoader:
    """Batches ``[batch_size, seq_len + 1]`` (int64) mixing prepared splits ``(name, dir, weight)``.

    See :class:`data.mixture.MixtureDataset` for the semantics (deterministic weighted
    interleaving, each source cycling through its own reshuffled epochs, exact resume).
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not sources:
        raise ValueError("a mixture needs at least one source")
    stream = stream or StreamOptions()
    datasets = []
    for name, directory, _ in sources:
        split = resolve_split(directory, stream=stream)
        ds = _token_dataset(f"source {name!r}: ", split, seq_len, shuffle, seed, stream, vocab_size)
        # Every block is read once per source epoch, none dropped to even out ranks: sources cycle
        # forever, so no rank ever waits for the end of another's epoch. (Set after construction:
        # passing drop_last=False makes litdata warn about collectives, which do not apply here.)
        ds.set_drop_last(False)
        datasets.append(ds)
    mixture = MixtureDataset(
        datasets, names=[s[0] for s in sources], weights=[float(s[2]) for s in sources], seed=seed
    )
    return TokenBlockLoader(
        mixture, batch_size=batch_size, num_workers=num_workers, collate_fn=_to_int64
    )


def source_samples(loader: Any) -> dict[str, int] | None:
    """Samples (blocks) this process has consumed from each source of a mixture loader, from the
    loader's own (checkpointed) state; ``None`` for a single-dataset loader."""

    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, MixtureDataset):
        return None
    totals = [0] * len(dataset.names)
    for counts in loader._num_samples_yielded_wrapper.values():
        for i, c in enumerate(counts):
            totals[i] += int(c)
    return dict(zip(dataset.names, totals, strict=True))
