import os

import pytest
import yaml

from orchestrator.config import Config, config_from_dict, load_config, save_config
from orchestrator.schema import ConfigError, reference, to_dict
from tests.conftest import REPO_ROOT


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"train": {"max_steps": 7, "micro_batch_size": 2}, "model": {"name": "tiny"}}
        )
    )
    cfg = load_config(
        [
            "--config",
            str(path),
            "--train.max_steps",
            "10",
            "--optimizer.lr=1e-3",
            "--model.n_layers",
            "2",
        ]
    )
    assert cfg.train.max_steps == 10
    assert cfg.train.micro_batch_size == 2
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    # The named size fills every model key; explicit keys override it.
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layers) == ("tiny", 256, 2)


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(["--config", str(path)])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["--model.name", "tiny", "--train.max_steps", "3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["--train.max_stepz", "3"],
            "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'",
        ),
        (["--bogus.key", "1"], "unknown config key 'bogus'"),
        (
            ["--model.name", "tiny", "--model.n_heads", "7"],
            "model.n_heads=7 does not divide model.d_model=256",
        ),
        (
            ["--model.name", "tiny", "--model.n_kv_heads", "3"],
            "model.n_kv_heads=3 does not divide model.n_heads=8",
        ),
        (
            ["--model.name", "gpt-99"],
            "model.name='gpt-99' is not a known size; known sizes: micro-0.6m, micro-1m",
        ),
        (["--train.max_steps", "ten"], "train.max_steps='ten' must be an integer"),
        (["--strategy.precision", "fp8"], "strategy.precision='fp8' is not one of"),
        (
            ["--optimizer.min_lr", "1", "--optimizer.lr", "0.1"],
            "optimizer.min_lr=1.0 must be between",
        ),
        (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["--train.max_steps"], "has no value"),
        (["--checkpoint.remote_dir", "s3://bucket"], "checkpoint.remote_dir='s3://bucket' must be"),
        (["--checkpoint.remote_dir", "/tmp/x"], "must be an s3:// URL"),
        (["--data.dir", "s3://KEY:SECRET@bucket/x"], "data.dir must not hold credentials"),
        (["--storage.endpoint_url", "minio:9000"], "storage.endpoint_url='minio:9000' must be"),
        (["--data.max_cache_size", "big"], "data.max_cache_size: size 'big' is not like"),
        (["--data.tokenizer", "s3://b/t.model"], "data.tokenizer='s3://b/t.model': the tokenizer"),
        (
            ["--storage.aws_secret_access_key", "x"],
            "unknown config key 'storage.aws_secret_access_key'",
        ),
    ],
)
def test_bad_config_names_the_key(argv, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert fragment in str(info.value)


def test_global_batch_sets_accumulation():
    cfg = load_config(
        ["--model.name", "tiny", "--train.micro_batch_size", "4", "--train.global_batch_size", "32"]
    )
    assert cfg.gradient_accumulation(world_size=2) == 4
    cfg = load_config(
        [
            "--model.name",
            "tiny",
            "--train.micro_batch_size",
            "4",
            "--train.seq_len",
            "128",
            "--train.global_batch_tokens",
            "4096",
        ]
    )
    assert cfg.gradient_accumulation(world_size=2) == 4
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size x processes"):
        cfg.gradient_accumulation(world_size=3)


def test_reference_documents_every_key():
    rows = reference(Config)
    keys = {r[0] for r in rows}
    assert {
        "train.max_steps",
        "model.n_kv_heads",
        "strategy.precision",
        "checkpoint.resume",
    } <= keys
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]


HELP_MAX_CHARS = 150


def test_every_key_has_a_one_line_help():
    """doc() promises one line per key (the reference table's description); longer explanations
    belong on the topic pages of docs/."""
    fits = {
        key: "\n" not in help and len(help) <= HELP_MAX_CHARS
        for key, _, _, help in reference(Config)
    }
    too_long = sorted(key for key, ok in fits.items() if not ok)
    assert not too_long, f"help over one line of {HELP_MAX_CHARS} characters: {too_long}"


def test_resolved_config_holds_absolute_paths(tmp_path, monkeypatch):
    """A saved config means the same from any directory (export reads data.tokenizer from it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imported").mkdir()
    cfg = load_config(
        ["--data.dir", "tokens", "--data.tokenizer", "tok/sp.model", "--run.dir", "runs/x"]
        + ["--checkpoint.init_from", "imported", "--data.val_dir", "s3://bucket/val"]
    )
    assert cfg.data.dir == str(tmp_path / "tokens")
    assert cfg.data.tokenizer == str(tmp_path / "tok" / "sp.model")
    assert cfg.run.dir == str(tmp_path / "runs" / "x")
    assert cfg.checkpoint.init_from == str(tmp_path / "imported")
    assert cfg.data.val_dir == "s3://bucket/val"  # URLs are left alone
    assert cfg.checkpoint.resume == "auto"
    built = Config()  # built in code (e.g. by `orchestrator import`), not loaded
    built.data.tokenizer = "relative.model"
    save_config(built, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["tokenizer"] == str(tmp_path / "relative.model")
    assert built.data.tokenizer == "relative.model"  # saving does not change the config


@pytest.mark.parametrize("accelerator", ["auto", "cuda", "cpu"])
def test_fp16_mixed_precision_is_refused_with_the_reason(accelerator):
    """fp16 needs loss scaling, which the trainer does not support (guard-skipped steps never reach
    the scaler's update; fused AdamW cannot be unscaled): refused before any process starts."""
    with pytest.raises(ConfigError) as info:
        load_config(["--strategy.precision", "16-mixed", "--strategy.accelerator", accelerator])
    message = str(info.value)
    assert "strategy.precision=16-mixed" in message and "not supported" in message
    assert "loss scal" in message and "bf16-mixed" in message and "A100" in message


def test_fabric_run_fp16_flag_is_refused_too(monkeypatch):
    """`fabric run --precision=16` changes the config after load_config: validated again."""
    from orchestrator.parallel.launch import resolve_launch

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LT_CLI_USED", "1")
    monkeypatch.setenv("LT_PRECISION", "16")
    with pytest.raises(ConfigError, match="strategy.precision=16-mixed is not supported"):
        resolve_launch(load_config([]))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--optimizer.beta1", "1.0"], "optimizer.beta1 must be in [0, 1)"),
        (["--optimizer.beta1", "-0.1"], "optimizer.beta1 must be in [0, 1)"),
        (["--optimizer.beta2", "1.5"], "optimizer.beta2 must be in [0, 1)"),
        (["--optimizer.beta2", "nan"], "optimizer.beta2 must be in [0, 1)"),
        (["--optimizer.eps", "0"], "optimizer.eps must be positive"),
        (["--optimizer.eps", "-1e-8"], "optimizer.eps must be positive"),
        (["--optimizer.lr", "0"], "optimizer.lr must be positive"),
        (["--optimizer.lr", "nan"], "optimizer.lr must be positive"),
        (["--optimizer.lr", "inf"], "optimizer.lr must be positive"),
        (["--optimizer.min_lr", "-1e-5"], "optimizer.min_lr=-1e-05 must be between 0"),
        (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay must be >= 0"),
        (["--optimizer.grad_clip", "-1"], "optimizer.grad_clip must be >= 0 (0 disables"),
        (["--optimizer.grad_clip", "nan"], "optimizer.grad_clip must be >= 0"),
        (["--schedule.warmup_steps", "-1"], "schedule.warmup_steps must be >= 0"),
        (["--schedule.decay_steps", "0"], "schedule.decay_steps must be positive, or null"),
        (["--schedule.decay_steps", "-5"], "schedule.decay_steps must be positive, or null"),
        (["--guard.spike_factor", "-2"], "guard.spike_factor must be >= 0"),
        (["--guard.spike_factor", "nan"], "guard.spike_factor must be >= 0"),
        (["--guard.rollback_after", "-1"], "guard.rollback_after must be >= 0"),
        (["--guard.max_rollbacks", "-1"], "guard.max_rollbacks must be >= 0"),
        (["--checkpoint.keep_last", "-1"], "checkpoint.keep_last must be >= 0"),
        (["--checkpoint.keep_every", "-1"], "checkpoint.keep_every must be >= 0"),
        (["--train.gc_interval", "-1"], "train.gc_interval must be >= 0"),
        (
            ["--strategy.name", "deepspeed", "--checkpoint.async_save", "true"],
            "checkpoint.async_save=true is not supported with strategy.name=deepspeed",
        ),
    ],
)
def test_values_torch_would_reject_in_the_ranks_are_refused_here(argv, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert fragment in str(info.value)


def test_boundary_values_are_accepted():
    cfg = load_config(
        ["--optimizer.beta1", "0", "--optimizer.beta2", "0.999", "--optimizer.weight_decay", "0"]
        + ["--optimizer.grad_clip", "0", "--optimizer.min_lr", "0", "--schedule.warmup_steps", "0"]
        + ["--schedule.decay_steps", "1", "--guard.spike_factor", "0", "--train.gc_interval", "0"]
        + ["--checkpoint.keep_last", "0", "--checkpoint.keep_every", "0"]
    )
    assert (cfg.optimizer.beta1, cfg.optimizer.grad_clip, cfg.schedule.decay_steps) == (0, 0, 1)
    # async save stays allowed for the strategies that do (or will) support it
    for name in ("ddp", "fsdp", "single"):
        load_config(["--strategy.name", name, "--checkpoint.async_save", "true"])


def test_async_save_of_gathered_fsdp_checkpoints_is_refused():
    with pytest.raises(ConfigError, match="strategy.sharded_checkpoint=true"):
        load_config(
            ["--strategy.name", "fsdp", "--strategy.sharded_checkpoint", "false"]
            + ["--checkpoint.async_save", "true"]
        )
    load_config(["--strategy.name", "fsdp", "--checkpoint.async_save", "true"])  # sharded: fine
