"""Checks on files and sizes that must pass before any process, model or optimizer is built."""

from __future__ import annotations

from pathlib import Path

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
    import hashlib
    import json

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
                tokenizer_sha = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
            if recorded != tokenizer_sha:
                raise ConfigError(
                    f"{key}={value} was prepared with the tokenizer {stats.get('tokenizer_path')}, not "
                    f"data.tokenizer={cfg.data.tokenizer} (the files differ): use the tokenizer the data was "
                    "prepared with, or prepare the data again with this one"
                )


def check_resume_compatible(cfg: Config) -> None:
    """A checkpoint only continues a run of the same model; say so before loading it fails."""
    import yaml

    from models.config import KERNEL_FIELDS
    from orchestrator.checkpoint import resume_target
    from orchestrator.schema import to_dict

    for path in (resume_target(cfg), cfg.checkpoint.init_from):
        if path is None or not (Path(path) / "config.yaml").is_file():
            continue
        saved = (yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}).get("model", {})
        current = to_dict(cfg.model)
        # Kernel choices (attention, fused kernels, compile) compute the same model: they may change.
        differing = [
            k
            for k in current
            if k in saved and saved[k] != current[k] and k not in ("name", *KERNEL_FIELDS)
        ]
        if differing:
            details = ", ".join(
                f"model.{k}={saved[k]!r} there but {current[k]!r} here" for k in differing
            )
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
