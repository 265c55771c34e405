"""GarbageCollection (train.gc_interval): automatic GC off during the loop, collections at
multiples of the interval only, everything given back at the end; 0 leaves gc alone."""

import gc
import os

import pytest

from orchestrator.config import Config, load_config
from orchestrator.schema import ConfigError
from orchestrator.training.garbage import GarbageCollection


def config(interval: int) -> Config:
    cfg = Config()
    cfg.train.gc_interval = interval
    return cfg


@pytest.fixture(autouse=True)
def gc_restored():
    """Whatever a test does, the process leaves with automatic collection on and nothing frozen."""
    yield
    gc.unfreeze()
    gc.enable()


def record_collections(monkeypatch) -> list:
    calls = []
    real = gc.collect

    def collect(generation=2):
        calls.append(generation)
        return real(generation)

    monkeypatch.setattr(gc, "collect", collect)
    return calls


def test_automatic_gc_is_off_and_collection_follows_the_interval(monkeypatch):
    assert gc.isenabled()
    collector = GarbageCollection(config(3))
    collector.start()
    assert not gc.isenabled()
    assert gc.get_freeze_count() > 0  # set-up's objects are out of the collector's sight
    calls = record_collections(monkeypatch)
    collected = [step for step in range(1, 11) if collector.maybe_collect(step) is not None]
    assert collected == [3, 6, 9]
    assert calls == [1, 1, 1]  # young generations only, once per multiple of the interval
    assert collector.collections == 3 and collector.seconds >= 0
    assert not gc.isenabled()  # a collection does not switch automatic GC back on
    collector.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    collector.stop()  # idempotent
    assert gc.isenabled()
    assert collector.maybe_collect(3) is None  # stopped: no more manual collections


def test_zero_leaves_gc_alone(monkeypatch):
    gc.disable()  # whatever the state is, interval 0 does not touch it
    collector = GarbageCollection(config(0))
    calls = record_collections(monkeypatch)
    collector.start()
    assert not gc.isenabled() and gc.get_freeze_count() == 0
    assert all(collector.maybe_collect(step) is None for step in range(0, 5))
    collector.stop()
    assert not gc.isenabled() and calls == []
    gc.enable()
    with GarbageCollection(config(0)):
        assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.isenabled() and calls == []


def test_context_manager_restores_on_error_and_keeps_a_disabled_gc_disabled():
    with pytest.raises(RuntimeError), GarbageCollection(config(10)):
        assert not gc.isenabled()
        raise RuntimeError("the loop failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()  # switched off by someone else before: stop() does not switch it on
    with GarbageCollection(config(10)):
        pass
    assert not gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_get_automatic_gc_back():
    """DataLoader workers forked during the loop never call maybe_collect."""
    with GarbageCollection(config(10)):
        pid = os.fork()
        if pid == 0:  # the child
            os._exit(0 if gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
        assert not gc.isenabled()  # the parent stays under the loop's control
    assert os.waitstatus_to_exitcode(status) == 0


def test_gc_interval_is_validated():
    assert load_config([]).train.gc_interval == 1000
    assert load_config(["--train.gc_interval", "0"]).train.gc_interval == 0
    with pytest.raises(ConfigError, match="train.gc_interval must be >= 0"):
        load_config(["--train.gc_interval", "-1"])
