"""Where the packed documents of a token block start (document masking, ``data.document_mask``).

A prepared split is a stream of documents joined by the prepare's separator (``prepare
--separator``, recorded in ``prepare_stats.json`` with the tokenizer's bos/eos ids):

    bos+eos  [BOS] text [EOS] [BOS] text [EOS] ...   a document starts at each BOS
    bos      [BOS] text [BOS] text ...               a document starts at each BOS
    eos      text [EOS] text [EOS] ...               a document starts after each EOS

:func:`document_ids` numbers the documents of each row of a block (B, T): one cumulative sum, cheap
enough for the host at every step. A block usually starts inside a document: the positions before
its first boundary are document 0. The ids feed ``Llama.forward(..., doc_ids=...)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.storage import ObjectStore, is_remote

STATS_FILE = (
    "prepare_stats.json"  # data.prepare.STATS_FILE (not imported: prepare pulls in workers)
)


@dataclass(frozen=True)
class DocumentBoundary:
    """How documents are delimited in a prepared split: starting at each `bos_id`, or (bos_id None)
    after each `eos_id`."""

    separator: str
    bos_id: int | None = None
    eos_id: int | None = None

    @classmethod
    def from_stats(cls, stats: dict) -> DocumentBoundary:
        """From a prepare's ``prepare_stats.json`` (``separator``, default bos+eos; ``bos_id``, ``eos_id``)."""
        separator = stats.get("separator", "bos+eos")
        if separator in ("bos+eos", "bos"):
            key = "bos_id"
        elif separator == "eos":
            key = "eos_id"
        else:
            raise ValueError(f"unknown separator {separator!r} in {STATS_FILE}")
        value = stats.get(key)
        if not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{STATS_FILE} records separator {separator!r} but no valid {key} ({value!r})"
            )
        if key == "bos_id":
            return cls(separator, bos_id=value)
        return cls(separator, eos_id=value)

    def ids(self, tokens: torch.Tensor) -> torch.Tensor:
        return document_ids(tokens, bos_id=self.bos_id, eos_id=self.eos_id)


def document_ids(
    tokens: torch.Tensor, bos_id: int | None = None, eos_id: int | None = None
) -> torch.Tensor:
    """tokens: (B, T) (or (T,)) -> int64 ids of the same shape, non-decreasing along T: a new
    document starts at each `bos_id` token, or (without a bos_id) after each `eos_id` token.
    Positions before the first boundary of a row are document 0."""
    if bos_id is not None:
        return (tokens == bos_id).cumsum(dim=-1)
    if eos_id is None:
        raise ValueError("document_ids needs a bos_id or an eos_id")
    ends = tokens == eos_id
    return ends.cumsum(dim=-1) - ends.long()  # exclusive: the EOS belongs to the document it ends


def read_prepare_stats(split: str | Path, storage_options: dict | None = None) -> dict | None:
    """The ``prepare_stats.json`` beside a prepared split (in its parent, a prepare output root;
    local or an object-store URL); None when there is no such file."""
    if is_remote(split):
        parent = str(split).rstrip("/").rsplit("/", 1)[0]
        store = ObjectStore(parent, storage_options)
        if not store.exists(STATS_FILE):
            return None
        text = store.read_text(STATS_FILE)
    else:
        stats_file = Path(split).parent / STATS_FILE
        if not stats_file.is_file():
            return None
        text = stats_file.read_text()
    return json.loads(text)


def read_boundary(
    split: str | Path, storage_options: dict | None = None
) -> DocumentBoundary | None:
    """The boundary recorded in the ``prepare_stats.json`` beside a prepared split (its parent, a
    prepare output root; local or an object-store URL); None when there is no such file."""
    stats = read_prepare_stats(split, storage_options)
    return None if stats is None else DocumentBoundary.from_stats(stats)
