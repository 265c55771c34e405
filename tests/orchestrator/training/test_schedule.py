"""orchestrator/training/schedule.py: warmup-stable-decay (WSD) beside warmup + decay, the schedule a
loaded checkpoint follows, and the cooldown branch (checkpoint.branch_from) on the real trainer."""

import math
import shutil

import pytest
import torch

from orchestrator.checkpoint.layout import CheckpointError
from orchestrator.checkpoint.resume import (
    check_resume_compatible,
    choose_resume,
    is_branch,
    resume_step_hint,
    resume_target,
)
from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.schedule import (
    WarmupDecay,
    WarmupStableDecay,
    build_scheduler,
    follow_schedule,
    schedule_shape,
)
from tests.orchestrator.checkpoint.helpers import flip_middle_byte, make_checkpoint, make_config
from tests.training import step_records, train

PEAK, LOW = 1e-3, 1e-4


def wsd_config(*overrides):
    return load_config(
        ["--model.name", "tiny", "--optimizer.lr", str(PEAK), "--optimizer.min_lr", str(LOW)]
        + ["--schedule.decay", "wsd", *overrides]
    )


def expected_wsd(step, warmup, start, length, shape, peak=PEAK, low=LOW):
    """The WSD learning rate written out, for `step` optimizer steps already taken."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < start:
        return peak
    p = min(1.0, (step - start) / length)
    factor = {
        "linear": 1 - p,
        "cosine": 0.5 * (1 + math.cos(math.pi * p)),
        "1-sqrt": 1 - math.sqrt(p),
    }[shape]
    return low + (peak - low) * factor


def scheduler_lrs(cfg, steps=None):
    """The lr of each optimizer step 1..steps of the trainer's scheduler for `cfg` (as the loop
    reads it: the optimizer's lr before the step, the scheduler stepped after)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(steps or cfg.train.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# -- the shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, table",
    [
        ("linear", [0.5, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]),
        ("cosine", [0.5, 1, 1, 1, 1, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2, 0, 0]),
        ("1-sqrt", [0.5, 1, 1, 1, 1, 0.5, 1 - 0.5**0.5, 1 - 0.75**0.5, 0, 0]),
    ],
)
def test_wsd_by_hand(shape, table):
    """Warmup 2, stable to 4 steps, decay over 4 (to 0), worked out by hand."""
    wsd = WarmupStableDecay(
        peak_lr=1.0, min_lr=0.0, warmup_steps=2, decay_start=4, decay_steps=4, shape=shape
    )
    assert [wsd.lr(s) for s in range(10)] == pytest.approx(table, abs=1e-15)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize(
    "length_keys, start, length",
    [
        (["--schedule.wsd_decay_steps", "6"], 14, 6),
        (["--schedule.wsd_decay_fraction", "0.25"], 15, 5),
        ([], 16, 4),  # neither: 0.2 of train.max_steps
        (["--schedule.wsd_decay_fraction", "0.33"], 13, 7),  # 6.6 rounds to 7
    ],
    ids=["wsd_decay_steps", "wsd_decay_fraction", "default fraction", "rounded fraction"],
)
def test_wsd_lr_at_every_step(shape, length_keys, start, length):
    cfg = wsd_config(
        "--schedule.wsd_shape", shape, "--schedule.warmup_steps", "3", "--train.max_steps", "20",
        *length_keys,
    )  # fmt: skip
    shape_obj = schedule_shape(cfg)
    assert (shape_obj.decay_start, shape_obj.decay_steps) == (start, length)
    want = [expected_wsd(s, 3, start, length, shape) for s in range(20)]
    assert scheduler_lrs(cfg) == pytest.approx(want, rel=1e-12)
    # The decay phase really is one: peak at its start, then down, min_lr only after the last step.
    assert max(want) == pytest.approx(PEAK) and want[start] == pytest.approx(PEAK)
    assert all(a > b for a, b in zip(want[start:], want[start + 1 :]))
    assert want[-1] > LOW and shape_obj.lr(20) == pytest.approx(LOW)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_decay_start_step_places_the_decay(shape):
    """decay_start_step before the end: the decay ends early and min_lr holds to max_steps."""
    cfg = wsd_config(
        "--schedule.wsd_shape", shape, "--schedule.warmup_steps", "2", "--train.max_steps", "16",
        "--schedule.decay_start_step", "6", "--schedule.wsd_decay_steps", "5",
    )  # fmt: skip
    lrs = scheduler_lrs(cfg)
    assert lrs == pytest.approx([expected_wsd(s, 2, 6, 5, shape) for s in range(16)], rel=1e-12)
    assert lrs[2:7] == pytest.approx([PEAK] * 5) and lrs[11:] == pytest.approx([LOW] * 5)


def test_decay_start_step_after_the_run_is_all_stable():
    """A long run's stable phase for branching: the decay starts after train.max_steps."""
    cfg = wsd_config(
        "--schedule.warmup_steps", "2", "--train.max_steps", "10",
        "--schedule.decay_start_step", "100", "--schedule.wsd_decay_steps", "10",
    )  # fmt: skip
    assert scheduler_lrs(cfg) == pytest.approx([PEAK / 2] + [PEAK] * 9, rel=1e-12)


def test_no_warmup():
    cfg = wsd_config("--schedule.warmup_steps", "0", "--train.max_steps", "4",
                     "--schedule.wsd_decay_steps", "2", "--schedule.wsd_shape", "linear")  # fmt: skip
    mid = LOW + (PEAK - LOW) / 2
    assert scheduler_lrs(cfg) == pytest.approx([PEAK, PEAK, PEAK, mid], rel=1e-12)


def test_other_shapes_unchanged():
    """decay cosine / linear / constant still build WarmupDecay over decay_steps."""
    cfg = load_config(["--model.name", "tiny", "--schedule.warmup_steps", "2",
                       "--schedule.decay", "linear", "--train.max_steps", "6"])  # fmt: skip
    assert schedule_shape(cfg) == WarmupDecay(
        peak_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, warmup_steps=2, decay_steps=6,
        decay="linear",
    )  # fmt: skip


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--schedule.wsd_decay_steps", "0"], "schedule.wsd_decay_steps must be positive"),
        (
            ["--schedule.wsd_decay_fraction", "0"],
            r"schedule.wsd_decay_fraction must be in \(0, 1\]",
        ),
        (
            ["--schedule.wsd_decay_fraction", "1.5"],
            r"schedule.wsd_decay_fraction must be in \(0, 1\]",
        ),
        (
            ["--schedule.wsd_decay_fraction", "nan"],
            r"schedule.wsd_decay_fraction must be in \(0, 1\]",
        ),
        (
            ["--schedule.wsd_decay_steps", "3", "--schedule.wsd_decay_fraction", "0.1"],
            "set only one of schedule.wsd_decay_steps=3 and schedule.wsd_decay_fraction=0.1",
        ),
        (
            ["--schedule.decay_start_step", "1"],
            r"schedule.decay_start_step=1 must be >= schedule.warmup_steps=2",
        ),
        (
            ["--schedule.decay_start_step", "-1"],
            r"schedule.decay_start_step=-1 must be >= schedule.warmup_steps=2",
        ),
        (
            ["--schedule.warmup_steps", "9"],  # 0.2 x 10 = 2 decay steps after 9 of warmup
            r"warmup \(9 steps\) and the decay phase \(2 steps\) do not fit in train.max_steps=10",
        ),
        (
            ["--schedule.wsd_decay_steps", "9"],
            r"lower schedule.warmup_steps or schedule.wsd_decay_steps",
        ),
        (
            ["--schedule.decay_steps", "5"],
            "schedule.decay_steps=5 does not apply to schedule.decay=wsd",
        ),
        (["--schedule.wsd_shape", "exp"], "schedule.wsd_shape"),
    ],
)
def test_wsd_validation_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        wsd_config("--schedule.warmup_steps", "2", "--train.max_steps", "10", *overrides)


@pytest.mark.parametrize("key", ["wsd_decay_steps", "wsd_decay_fraction", "decay_start_step"])
def test_wsd_keys_need_decay_wsd(key):
    value = "0.5" if key == "wsd_decay_fraction" else "3"
    with pytest.raises(
        ConfigError, match=f"schedule.{key}={value} applies only to schedule.decay=wsd"
    ):
        load_config(
            ["--model.name", "tiny", "--schedule.decay", "cosine", f"--schedule.{key}", value]
        )


def test_decay_start_step_fixes_the_decay_whatever_max_steps():
    """With decay_start_step and wsd_decay_steps, train.max_steps does not move the schedule (a
    run stopped at 4 steps and resumed to 8 follows one schedule)."""
    keys = ["--schedule.warmup_steps", "2", "--schedule.decay_start_step", "4",
            "--schedule.wsd_decay_steps", "4"]  # fmt: skip
    short = scheduler_lrs(wsd_config(*keys, "--train.max_steps", "4"))
    long = scheduler_lrs(wsd_config(*keys, "--train.max_steps", "8"))
    assert short == long[:4]


# -- follow_schedule: the lr after loading a checkpoint -------------------------------------------


def trained_state(cfg, steps):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def loaded(cfg, states):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg)
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])
    return optimizer, scheduler


def test_follow_schedule_same_config_changes_nothing():
    cfg = wsd_config("--schedule.warmup_steps", "2", "--train.max_steps", "8",
                     "--schedule.wsd_decay_steps", "4")  # fmt: skip
    states = trained_state(cfg, 6)
    optimizer, scheduler = loaded(cfg, states)
    before = optimizer.param_groups[0]["lr"]
    follow_schedule(scheduler, cfg.optimizer.lr)
    assert optimizer.param_groups[0]["lr"] == before  # bitwise: an exact resume stays exact
    assert scheduler.get_last_lr() == [before]


def test_follow_schedule_takes_this_runs_schedule_and_peak():
    """A branch from another run's step 3: the checkpoint's optimizer holds that run's lr; the
    next step must train at this run's lr(3), with this run's peak."""
    other = wsd_config("--schedule.warmup_steps", "2", "--train.max_steps", "8",
                       "--schedule.decay_start_step", "2", "--schedule.wsd_decay_steps", "2")  # fmt: skip
    states = trained_state(other, 3)
    assert states[0]["param_groups"][0]["lr"] == pytest.approx(expected_wsd(3, 2, 2, 2, "1-sqrt"))
    branch = load_config(
        ["--model.name", "tiny", "--optimizer.lr", "2e-3", "--optimizer.min_lr", str(LOW),
         "--schedule.decay", "wsd", "--schedule.warmup_steps", "2", "--train.max_steps", "8",
         "--schedule.decay_start_step", "3", "--schedule.wsd_decay_steps", "5",
         "--schedule.wsd_shape", "linear"]
    )  # fmt: skip
    optimizer, scheduler = loaded(branch, states)
    follow_schedule(scheduler, branch.optimizer.lr)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    want = [expected_wsd(s, 2, 3, 5, "linear", peak=2e-3) for s in range(3, 8)]
    assert lrs == pytest.approx(want, rel=1e-12)


# -- checkpoint.branch_from: which checkpoint a run starts from -----------------------------------


@pytest.fixture
def branch_point(tmp_path):
    """A published checkpoint at step 4 of another run ("long")."""
    long_cfg = make_config(tmp_path / "long")
    return make_checkpoint(tmp_path / "long" / "checkpoints", 4, long_cfg)


def test_branch_from_starts_a_run_without_checkpoints(branch_point, tmp_path):
    cfg = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point))
    assert choose_resume(cfg) == (branch_point, [])
    assert is_branch(cfg, branch_point)
    assert resume_target(cfg) == branch_point and resume_step_hint(cfg) == 4
    never = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point),
                        "--checkpoint.resume", "never")  # fmt: skip
    assert choose_resume(never) == (branch_point, [])


def test_own_checkpoints_win_over_branch_from(branch_point, tmp_path):
    run_dir = tmp_path / "cooldown"
    cfg = make_config(run_dir, "--checkpoint.branch_from", str(branch_point))
    own = make_checkpoint(run_dir / "checkpoints", 6, cfg)
    assert choose_resume(cfg) == (own, [])
    assert not is_branch(cfg, own)
    assert resume_target(cfg) == own
    # Once the run has its own checkpoints the branch point may be gone (the other run's
    # retention): the config still loads, and the run resumes its own.
    shutil.rmtree(branch_point)
    again = make_config(run_dir, "--checkpoint.branch_from", str(branch_point))
    assert choose_resume(again) == (own, [])
    check_resume_compatible(again)


def test_explicit_resume_wins_over_branch_from(branch_point, tmp_path):
    other = make_checkpoint(tmp_path / "other" / "checkpoints", 2, make_config(tmp_path / "other"))
    cfg = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point),
                      "--checkpoint.resume", str(other))  # fmt: skip
    assert choose_resume(cfg) == (other, [])


def test_damaged_branch_point_is_an_error_not_a_fresh_start(branch_point, tmp_path):
    flip_middle_byte(branch_point / "state")
    cfg = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point))
    with pytest.raises(
        CheckpointError, match="checkpoint.branch_from=.* cannot be used: .*SHA-256"
    ):
        choose_resume(cfg)


def test_branch_from_must_exist(tmp_path):
    from orchestrator.training.preflight import check_starting_point

    cfg = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="checkpoint.branch_from=.*is not a checkpoint directory"):
        check_starting_point(cfg)  # (a file check: preflight's, before any process starts)


def test_branch_from_and_init_from_exclude_each_other(branch_point, tmp_path):
    with pytest.raises(ConfigError, match="set only one of checkpoint.branch_from"):
        make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point),
                    "--checkpoint.init_from", str(branch_point))  # fmt: skip


def test_branch_from_needs_the_same_model(branch_point, tmp_path):
    cfg = make_config(tmp_path / "cooldown", "--checkpoint.branch_from", str(branch_point),
                      "--model.n_layers", "3")  # fmt: skip
    with pytest.raises(
        ConfigError, match="checkpoint.branch_from=.*different model .*model.n_layers"
    ):
        check_resume_compatible(cfg)


# -- the real trainer (one process, tiny model, 4-8 steps) -----------------------------------------

ONE = ["--strategy.devices", "1", "--eval.interval", "0", "--eval.at_start", "false",
       "--schedule.decay", "wsd"]  # fmt: skip
# The cooldown schedule: warmup 2 (TINY), stable to 4 steps, 1-sqrt decay over steps 5-8.
COOLDOWN = ["--schedule.decay_start_step", "4", "--schedule.wsd_decay_steps", "4"]
TINY_PEAK, TINY_LOW = 1e-3, 1e-4  # TINY's optimizer.lr / min_lr


def tiny_wsd(step):
    return expected_wsd(step, 2, 4, 4, "1-sqrt", peak=TINY_PEAK, low=TINY_LOW)


@pytest.fixture(scope="module")
def cooldown_run(sample_data, tmp_path_factory):
    """C: 8 steps straight with the cooldown schedule."""
    run_dir = tmp_path_factory.mktemp("wsd-straight")
    train(run_dir, sample_data, *ONE, *COOLDOWN, "--train.max_steps", "8")
    return run_dir


@pytest.mark.slow
def test_trainer_logs_the_wsd_lr(cooldown_run):
    records = step_records(cooldown_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == pytest.approx([tiny_wsd(s) for s in range(8)], rel=1e-12)


@pytest.mark.slow
def test_wsd_resume_is_bitwise(sample_data, cooldown_run, tmp_path):
    """4 steps, stop, resume to 8 (schedule fixed by decay_start_step / wsd_decay_steps) equals 8
    straight."""
    train(tmp_path, sample_data, *ONE, *COOLDOWN, "--train.max_steps", "4")
    proc = train(tmp_path, sample_data, *ONE, *COOLDOWN, "--train.max_steps", "8")
    assert "Resumed from" in proc.stdout and "step-00000004 at step 4" in proc.stdout
    resumed, straight = step_records(tmp_path), step_records(cooldown_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bitwise
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]


@pytest.mark.slow
def test_cooldown_branch(sample_data, cooldown_run, tmp_path):
    """A: a stable phase through step 4 (its own decay would start there: 3 of 3 steps), with a
    checkpoint at 4. B branches from it with the cooldown schedule and must equal C (the cooldown
    schedule from scratch) at steps 5-8 bitwise: full state carried over, B's own lr from step 5
    on (A's optimizer state holds A's lr for step 5, a decayed one)."""
    long_dir, branch_dir = tmp_path / "long", tmp_path / "cooldown"
    train(long_dir, sample_data, *ONE, "--schedule.decay_start_step", "3",
          "--schedule.wsd_decay_steps", "3", "--train.max_steps", "4")  # fmt: skip
    straight = step_records(cooldown_run)
    assert [r["loss"] for r in step_records(long_dir)] == [r["loss"] for r in straight[:4]]
    point = long_dir / "checkpoints" / "step-00000004"

    proc = train(branch_dir, sample_data, *ONE, *COOLDOWN, "--train.max_steps", "8",
                 "--checkpoint.branch_from", str(point))  # fmt: skip
    assert f"Branched from {point} at step 4" in proc.stdout
    branched = step_records(branch_dir)
    assert [r["step"] for r in branched] == [5, 6, 7, 8]
    assert [r["lr"] for r in branched] == pytest.approx(
        [tiny_wsd(s) for s in range(4, 8)], rel=1e-12
    )
    assert [r["lr"] for r in branched] == [r["lr"] for r in straight[4:]]
    assert [r["loss"] for r in branched] == [r["loss"] for r in straight[4:]]  # bitwise
    assert [r["tokens_seen"] for r in branched] == [r["tokens_seen"] for r in straight[4:]]

    # Its own checkpoints win from now on, even with the branch point gone.
    shutil.rmtree(point)
    proc = train(branch_dir, sample_data, *ONE, *COOLDOWN, "--train.max_steps", "9",
                 "--checkpoint.branch_from", str(point))  # fmt: skip
    assert f"Resumed from {branch_dir / 'checkpoints' / 'step-00000008'} at step 8" in proc.stdout
    assert step_records(branch_dir)[-1]["step"] == 9
    assert step_records(branch_dir)[-1]["lr"] == pytest.approx(TINY_LOW, rel=1e-12)
