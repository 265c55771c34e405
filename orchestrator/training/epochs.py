"""Which epoch each training sequence came from, so that blocks an epoch never showed are counted.

Every rank's loader may cross an epoch boundary at a different step (litdata's elastic resume on
more processes splits the rest of an epoch unevenly), so each rank tracks its own epoch and the
counts are summed over ranks. An epoch is reported once every rank has moved past it.

The counts travel in the step's one bookkeeping all-reduce (orchestrator/training/bookkeeping.py):
`step_counts()` is this rank's share, `end_step(summed)` reads the sum.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning_fabric import Fabric

from orchestrator.parallel.launch import gather_object

# Epochs (from the oldest open one on) that a step's all-reduce has slots for. A rank further
# ahead (after an elastic resume, uneven splits of an epoch's rest) makes that step gather the
# counts instead: rare, and still exact.
WINDOW = 4


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

    def step_counts(self) -> list[float]:
        """This rank's share of the step's all-reduce (added up over ranks): its epoch in its own
        slot of `world` slots, then its sequences of epochs oldest_open .. oldest_open+WINDOW-1,
        then 1 in the last slot if it read an epoch outside that window."""
        world = self.fabric.world_size
        slots = [0.0] * (world + WINDOW + 1)
        slots[self.fabric.global_rank] = float(self.local_epoch)
        for epoch, sequences in self.this_step.items():
            offset = epoch - self.oldest_open
            if 0 <= offset < WINDOW:
                slots[world + offset] += sequences
            else:
                slots[-1] = 1.0
        return slots

    def end_step(self, summed: list[float] | None = None) -> list[tuple[int, int]]:
        """(epoch, sequences) of epochs now finished on every rank.

        `summed`: every rank's `step_counts()` added up. Without it, or when a rank's epoch did
        not fit the window, the counts are gathered from every rank (a collective)."""
        world = self.fabric.world_size
        if summed is None or summed[-1] > 0:
            gathered = gather_object(self.fabric, (self.local_epoch, dict(self.this_step)))
            for _, counts in gathered:
                self.sequences.update(counts)
            self.rank_epochs = [epoch for epoch, _ in gathered]
        else:
            self.rank_epochs = [int(epoch) for epoch in summed[:world]]
            for offset, sequences in enumerate(summed[world : world + WINDOW]):
                if sequences:
                    self.sequences[self.oldest_open + offset] += int(sequences)
        self.this_step.clear()
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
