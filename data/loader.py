"""Streaming token batches from a prepared split (``output_dir/train`` or ``output_dir/val``).

Each sample is a block of ``seq_len + 1`` consecutive tokens of the split's token stream
(documents are separated by bos/eos), so ``inputs = x[:, :-1]`` and ``targets = x[:, 1:]``.
Batches are ``torch.int64`` tensors of shape ``[batch_size, seq_len + 1]``, whatever dtype the
tokens are stored in on disk (uint16 or int32).

``StreamingDataset`` detects the distributed world (rank / world size) when it is built, so
create loaders *after* the process group is initialised (after ``fabric.launch()``); each rank
then streams a disjoint part of the data. ``loader.state_dict()`` / ``load_state_dict()``
resume exactly where a run stopped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.constants import _TORCH_DTYPES_MAPPING
from litdata.streaming.item_loader import TokensLoader

# litdata's TokensLoader builds tensors with torch.frombuffer over a read-only mmap and then
# clones them, which is safe, but torch warns once per process; keep training logs clean.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning,
    module=r"litdata\.streaming\.item_loader",
)

__all__ = [
    "dataset_num_tokens",
    "make_dataloader",
    "make_dataset",
    "read_documents",
    "read_token_ids",
]


def _check_prepared_split(data_dir: str | Path) -> Path:
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


def _read_index(d: Path) -> dict[str, Any]:
    try:
        index: dict[str, Any] = json.loads((d / "index.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'index.json'} is corrupt ({e}); rerun `orchestrator prepare`.") from e
    loader = (index.get("config") or {}).get("item_loader")
    if loader != "TokensLoader":
        raise ValueError(
            f"{d} holds a litdata dataset written with item_loader={loader!r}, not TokensLoader; "
            f"it was not made by `orchestrator prepare`. Rerun `orchestrator prepare`."
        )
    return index


def dataset_num_tokens(data_dir: str | Path) -> int:
    """Total tokens stored in a prepared split (from index.json, no data read)."""
    d = _check_prepared_split(data_dir)
    return sum(int(chunk["dim"]) for chunk in _read_index(d)["chunks"])


def _to_int64(batch: list[torch.Tensor]) -> torch.Tensor:
    # Module-level (picklable) so it also works in DataLoader worker processes. Tokens may be
    # stored as uint16, which embeddings and cross-entropy do not accept.
    return torch.stack(batch).to(torch.int64)


def make_dataset(
    data_dir: str | Path, seq_len: int, shuffle: bool, seed: int, drop_last: bool = True
) -> StreamingDataset:
    """A ``StreamingDataset`` of ``seq_len + 1``-token blocks over one prepared split."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    d = _check_prepared_split(data_dir)
    index = _read_index(d)
    # TokensLoader drops each chunk's tail shorter than one block; if every chunk is shorter
    # than a block the dataset is empty and training would silently do nothing.
    blocks = sum(int(c["dim"]) // (seq_len + 1) for c in index["chunks"])
    if blocks == 0:
        raise ValueError(
            f"{d} holds {sum(int(c['dim']) for c in index['chunks'])} tokens, fewer than one "
            f"block of seq_len + 1 = {seq_len + 1} per chunk. Use a shorter seq_len or prepare "
            f"more data (`orchestrator prepare`)."
        )
    return StreamingDataset(
        str(d.resolve()),
        item_loader=TokensLoader(block_size=seq_len + 1),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


def make_dataloader(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = True,
) -> StreamingDataLoader:
    """Batches of shape ``[batch_size, seq_len + 1]`` (int64) from a prepared split."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    dataset = make_dataset(data_dir, seq_len, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=_to_int64,
    )


def read_documents(data_dir: str | Path) -> list[torch.Tensor]:
    """Every stored item of a prepared split -- one ``[bos] + ids + [eos]`` per document -- in
    stored order, as int64 tensors. For tests and inspection; loads everything into memory.

    Parses litdata's chunk layout directly (``uint32 num_items``, ``uint32 offsets[num_items+1]``
    of byte positions, then the item bytes), independently of TokensLoader's block logic, so
    nothing is dropped at block or chunk boundaries.
    """
    d = _check_prepared_split(data_dir)
    index = _read_index(d)
    config = index["config"]
    if config.get("compression") or config.get("encryption"):
        raise ValueError(f"{d} is compressed or encrypted; read_documents only reads plain chunks.")
    serializer, dtype_index = config["data_format"][0].split(":")
    if serializer != "no_header_tensor":
        raise ValueError(f"{d}: unexpected data format {config['data_format']!r}.")
    dtype = _TORCH_DTYPES_MAPPING[int(dtype_index)]
    docs: list[torch.Tensor] = []
    for chunk in index["chunks"]:
        raw = (d / chunk["filename"]).read_bytes()
        n = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
        offsets = np.frombuffer(raw, dtype=np.uint32, count=n + 1, offset=4)
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            item = torch.frombuffer(bytearray(raw[start:end]), dtype=dtype)
            docs.append(item.to(torch.int64))
    return docs


def read_token_ids(data_dir: str | Path) -> torch.Tensor:
    """The whole token stream of a prepared split in stored order (int64; small data only)."""
    docs = read_documents(data_dir)
    return torch.cat(docs) if docs else torch.empty(0, dtype=torch.int64)
