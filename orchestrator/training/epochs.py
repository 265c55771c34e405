"""Which epoch each training sequence came from, so that blocks an epoch never showed are counted.

Every rank's loader may cross an epoch boundary at a different step (litdata's elastic resume on
more processes splits the rest of an epoch unevenly), so each rank tracks its own epoch and the
counts are summed over ranks. An epoch is reported once every rank has moved past it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning.fabric import Fabric

from orchestrator.parallel.launch import gather_object


class EpochTracker:
    def __init__(self, fabric: Fabric, blocks: int) -> None:
        self.fabric = fabric
        self.blocks = blocks  # blocks of seq_len+1 tokens in the training split
        self.oldest_open = 0  # the oldest epoch some rank is still reading
        self.sequences: Counter[int] = Counter()  # epoch -> sequences read, all ranks
        self.rank_epochs: list[int] = [0] * fabric.world_size
        self.local_epoch = 0
        self.this_step: Counter[int] = Counter()

    def read(self, new_epoch: bool, sequences: int) -> None:
        """This rank read a micro-batch of `sequences`, the first of a new epoch if `new_epoch`."""
        self.local_epoch += new_epoch
        self.this_step[self.local_epoch] += sequences

    def end_step(self) -> list[tuple[int, int]]:
        """Collective: merge every rank's counts; (epoch, sequences) of epochs now finished everywhere."""
        gathered = gather_object(self.fabric, (self.local_epoch, dict(self.this_step)))
        self.this_step.clear()
        for _, counts in gathered:
            self.sequences.update(counts)
        self.rank_epochs = [epoch for epoch, _ in gathered]
        finished = []
        while self.oldest_open < min(self.rank_epochs):
            finished.append((self.oldest_open, self.sequences.pop(self.oldest_open, 0)))
            self.oldest_open += 1
        return finished

    def state_dict(self) -> dict[str, Any]:
        return {
            "oldest_open": self.oldest_open,
            "sequences": dict(self.sequences),
            "rank_epochs": self.rank_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.oldest_open = state["oldest_open"]
        self.sequences = Counter(state["sequences"])
        self.rank_epochs = list(state["rank_epochs"])
        same_world = len(self.rank_epochs) == self.fabric.world_size
        # On another world size every rank continues the oldest open epoch (the loader's state says where).
        self.local_epoch = (
            self.rank_epochs[self.fabric.global_rank] if same_world else self.oldest_open
        )
