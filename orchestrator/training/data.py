"""The training data of a run: the loader (one prepared dataset or a weighted mixture), its size
in blocks, and the endless stream of micro-batches across epochs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data.loader import (
    StreamOptions,
    make_dataloader,
    make_mixture_loader,
    num_blocks,
    resolve_split,
)
from data.storage import join
from orchestrator.config import Config


def stream_options(cfg: Config) -> StreamOptions:
    """How the run streams data keys given as object-store URLs (cache, its bound, endpoint)."""
    return StreamOptions(
        cache_dir=cfg.data.cache_dir,
        max_cache_size=cfg.data.max_cache_size,
        storage_options=cfg.storage.options(),
    )


def train_split(cfg: Config) -> str:
    """data.dir's train split (a local path or a URL)."""
    return join(cfg.data.dir, "train")


def build_train_loader(cfg: Config) -> Any:
    """A stateful loader (its position is checkpointed) over data.dir/train or data.sources."""
    common = dict(
        seq_len=cfg.seq_len,
        batch_size=cfg.train.micro_batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        stream=stream_options(cfg),
    )
    if cfg.data.sources:  # weighted mixture of prepared datasets
        return make_mixture_loader([(s.name, s.dir, s.weight) for s in cfg.data.sources], **common)
    return make_dataloader(train_split(cfg), **common)


def train_blocks(cfg: Config) -> int:
    """Blocks of seq_len+1 tokens in one epoch of the training data (all sources)."""
    stream = stream_options(cfg)
    if cfg.data.sources:
        return sum(
            num_blocks(resolve_split(s.dir, stream=stream), cfg.seq_len, stream)
            for s in cfg.data.sources
        )
    return num_blocks(train_split(cfg), cfg.seq_len, stream)


def endless(loader) -> Iterator[tuple[bool, torch.Tensor]]:
    """(first batch of a new epoch?, batch) across epochs; the loader's state records the position."""
    finished_epoch = False
    while True:
        yielded = False
        for batch in loader:
            yield finished_epoch, batch
            yielded, finished_epoch = True, False
        if not yielded:
            raise ValueError(
                "the training split yields no batch: it is smaller than one micro-batch per process"
            )
        finished_epoch = True
