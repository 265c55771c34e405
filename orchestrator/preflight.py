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
    vocab = tokenizer_vocab_size(tokenizer_path)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}: "
            f"set --model.vocab_size {vocab} (or larger, e.g. a multiple of 64) or use a smaller tokenizer"
        )


def tokenizer_vocab_size(path: Path) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer={path} is not a sentencepiece model: {e}") from e
