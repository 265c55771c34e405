"""Python garbage collection under the training loop's control (train.gc_interval).

After set-up: `gc.freeze()`, `gc.disable()`, and every rank collects (`gc.collect(1)`) at the same
steps; train.gc_interval 0 leaves `gc` alone. Why: docs/training.md, "Garbage collection".

    with GarbageCollection(cfg) as collector:   # or start() ... stop()
        while ...:
            collector.maybe_collect(step)
"""

from __future__ import annotations

import gc
import os
import time

_disabled_by_us = False  # whether a started GarbageCollection has switched automatic GC off


def _after_fork_in_child() -> None:
    global _disabled_by_us
    if _disabled_by_us:
        _disabled_by_us = False
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class GarbageCollection:
    """`start()` after set-up, `maybe_collect(step)` once per optimizer step on every rank,
    `stop()` when the loop ends (safe to call twice, or without `start()`)."""

    def __init__(self, cfg) -> None:
        self.interval = int(cfg.train.gc_interval)
        self.active = False
        self.collections = 0  # manual collections so far
        self.seconds = 0.0  # time spent in them
        self._was_enabled = True

    def start(self) -> None:
        """Freeze what set-up built and switch automatic collection off (no-op for interval 0)."""
        global _disabled_by_us
        if self.interval <= 0 or self.active:
            return
        self._was_enabled = gc.isenabled()
        gc.collect(1)  # the young garbage of set-up, not frozen forever
        gc.freeze()
        gc.disable()
        self.active = True
        _disabled_by_us = self._was_enabled  # forked children get back what they would have had

    def maybe_collect(self, step: int) -> float | None:
        """Collect the young generations when `step` is a multiple of the interval; returns the
        seconds it took, or None when this step does not collect."""
        if not self.active or step % self.interval:
            return None
        started = time.perf_counter()
        gc.collect(1)
        elapsed = time.perf_counter() - started
        self.collections += 1
        self.seconds += elapsed
        return elapsed

    def stop(self) -> None:
        """Unfreeze and give collection back to Python (as it was before `start()`)."""
        global _disabled_by_us
        if not self.active:
            return
        self.active = False
        _disabled_by_us = False
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()

    def __enter__(self) -> GarbageCollection:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
