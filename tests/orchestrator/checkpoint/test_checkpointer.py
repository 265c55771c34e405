"""orchestrator/checkpoint/checkpointer.py with a real single-process Fabric on CPU.

A single device needs no `fabric.launch()` (Fabric only insists on it for several devices), so
everything runs in this process: setup, save, publish, load.
"""

import random

import numpy as np
import pytest
import torch
from lightning_fabric import Fabric

from orchestrator.checkpoint import checkpointer as checkpointer_mod
from orchestrator.checkpoint.checkpointer import Checkpointer, write_weights_checkpoint
from orchestrator.checkpoint.consolidate import load_model_state
from orchestrator.checkpoint.files import load_tensors
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    META_NAME,
    STATE_NAME,
    CheckpointError,
    dir_size,
    list_checkpoints,
    load_saved_config,
)
from orchestrator.checkpoint.manifest import config_hash, manifest_step, read_manifest, verify
from orchestrator.schema import to_dict
from tests.orchestrator.checkpoint.helpers import flip_middle_byte, make_checkpoint, make_config


@pytest.fixture
def fabric():
    return Fabric(accelerator="cpu", devices=1)


def make_state(fabric, seed=0, steps=1):
    """A tiny model + AdamW after `steps` updates (so the optimizer has state), plus plain dicts."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(steps):
        train_step(model, optimizer)
    return {
        "model": model,
        "optimizer": optimizer,
        "guard": {"bad_steps": seed},
        "progress": {"step": steps, "tokens_seen": steps * 16, "initial_val_loss": 1.5 + seed},
    }


def train_step(model, optimizer):
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(5, 4, generator=generator)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def weights(state):
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def leftovers(root):
    return [p.name for p in root.iterdir() if p.name.endswith(".partial")]


# -- save -------------------------------------------------------------------------------------


def test_fabric_is_single_device(fabric):
    assert checkpointer_mod.writes_single_file(fabric) and fabric.world_size == 1


def test_save_publishes_a_verified_checkpoint(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric, steps=3)

    report = ckpt.save(state, 3, tokens_seen=48)
    final = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert report.path == final and report.step == 3
    assert verify(final) is None
    assert leftovers(final.parent) == []
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["manifest.json", STATE_NAME, CONFIG_NAME]
    )
    manifest = read_manifest(final)
    assert manifest["step"] == 3 and manifest["tokens_seen"] == 48
    assert manifest["world_size"] == 1 and manifest["strategy"] == cfg.strategy.name
    assert manifest["config_hash"] == config_hash(cfg)
    assert to_dict(load_saved_config(final).model) == to_dict(cfg.model)
    assert report.size_bytes == dir_size(final) > 0 and report.total_bytes == dir_size(final.parent)
    assert ckpt.completed == [report]

    # The file holds plain state dicts, loadable without pickled code.
    saved = load_tensors(final / STATE_NAME)
    assert set(saved) == {"model", "optimizer", "guard", "progress", "rng"}
    assert all(torch.equal(saved["model"][k], v) for k, v in weights(state).items())
    assert saved["progress"] == state["progress"]
    assert len(saved["rng"]) == 1  # one stream per rank


def test_save_replaces_a_stale_partial(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    stale = tmp_path / "run" / "checkpoints" / "step-00000001.partial"
    stale.mkdir(parents=True)
    (stale / "junk").write_bytes(b"from an interrupted save")
    Checkpointer(fabric, cfg).save(make_state(fabric), 1, tokens_seen=16)
    final = stale.with_name("step-00000001")
    assert not stale.exists() and not (final / "junk").exists()
    assert "junk" not in read_manifest(final)["files"]
    assert verify(final) is None


def test_save_same_step_again_replaces_it(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    ckpt.save(make_state(fabric, seed=0), 2, tokens_seen=32)
    again = make_state(fabric, seed=1)
    report = ckpt.save(again, 2, tokens_seen=32)
    assert verify(report.path) is None
    saved = load_tensors(report.path / STATE_NAME)
    assert all(torch.equal(saved["model"][k], v) for k, v in weights(again).items())


def test_failed_write_keeps_previous_checkpoints(fabric, tmp_path, monkeypatch):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    first = ckpt.save(make_state(fabric), 1, tokens_seen=16).path

    def disk_full(state, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer_mod, "write_state_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        ckpt.save(make_state(fabric), 2, tokens_seen=32)
    assert "previous checkpoints are intact" in str(info.value)
    assert list_checkpoints(first.parent) == [first] and verify(first) is None
    assert leftovers(first.parent) == []


# -- when to save -----------------------------------------------------------------------------


def test_due_follows_interval_and_last_step(fabric, tmp_path):
    cfg = make_config(tmp_path, "--checkpoint.interval", "3", "--train.max_steps", "7")
    ckpt = Checkpointer(fabric, cfg)
    assert [s for s in range(1, 8) if ckpt.due(s)] == [3, 6, 7]
    never = make_config(tmp_path, "--checkpoint.interval", "0", "--train.max_steps", "7")
    assert [s for s in range(1, 8) if Checkpointer(fabric, never).due(s)] == [7]


def test_maybe_save(fabric, tmp_path):
    cfg = make_config(tmp_path / "run", "--checkpoint.interval", "2", "--train.max_steps", "3")
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric)
    root = tmp_path / "run" / "checkpoints"
    saved = []
    for step in (1, 2, 3):
        state["progress"].update(step=step, tokens_seen=step * 16)
        report = ckpt.maybe_save(state, step)
        if report is None:
            assert not (root / f"step-{step:08d}").exists()
        else:
            saved.append(step)
            assert read_manifest(report.path)["tokens_seen"] == step * 16  # from the progress
    assert saved == [2, 3]
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]


# -- retention --------------------------------------------------------------------------------


def test_keep_last_and_keep_every_after_saves(fabric, tmp_path):
    cfg = make_config(
        tmp_path / "run", "--checkpoint.keep_last", "2", "--checkpoint.keep_every", "3"
    )
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric)
    root = tmp_path / "run" / "checkpoints"
    for step in range(1, 8):
        ckpt.save(state, step, tokens_seen=step * 16)
        assert verify(root / f"step-{step:08d}") is None
    assert [p.name for p in list_checkpoints(root)] == [
        "step-00000003",
        "step-00000006",
        "step-00000007",
    ]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in list_checkpoints(root)]


def test_keep_last_zero_keeps_all(fabric, tmp_path):
    cfg = make_config(tmp_path / "run", "--checkpoint.keep_last", "0")
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric)
    for step in range(1, 5):
        ckpt.save(state, step, tokens_seen=0)
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 4


def test_retention_never_deletes_the_checkpoint_just_written(fabric, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--checkpoint.keep_last", "1")
    root = run_dir / "checkpoints"
    make_checkpoint(root, 10, cfg)
    damaged = make_checkpoint(root, 20, cfg)
    flip_middle_byte(damaged / STATE_NAME)  # the run falls back to step 10 and trains on
    report = Checkpointer(fabric, cfg).save(make_state(fabric), 15, tokens_seen=0)
    assert report.path.exists() and verify(report.path) is None


# -- async ------------------------------------------------------------------------------------


def test_async_save_snapshots_then_publishes(fabric, tmp_path):
    cfg = make_config(tmp_path / "run", "--checkpoint.async_save", "true")
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric)
    before = weights(state)
    report = ckpt.save(state, 1, tokens_seen=16)
    assert report.write_seconds is None  # still being written
    with torch.no_grad():  # training goes on while the thread writes
        for p in state["model"].parameters():
            p.add_(1.0)
    ckpt.wait()
    assert verify(report.path) is None and leftovers(report.path.parent) == []
    saved = load_tensors(report.path / STATE_NAME)["model"]
    assert all(
        torch.equal(saved[k], v) for k, v in before.items()
    )  # the snapshot, not later weights
    assert [r.path for r in ckpt.completed] == [report.path]
    assert ckpt.completed[0].write_seconds is not None


def test_async_save_failure_surfaces_at_wait(fabric, tmp_path, monkeypatch):
    cfg = make_config(tmp_path / "run", "--checkpoint.async_save", "true")
    ckpt = Checkpointer(fabric, cfg)

    def broken(state, path):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpointer_mod, "write_state_file", broken)
    ckpt.save(make_state(fabric), 1, tokens_seen=16)
    with pytest.raises(CheckpointError, match="disk on fire"):
        ckpt.wait()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    ckpt.wait()  # reported once


# -- load -------------------------------------------------------------------------------------


def test_load_restores_model_optimizer_plain_state_and_rng(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    state = make_state(fabric, seed=0, steps=3)
    path = ckpt.save(state, 3, tokens_seen=48).path
    # What the run would draw next, right after the save.
    expected_rng = (torch.rand(4), random.random(), np.random.rand(3))
    train_step(state["model"], state["optimizer"])
    expected_next = weights(state)  # one more step from the saved state

    # A fresh process: other weights, other optimizer state, other random streams.
    fresh = make_state(fabric, seed=1, steps=1)
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    ckpt.load(path, fresh)

    saved = load_tensors(path / STATE_NAME)
    assert all(torch.equal(v, saved["model"][k]) for k, v in weights(fresh).items())
    opt = fresh["optimizer"].state_dict()
    assert opt["param_groups"][0]["lr"] == 1e-2
    for index, entry in saved["optimizer"]["state"].items():
        assert torch.equal(opt["state"][index]["step"], entry["step"])
        assert int(entry["step"]) == 3
        assert torch.equal(opt["state"][index]["exp_avg"], entry["exp_avg"])
        assert torch.equal(opt["state"][index]["exp_avg_sq"], entry["exp_avg_sq"])
    assert fresh["progress"] == {"step": 3, "tokens_seen": 48, "initial_val_loss": 1.5}
    assert fresh["guard"] == {"bad_steps": 0}
    assert "rng" not in fresh
    rng = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(rng[0], expected_rng[0]) and rng[1] == expected_rng[1]
    assert np.array_equal(rng[2], expected_rng[2])

    # Training continues exactly as it would have without the restart.
    train_step(fresh["model"], fresh["optimizer"])
    assert all(torch.equal(v, expected_next[k]) for k, v in weights(fresh).items())


def test_load_refuses_unsafe_pickles(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    path = ckpt.save(make_state(fabric), 1, tokens_seen=16).path
    torch.save({"model": object(), "rng": None}, path / STATE_NAME)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load(path, make_state(fabric))


def test_load_weights(fabric, tmp_path):
    cfg = make_config(tmp_path / "run")
    ckpt = Checkpointer(fabric, cfg)
    source = make_state(fabric, seed=0, steps=2)
    path = ckpt.save(source, 2, tokens_seen=32).path
    fresh = make_state(fabric, seed=1, steps=0)
    ckpt.load_weights(path, fresh["model"])
    assert all(torch.equal(v, weights(source)[k]) for k, v in weights(fresh).items())
    assert fresh["optimizer"].state_dict()["state"] == {}  # only the weights

    flip_middle_byte(path / STATE_NAME)
    with pytest.raises(CheckpointError, match="init_from.*cannot be used.*SHA-256"):
        ckpt.load_weights(path, fresh["model"])


# -- write_weights_checkpoint -----------------------------------------------------------------


def test_write_weights_checkpoint(tmp_path):
    cfg = make_config(tmp_path / "run")
    out = tmp_path / "imported"
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    (partial / "tokenizer.model").write_bytes(b"pieces")  # files already there become part of it
    model_state = {"w": torch.randn(3, 3), "b": torch.zeros(3)}

    assert write_weights_checkpoint(out, model_state, cfg, {"source": "hf:tiny"}) == out
    assert not partial.exists()
    assert verify(out) is None
    assert manifest_step(out) == 0
    manifest = read_manifest(out)
    assert manifest["model_only"] is True and manifest["source"] == "hf:tiny"
    assert manifest["tokens_seen"] == 0 and manifest["config_hash"] == config_hash(cfg)
    assert set(manifest["files"]) == {STATE_NAME, CONFIG_NAME, META_NAME, "tokenizer.model"}
    loaded = load_model_state(out)
    assert set(loaded) == set(model_state)
    assert all(torch.equal(loaded[k], v) for k, v in model_state.items())
    assert load_tensors(out / STATE_NAME)["progress"]["step"] == 0

    # Writing it again replaces it, still verified.
    other = {"w": torch.ones(3, 3), "b": torch.ones(3)}
    write_weights_checkpoint(out, other, cfg, {})
    assert verify(out) is None and not partial.exists()
    assert torch.equal(load_model_state(out)["w"], other["w"])
    assert "tokenizer.model" not in read_manifest(out)["files"]
