"""orchestrator/checkpoint/resume.py: which checkpoint a run resumes from, and whether it can."""

import json

import pytest

from orchestrator.checkpoint.layout import MANIFEST_NAME, STATE_NAME, CheckpointError
from orchestrator.checkpoint.resume import (
    check_resume_compatible,
    check_resume_strategy,
    choose_resume,
    resume_step_hint,
    resume_target,
)
from orchestrator.schema import ConfigError
from tests.orchestrator.checkpoint.helpers import (
    flip_middle_byte,
    make_checkpoint,
    make_config,
    truncate,
)


@pytest.fixture
def run(tmp_path):
    """A run dir with checkpoints at steps 2 and 4 (both written with the tiny model)."""
    run = tmp_path / "run"
    cfg = make_config(run)
    root = run / "checkpoints"
    return run, [make_checkpoint(root, s, cfg) for s in (2, 4)]


# -- choose_resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [flip_middle_byte, truncate], ids=["bad checksum", "truncated"])
def test_auto_falls_back_from_damaged_newest(run, damage):
    run_dir, (older, newest) = run
    damage(newest / STATE_NAME)
    path, skipped = choose_resume(make_config(run_dir))
    assert path == older
    assert len(skipped) == 1
    skipped_path, reason = skipped[0]
    assert skipped_path == newest and STATE_NAME in reason
    assert ("SHA-256" if damage is flip_middle_byte else "truncated") in reason


def test_auto_takes_newest_when_good(run):
    run_dir, (_, newest) = run
    assert choose_resume(make_config(run_dir)) == (newest, [])


def test_auto_without_checksums_takes_same_size_corruption(run):
    run_dir, (_, newest) = run
    flip_middle_byte(newest / STATE_NAME)
    cfg = make_config(run_dir, "--checkpoint.verify_checksums", "false")
    assert choose_resume(cfg) == (newest, [])


def test_auto_all_damaged_gives_none_and_every_reason(run):
    run_dir, (older, newest) = run
    truncate(older / STATE_NAME)
    (newest / "config.yaml").unlink()
    path, skipped = choose_resume(make_config(run_dir))
    assert path is None
    assert [p for p, _ in skipped] == [newest, older]  # newest first, as tried
    assert skipped[0][1] == "missing file config.yaml"


def test_auto_ignores_unpublished(run):
    run_dir, (older, newest) = run
    (newest / MANIFEST_NAME).unlink()  # an interrupted save: not a checkpoint, not "damaged"
    assert choose_resume(make_config(run_dir)) == (older, [])


def test_auto_without_checkpoints(tmp_path):
    assert choose_resume(make_config(tmp_path / "fresh")) == (None, [])


def test_never(run):
    run_dir, _ = run
    cfg = make_config(run_dir, "--checkpoint.resume", "never")
    assert choose_resume(cfg) == (None, [])
    assert resume_target(cfg) is None
    assert resume_step_hint(cfg) is None


def test_explicit_path(run, tmp_path):
    run_dir, (older, newest) = run
    cfg = make_config(tmp_path / "other_run", "--checkpoint.resume", str(older))
    assert choose_resume(cfg) == (older, [])


def test_explicit_damaged_path_raises(run, tmp_path):
    run_dir, (older, newest) = run
    cfg = make_config(tmp_path / "other_run", "--checkpoint.resume", str(newest))
    flip_middle_byte(newest / STATE_NAME)
    with pytest.raises(CheckpointError, match="cannot be used") as info:
        choose_resume(cfg)
    assert str(newest) in str(info.value) and "SHA-256" in str(info.value)


def test_explicit_path_not_a_checkpoint_raises(run):
    run_dir, _ = run
    cfg = make_config(run_dir, "--checkpoint.resume", str(run_dir))  # a run dir, no manifest
    with pytest.raises(CheckpointError, match="no manifest"):
        choose_resume(cfg)


# -- resume_target / resume_step_hint ---------------------------------------------------------


def test_resume_target_does_not_verify(run):
    run_dir, (_, newest) = run
    truncate(newest / STATE_NAME)
    assert resume_target(make_config(run_dir)) == newest  # cheap: no verification


def test_resume_step_hint_reads_the_manifest(run, tmp_path):
    run_dir, (older, newest) = run
    assert resume_step_hint(make_config(run_dir)) == 4
    manifest = json.loads((newest / MANIFEST_NAME).read_text())
    manifest["step"] = 1234
    (newest / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert resume_step_hint(make_config(run_dir)) == 1234
    explicit = make_config(tmp_path / "x", "--checkpoint.resume", str(older))
    assert resume_step_hint(explicit) == 2
    assert resume_step_hint(make_config(tmp_path / "fresh")) is None


# -- check_resume_compatible ------------------------------------------------------------------


def test_compatible_same_model(run):
    run_dir, _ = run
    check_resume_compatible(make_config(run_dir))


def test_incompatible_model_names_the_key(run):
    run_dir, (_, newest) = run
    cfg = make_config(run_dir, "--model.n_layers", "2")
    with pytest.raises(ConfigError) as info:
        check_resume_compatible(cfg)
    message = str(info.value)
    assert "model.n_layers=4 there but 2 here" in message
    assert str(newest) in message
    assert "model.d_model" not in message  # only the differing keys


def test_kernel_fields_may_change(run):
    run_dir, _ = run
    cfg = make_config(
        run_dir,
        "--model.attention",
        "eager",
        "--model.rmsnorm_kernel",
        "eager",
        "--model.loss_kernel",
        "cross_entropy",
        "--model.compile",
        "true",
    )
    check_resume_compatible(cfg)


def test_incompatible_init_from(run, tmp_path):
    _, (older, _) = run
    cfg = make_config(
        tmp_path / "new_run", "--checkpoint.init_from", str(older), "--model.d_model", "128"
    )
    with pytest.raises(ConfigError, match="model.d_model=256 there but 128 here"):
        check_resume_compatible(cfg)


def test_compatible_never_skips_the_run_dir(run):
    run_dir, _ = run
    check_resume_compatible(
        make_config(run_dir, "--checkpoint.resume", "never", "--model.n_layers", "2")
    )


# -- check_resume_strategy --------------------------------------------------------------------


def test_resume_strategy_same_strategy(run):
    run_dir, (_, newest) = run
    check_resume_strategy(newest, make_config(run_dir), world_size=1)


def test_resume_strategy_file_into_deepspeed(run):
    run_dir, (_, newest) = run
    cfg = make_config(run_dir, "--strategy.name", "deepspeed")
    with pytest.raises(ConfigError, match="cannot resume from") as info:
        check_resume_strategy(newest, cfg, world_size=1)
    assert "'file'" in str(info.value) and "'deepspeed'" in str(info.value)
    assert "--checkpoint.init_from" in str(info.value)


def test_resume_strategy_replicated_into_gathered_fsdp(run):
    run_dir, (_, newest) = run
    cfg = make_config(run_dir, "--strategy.name", "fsdp", "--strategy.sharded_checkpoint", "false")
    with pytest.raises(ConfigError, match="laid out for ddp, this run uses fsdp"):
        check_resume_strategy(newest, cfg, world_size=1)


def test_resume_strategy_deepspeed_world_size(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--strategy.name", "deepspeed")
    ckpt = make_checkpoint(run_dir / "checkpoints", 1, cfg, world_size=2)
    (ckpt / STATE_NAME).unlink()
    (ckpt / STATE_NAME).mkdir()
    (ckpt / STATE_NAME / "latest").write_text("checkpoint")
    check_resume_strategy(ckpt, cfg, world_size=2)
    with pytest.raises(ConfigError, match="ZeRO partitions are for 2 processes, this run has 4"):
        check_resume_strategy(ckpt, cfg, world_size=4)
