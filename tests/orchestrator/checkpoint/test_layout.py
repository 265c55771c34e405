"""orchestrator/checkpoint/layout.py: names, listing, resolving, partial clean-up, retention."""

from pathlib import Path

import pytest

from orchestrator.checkpoint import layout
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    MANIFEST_NAME,
    STATE_NAME,
    checkpoint_root,
    checkpoint_step,
    dir_size,
    latest_checkpoint,
    list_checkpoints,
    load_saved_config,
    partial_dir,
    prune,
    remove_partial,
    resolve_checkpoint,
    saved_config,
    step_dir,
)
from orchestrator.checkpoint.manifest import verify
from orchestrator.schema import to_dict
from tests.orchestrator.checkpoint.helpers import make_checkpoint, make_config


def names(paths):
    return [p.name for p in paths]


def make_steps(root, *steps, cfg=None):
    return [make_checkpoint(root, s, cfg) for s in steps]


# -- names ------------------------------------------------------------------------------------


def test_names(tmp_path):
    cfg = make_config(tmp_path / "run")
    assert checkpoint_root(cfg) == tmp_path / "run" / "checkpoints"
    assert step_dir(tmp_path, 42) == tmp_path / "step-00000042"
    assert partial_dir(tmp_path / "step-00000042") == tmp_path / "step-00000042.partial"
    assert checkpoint_step(tmp_path / "step-00000042") == 42
    for bad in ("step-42", "step-00000042.partial", "consolidated.pt"):
        with pytest.raises(ValueError, match="not a step-NNNNNNNN"):
            checkpoint_step(tmp_path / bad)


# -- listing ----------------------------------------------------------------------------------


def test_list_checkpoints_only_published_oldest_first(tmp_path):
    make_steps(tmp_path, 30, 4, 100)  # created out of order
    # Not checkpoints: a save in progress (even with a manifest), a step dir without manifest,
    # a file named like a step, a directory with a manifest but another name.
    partial = make_checkpoint(tmp_path, 200)
    partial.rename(partial_dir(partial))
    (tmp_path / "step-00000300").mkdir()
    (tmp_path / "step-00000300" / STATE_NAME).write_bytes(b"x")
    (tmp_path / "step-00000400").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST_NAME).write_text("{}")

    found = list_checkpoints(tmp_path)
    assert names(found) == ["step-00000004", "step-00000030", "step-00000100"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000100"


def test_list_checkpoints_empty_or_missing_root(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert list_checkpoints(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


# -- resolve_checkpoint -----------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    cfg = make_config(run)
    make_steps(run / "checkpoints", 1, 2, cfg=cfg)
    return run


def test_resolve_checkpoint_dir_as_given(run_dir):
    older = run_dir / "checkpoints" / "step-00000001"
    assert resolve_checkpoint(older) == older
    assert resolve_checkpoint(str(older)) == older


def test_resolve_checkpoint_dir_without_manifest_as_given(tmp_path):
    """An imported checkpoint, a file made elsewhere: `state` + `config.yaml` is enough."""
    ckpt = tmp_path / "imported"
    ckpt.mkdir()
    (ckpt / STATE_NAME).write_bytes(b"x")
    (ckpt / CONFIG_NAME).write_text("model: {}\n")
    assert resolve_checkpoint(ckpt) == ckpt


def test_resolve_run_dir_gives_latest(run_dir):
    latest = run_dir / "checkpoints" / "step-00000002"
    assert resolve_checkpoint(run_dir) == latest
    assert resolve_checkpoint(run_dir / "checkpoints") == latest


def test_resolve_run_dir_skips_unpublished(run_dir):
    (run_dir / "checkpoints" / "step-00000002" / MANIFEST_NAME).unlink()
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000001"


def test_resolve_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_resolve_non_checkpoint_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()  # a run dir without any complete checkpoint
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint") as info:
        resolve_checkpoint(tmp_path)
    assert "does not exist" not in str(info.value)


# -- remove_partial ---------------------------------------------------------------------------


def test_remove_partial(tmp_path):
    kept = make_steps(tmp_path, 1, 2)
    partial = tmp_path / "step-00000003.partial"
    (partial / STATE_NAME).mkdir(parents=True)
    (partial / STATE_NAME / "shard").write_bytes(b"x" * 10)
    deleting = tmp_path / "step-00000001.deleting.partial"
    deleting.mkdir()
    stray_file = tmp_path / "weird.partial"
    stray_file.write_bytes(b"x")

    removed = remove_partial(tmp_path)
    assert sorted(removed) == sorted([partial, deleting, stray_file])
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert all(verify(p) is None for p in kept)
    assert remove_partial(tmp_path) == []
    assert remove_partial(tmp_path / "missing") == []


# -- prune ------------------------------------------------------------------------------------


def test_prune_keep_last(tmp_path):
    make_steps(tmp_path, 1, 2, 3, 4, 5)
    removed = prune(tmp_path, keep_last=2)
    assert names(removed) == ["step-00000001", "step-00000002", "step-00000003"]
    assert sorted(names(tmp_path.iterdir())) == ["step-00000004", "step-00000005"]
    assert all(verify(p) is None for p in list_checkpoints(tmp_path))
    assert prune(tmp_path, keep_last=2) == []


def test_prune_keep_every(tmp_path):
    make_steps(tmp_path, *range(1, 8))
    removed = prune(tmp_path, keep_last=2, keep_every=3)
    assert names(removed) == ["step-00000001", "step-00000002", "step-00000004", "step-00000005"]
    assert names(list_checkpoints(tmp_path)) == ["step-00000003", "step-00000006", "step-00000007"]
    assert sorted(names(tmp_path.iterdir())) == names(list_checkpoints(tmp_path))


def test_prune_keep_last_zero_keeps_all(tmp_path):
    make_steps(tmp_path, 1, 2, 3)
    assert prune(tmp_path, keep_last=0) == []
    assert prune(tmp_path, keep_last=0, keep_every=2) == []
    assert len(list_checkpoints(tmp_path)) == 3


def test_prune_ignores_unpublished(tmp_path):
    make_steps(tmp_path, 1, 2)
    (tmp_path / "step-00000003.partial").mkdir()
    (tmp_path / "step-00000004").mkdir()  # no manifest
    prune(tmp_path, keep_last=1)
    assert sorted(names(tmp_path.iterdir())) == [
        "step-00000002",
        "step-00000003.partial",
        "step-00000004",
    ]


def test_prune_killed_mid_delete_leaves_only_a_partial(tmp_path, monkeypatch):
    make_steps(tmp_path, 1, 2, 3)
    real_rmtree = layout.shutil.rmtree

    def delete_one_file_then_die(path, *args, **kwargs):
        path = Path(path)
        (path / STATE_NAME).unlink()  # half deleted...
        raise KeyboardInterrupt  # ...when the process is killed

    monkeypatch.setattr(layout.shutil, "rmtree", delete_one_file_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(tmp_path, keep_last=1)
    monkeypatch.setattr(layout.shutil, "rmtree", real_rmtree)

    # The half-deleted checkpoint is no longer listed; only verified ones are.
    listed = list_checkpoints(tmp_path)
    assert names(listed) == ["step-00000002", "step-00000003"]
    assert all(verify(p) is None for p in listed)
    leftovers = [p for p in tmp_path.iterdir() if p not in listed]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
    assert leftovers[0].name.startswith("step-00000001")
    assert remove_partial(tmp_path) == leftovers


# -- sizes and the saved config ---------------------------------------------------------------


def test_dir_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 5)
    assert dir_size(tmp_path) == 15
    assert dir_size(tmp_path / "missing") == 0


def test_saved_config_round_trip(tmp_path):
    cfg = make_config(tmp_path / "run", "--model.n_layers", "2", "--checkpoint.keep_last", "7")
    ckpt = make_checkpoint(tmp_path, 1, cfg)
    assert saved_config(ckpt)["model"]["n_layers"] == 2
    loaded = load_saved_config(ckpt)
    assert to_dict(loaded.model) == to_dict(cfg.model)
    assert to_dict(loaded.checkpoint) == to_dict(cfg.checkpoint)
    assert loaded.checkpoint.keep_last == 7 and loaded.model.n_layers == 2


def test_saved_config_missing(tmp_path):
    assert saved_config(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_saved_config(tmp_path)
