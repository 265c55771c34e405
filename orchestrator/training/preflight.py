"""Checks on files and sizes that must pass before any process, model or optimizer is built."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from data.util import file_sha256
from orchestrator.checkpoint.resume import check_resume_compatible
from orchestrator.config import Config
from orchestrator.schema import ConfigError

SPLITS = ("train", "val")


def check_inputs(cfg: Config) -> None:
    datasets: list[tuple[str, str, Path]] = []  # (config key, value, prepared split dir)
    if cfg.data.sources:
        for i, src in enumerate(cfg.data.sources):
            key = f"data.sources[{i}].dir"
            datasets.append((key, src.dir, prepared_split(key, src.dir, "train")))
    if cfg.data.val_dir:
        datasets.append(
            (
                "data.val_dir",
                cfg.data.val_dir,
                prepared_split("data.val_dir", cfg.data.val_dir, "val"),
            )
        )
    if not cfg.data.sources or not cfg.data.val_dir:
        key = "data.sources[0].dir" if cfg.data.sources else "data.dir"
        value = cfg.data.sources[0].dir if cfg.data.sources else cfg.data.dir
        data_dir = Path(value)
        if not data_dir.is_dir():
            raise ConfigError(
                f"{key}={value} does not exist: prepare data with "
                "`orchestrator prepare --input RAW_DIR --output DIR --tokenizer TOKENIZER.model` "
                f"(or `make sample-data` for the built-in sample) and point {key} at its output"
            )
        for split in SPLITS if not cfg.data.sources else ("val",):
            if split == "val" and cfg.data.val_dir:
                continue
            if not (data_dir / split / "index.json").is_file():
                raise ConfigError(
                    f"{key}={value} has no prepared '{split}' split ({data_dir / split / 'index.json'} "
                    "is missing): run `orchestrator prepare` on it again"
                    + (" or set data.val_dir" if split == "val" else "")
                )
            datasets.append((key, value, data_dir / split))
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
    check_datasets_match_tokenizer(cfg, datasets, tokenizer_path)


def prepared_split(key: str, value: str, split: str) -> Path:
    """The prepared split a config value points at (the dir itself, or its <split>/), or a ConfigError."""
    p = Path(value)
    if not p.exists():
        raise ConfigError(
            f"{key}={value} does not exist: prepare data with "
            "`orchestrator prepare --input RAW_DIR --output DIR --tokenizer TOKENIZER.model` and point it at the output"
        )
    for candidate in (p, p / split):
        if (candidate / "index.json").is_file():
            return candidate
    raise ConfigError(
        f"{key}={value} has no prepared '{split}' split (no index.json in it or in {p / split}): "
        "run `orchestrator prepare` on it again"
    )


def check_datasets_match_tokenizer(
    cfg: Config, datasets: list[tuple[str, str, Path]], tokenizer_path: Path
) -> None:
    """Token ids only mean something with the tokenizer they were made with, and must fit the embedding."""
    tokenizer_sha = None
    for key, value, split_dir in datasets:
        stats_file = split_dir.parent / "prepare_stats.json"
        if not stats_file.is_file():
            continue  # a split dir made elsewhere: nothing recorded to check against
        try:
            stats = json.loads(stats_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        vocab = stats.get("vocab_size")
        if isinstance(vocab, int) and vocab > cfg.model.vocab_size:
            raise ConfigError(
                f"{key}={value} was prepared with a {vocab}-token tokenizer but model.vocab_size="
                f"{cfg.model.vocab_size}: token ids would overflow the embedding"
            )
        recorded = stats.get("tokenizer_sha256")
        if recorded:
            if tokenizer_sha is None:
                tokenizer_sha = file_sha256(tokenizer_path)
            if recorded != tokenizer_sha:
                raise ConfigError(
                    f"{key}={value} was prepared with the tokenizer {stats.get('tokenizer_path')}, not "
                    f"data.tokenizer={cfg.data.tokenizer} (the files differ): use the tokenizer the data was "
                    "prepared with, or prepare the data again with this one"
                )


def tokenizer_vocab_size(path: Path) -> int:
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer={path} is not a sentencepiece model: {e}") from e
