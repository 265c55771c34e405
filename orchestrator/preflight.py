"""Checks on files and sizes that must pass before any process, model or optimizer is built."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import Config
from orchestrator.schema import ConfigError

SPLITS = ("train", "val")


def check_inputs(cfg: Config) -> None:
    data_dir = Path(cfg.data.dir)
    if not data_dir.is_dir():
        raise ConfigError(
            f"data.dir={cfg.data.dir} does not exist: prepare data with "
            "`orchestrator prepare --input RAW_DIR --output DIR --tokenizer TOKENIZER.model` "
            "(or `make sample-data` for the built-in sample) and point data.dir at its output"
        )
    for split in SPLITS:
        if not (data_dir / split / "index.json").is_file():
            raise ConfigError(
                f"data.dir={cfg.data.dir} has no prepared '{split}' split ({data_dir / split / 'index.json'} "
                "is missing): run `orchestrator prepare` on it again"
            )
    tokenizer_path = Path(cfg.data.tokenizer)
    if not tokenizer_path.is_file():
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} does not exist: train one with "
            "`orchestrator tokenizer --input RAW_DIR --output PREFIX` or point data.tokenizer at a "
            "sentencepiece .model file"
        )
    check_resume_compatible(cfg)
    vocab = tokenizer_vocab_size(tokenizer_path)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}: "
            f"set --model.vocab_size {vocab} (or larger, e.g. a multiple of 64) or use a smaller tokenizer"
        )


def check_resume_compatible(cfg: Config) -> None:
    """A checkpoint only continues a run of the same model; say so before loading it fails."""
    import yaml

    from orchestrator.checkpoint import resume_target
    from orchestrator.schema import to_dict

    for path in (resume_target(cfg), cfg.checkpoint.init_from):
        if path is None or not (Path(path) / "config.yaml").is_file():
            continue
        saved = (yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}).get("model", {})
        current = to_dict(cfg.model)
        differing = [k for k in current if k in saved and saved[k] != current[k] and k not in ("name", "attention")]
        if differing:
            details = ", ".join(f"model.{k}={saved[k]!r} there but {current[k]!r} here" for k in differing)
            raise ConfigError(
                f"checkpoint {path} was trained with a different model ({details}): use the same model "
                "settings, a new run.dir, or --checkpoint.resume never"
            )


def tokenizer_vocab_size(path: Path) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer={path} is not a sentencepiece model: {e}") from e
