"""The training data of a run: the loader (one prepared dataset or a weighted mixture), its size
in blocks, and the endless stream of micro-batches across epochs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data.loader import make_dataloader, make_mixture_loader, num_blocks, resolve_split
from orchestrator.config import Config


def build_train_loader(cfg: Config) -> Any:
    """A stateful loader (its position is checkpointed) over data.dir/train or data.sources."""
    common = dict(
        seq_len=cfg.seq_len,
        batch_size=cfg.train.micro_batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
    )
    if cfg.data.sources:  # weighted mixture of prepared datasets
        return make_mixture_loader([(s.name, s.dir, s.weight) for s in cfg.data.sources], **common)
    return make_dataloader(Path(cfg.data.dir) / "train", **common)


def train_blocks(cfg: Config) -> int:
    """Blocks of seq_len+1 tokens in one epoch of the training data (all sources)."""
    if cfg.data.sources:
        return sum(num_blocks(resolve_split(s.dir), cfg.seq_len) for s in cfg.data.sources)
    return num_blocks(Path(cfg.data.dir) / "train", cfg.seq_len)


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
