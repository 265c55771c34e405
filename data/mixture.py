"""Weighted mixture of prepared datasets (e.g. SlimPajama 0.693584 / StarCoder 0.306416).

:class:`MixtureDataset` is a litdata ``CombinedStreamingDataset`` with its own iterator:
deterministic interleaving (the source furthest behind its weight), sources cycling through their
own epochs, exact resume from ``StreamingDataLoader``'s per-worker, per-source counts. Why not
litdata's weighted mode, and the rules: docs/data.md, "Mixing datasets".
"""

from __future__ import annotations

from collections import deque
from copy import deepcopy
from typing import Any

import numpy as np
from litdata import CombinedStreamingDataset, StreamingDataset
from litdata.utilities.base import __NUM_SAMPLES_YIELDED_KEY__, __SAMPLES_KEY__
from litdata.utilities.env import _DistributedEnv, _WorkerEnv

__all__ = ["MixtureDataset"]


class MixtureDataset(CombinedStreamingDataset):
    """Infinite, deterministically interleaved weighted mixture of ``StreamingDataset`` sources."""

    def __init__(
        self,
        datasets: list[StreamingDataset],
        names: list[str],
        weights: list[float],
        seed: int = 0,
    ) -> None:
        if len(names) != len(datasets) or len(weights) != len(datasets):
            raise ValueError("names, weights and datasets must have the same length")
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if any(not (w > 0) for w in weights):
            raise ValueError(f"source weights must be positive, got {dict(zip(names, weights))}")
        super().__init__(datasets, seed=seed, weights=weights, iterate_over_all=False)
        self.names = list(names)
        self._base: dict[int, list[int]] | None = (
            None  # counts at the last weight change, per worker
        )
        self.distributed_env = _DistributedEnv.detect()

    # -- length: infinite ------------------------------------------------------------------------

    def get_len(self, num_workers: int, batch_size: int) -> int | None:
        self.num_workers = num_workers
        self.batch_size = batch_size
        return None

    def __len__(self) -> int:  # torch's DataLoader asks; there is no end
        raise TypeError(
            "a MixtureDataset is infinite (sources cycle); count steps instead of epochs"
        )

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> _MixtureIterator:
        worker_env = _WorkerEnv.detect()
        counts = _for_worker(self._num_samples_yielded, worker_env.rank)
        base = _for_worker(self._base, worker_env.rank)
        self._iterator = _MixtureIterator(
            self._datasets, self.names, self._weights, counts, base, self._use_streaming_dataloader
        )
        return self._iterator

    # -- state -----------------------------------------------------------------------------------

    def state_dict(
        self, num_workers: int, batch_size: int, num_samples_yielded: list[int] | None = None
    ) -> dict[str, Any]:
        return {
            "mixture": {
                "names": list(self.names),
                "weights": list(self._weights),
                "dirs": [d.input_dir.path or d.input_dir.url for d in self._datasets],
                "world_size": self.distributed_env.world_size,
                "num_workers": num_workers,
                "batch_size": batch_size,
                "samples_per_source": list(num_samples_yielded or []),
                "base": deepcopy(self._base) if self._base is not None else None,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        mix = (state_dict.get("dataset") or {}).get("mixture")
        if mix is None:
            raise ValueError(
                "the data-loader state is not from a mixture of sources (data.sources); a run "
                "cannot switch between data.dir and data.sources on resume"
            )
        if mix["names"] != self.names:
            raise ValueError(
                f"the checkpoint mixed sources {mix['names']}, this run has {self.names}: the sources "
                "(names and order) must stay the same to resume (weights may change)"
            )
        here = {
            "world_size": self.distributed_env.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
        }
        changed = {k: (mix[k], v) for k, v in here.items() if mix.get(k) != v}
        if changed:
            raise ValueError(
                "a mixture resumes only with the same "
                + ", ".join(f"{k} (checkpoint {a}, now {b})" for k, (a, b) in changed.items())
                + ": they decide which process reads which blocks"
            )
        counts = {int(k): list(v) for k, v in state_dict["num_samples_yielded"].items()}
        if [float(w) for w in mix["weights"]] != [float(w) for w in self._weights]:
            self._base = deepcopy(counts)  # new weights apply from here on
        else:
            base = mix.get("base")
            self._base = {int(k): list(v) for k, v in base.items()} if base else None
        self._num_samples_yielded = counts

    def reset_state_dict(self) -> None:
        super().reset_state_dict()
        self._base = None


def _for_worker(table: dict[Any, list[int]] | None, rank: int) -> list[int] | None:
    if not table:
        return None
    value = table.get(rank, table.get(str(rank)))
    return list(value) if value is not None else None


class _MixtureIterator:
    def __init__(
        self,
        datasets: list[StreamingDataset],
        names: list[str],
        weights: list[float],
        counts: list[int] | None,
        base: list[int] | None,
        use_streaming_dataloader: bool,
    ) -> None:
        n = len(datasets)
        self.datasets = datasets
        self.names = names
        self.weights = [float(w) for w in weights]
        self.counts = list(counts) if counts else [0] * n
        self.base = list(base) if base else [0] * n
        self.use_streaming_dataloader = use_streaming_dataloader
        self.epochs = [1] * n
        for i in range(n):
            self.epochs[i] = _position(datasets[i], self.counts[i], names[i])

    def __iter__(self) -> _MixtureIterator:
        return self

    def _choose(self) -> int:
        since = [c - b for c, b in zip(self.counts, self.base, strict=True)]
        n1 = sum(since) + 1
        best, best_deficit = 0, -float("inf")
        for i, w in enumerate(self.weights):
            deficit = w * n1 - since[i]
            if deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def __next__(self) -> Any:
        i = self._choose()
        ds = self.datasets[i]
        try:
            sample = next(ds)
        except StopIteration:  # this source's epoch is over for this worker: start its next one
            self.epochs[i] += 1
            _start_epoch(ds, self.epochs[i], self.names[i])
            sample = next(ds)
        self.counts[i] += 1
        if self.use_streaming_dataloader:
            return {__SAMPLES_KEY__: sample, __NUM_SAMPLES_YIELDED_KEY__: list(self.counts)}
        return sample

    def state_dict(self, num_workers: int = 0, batch_size: int = 1) -> dict[str, Any]:
        return {"counts": list(self.counts), "epochs": list(self.epochs)}


def _start_epoch(ds: StreamingDataset, epoch: int, name: str) -> int:
    """Set ``ds`` up (in this worker) at the start of ``epoch``; return this worker's share of it."""
    ds.reset_state_dict()  # never litdata's own resume: positions come from our counts
    ds.current_epoch = epoch
    iter(ds)
    length = int(ds.stop_length)
    if length == 0:
        raise RuntimeError(
            f"source {name!r} ({ds.input_dir.path or ds.input_dir.url}) gives this data-loader worker no block in "
            f"epoch {epoch}: it has too few blocks (or chunks) for {ds.distributed_env.world_size} process(es) x "
            f"{max(1, ds.num_workers)} worker(s). Prepare it with a smaller --chunk-bytes, use fewer data.num_workers, "
            f"or a shorter seq_len."
        )
    return length


def _position(ds: StreamingDataset, consumed: int, name: str) -> int:
    """Put ``ds`` where this worker stands after ``consumed`` samples over all epochs; return the epoch."""
    epoch = 1
    while True:
        length = _start_epoch(ds, epoch, name)
        if consumed < length:
            break
        consumed -= length
        epoch += 1
    if consumed:
        _skip(ds, consumed)
    return epoch


def _skip(ds: StreamingDataset, k: int) -> None:
    """Skip the first ``k`` samples of this worker's epoch without reading them.

    Mirrors ``StreamingDataset._resume`` (which only takes a rank-wide count split as if all
    workers had taken whole batches in turn) for one worker's own count.
    """
    total = k
    intervals = ds.worker_intervals
    chunk = 0
    while chunk < len(intervals) and k >= intervals[chunk][2] - intervals[chunk][1]:
        k -= intervals[chunk][2] - intervals[chunk][1]
        chunk += 1
    ds.global_index = total
    if chunk >= len(intervals):
        ds.worker_next_chunk_index = len(intervals)
        ds.upcoming_indexes = deque()
        return
    interval = intervals[chunk]
    order = ds.shuffler(
        np.arange(interval[1], interval[2]),
        ds._shuffle_num_chunks,
        ds.current_epoch,
        int(ds.worker_chunks[chunk]),
    )
    ds.upcoming_indexes = deque(order[k:])
    ds.consumed_sample_count_in_curr_chunk = k
    ds.worker_next_chunk_index = chunk + 1
    if ds.posix_fast is not None and ds.posix_fast.in_place and ds.cache is not None:
        keep = max(4, ds.max_pre_download)
        ds.cache._reader.prefetch_posix_window(ds.worker_chunks[chunk : chunk + keep])
