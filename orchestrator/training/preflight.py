"""Checks on files and sizes that must pass before any process, model or optimizer is built.

Data keys may be object-store URLs: their indexes and prepare records are read here, so that an
unreachable store, a missing bucket, refused credentials or a missing index is one error naming
the key and the URL before anything starts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import sentencepiece as spm

from data.integrity import DamagedChunk, check_sizes, has_checksums
from data.loader import read_index, resolve_split
from data.storage import ObjectStore, StorageError, is_remote
from data.util import file_sha256
from orchestrator.checkpoint.resume import check_resume_compatible
from orchestrator.config import Config
from orchestrator.schema import ConfigError
from orchestrator.training.data import data_formats, stream_options
from orchestrator.training.downstream import check_tasks
from orchestrator.training.trackers import check_trackers

SPLITS = ("train", "val")


def check_starting_point(cfg: Config) -> None:
    """The checkpoints the config names exist (checkpoint.resume, init_from, branch_from)."""
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume!r} does not exist: give a checkpoint directory, "
            "`auto` (latest in the run dir) or `never`"
        )

    if cfg.checkpoint.init_from is not None and not Path(cfg.checkpoint.init_from).is_dir():
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from!r} is not a checkpoint directory "
            "(make one with `orchestrator import` or point at <run.dir>/checkpoints/step-N)"
        )
    branch = cfg.checkpoint.branch_from
    # Once the run has checkpoints of its own (<run.dir>/checkpoints) it no longer reads the
    # branch point, which the other run's retention may since have deleted.
    has_own = (Path(cfg.run.dir) / "checkpoints").is_dir()
    if branch is not None and not Path(branch).is_dir() and not has_own:
        raise ConfigError(
            f"checkpoint.branch_from={branch!r} is not a checkpoint directory "
            "(point it at another run's <run.dir>/checkpoints/step-N)"
        )


def check_inputs(cfg: Config) -> None:
    check_starting_point(cfg)  # checkpoint.resume / init_from / branch_from exist
    check_trackers(cfg)  # logging.trackers: their packages (an extra to install)
    datasets: list[tuple[str, str, str | Path]] = []  # (config key, value, prepared split)
    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources[{i}].dir"
        datasets.append((key, src.dir, prepared_split(key, src.dir, "train", cfg)))
    if cfg.data.val_dir:
        datasets.append(
            (
                "data.val_dir",
                cfg.data.val_dir,
                prepared_split("data.val_dir", cfg.data.val_dir, "val", cfg),
            )
        )
    if not cfg.data.sources or not cfg.data.val_dir:
        # data.dir (or the first source) is a prepare output: its train/ and val/ are read.
        key = "data.sources[0].dir" if cfg.data.sources else "data.dir"
        value = cfg.data.sources[0].dir if cfg.data.sources else cfg.data.dir
        if not is_remote(value) and not Path(value).is_dir():
            raise ConfigError(
                f"{key}={value} does not exist: prepare data with "
                "`orchestrator prepare --input RAW_DIR --output DIR --tokenizer TOKENIZER.model` "
                f"(or `make sample-data` for the built-in sample) and point {key} at its output"
            )
        for split in SPLITS if not cfg.data.sources else ("val",):
            if split == "val" and cfg.data.val_dir:
                continue
            datasets.append((key, value, output_split(key, value, split, cfg)))
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
    check_chunk_files(cfg, datasets)
    # Text or instruction data: not mixed, and instruction data with data.document_mask.
    data_formats(cfg)
    check_tasks(cfg)  # eval.tasks: every file read, every example tokenised and checked
    check_async_save_memory(cfg)
    if cfg.checkpoint.remote_dir:  # the bucket exists and takes the credentials
        try:
            ObjectStore(cfg.checkpoint.remote_dir, cfg.storage.options()).check_bucket()
        except StorageError as e:
            raise ConfigError(f"checkpoint.remote_dir={cfg.checkpoint.remote_dir}: {e}") from None
    report_processes(cfg)


def output_split(key: str, value: str, split: str, cfg: Config) -> str | Path:
    """The <split>/ of a prepare output (local or URL), its index read; or a ConfigError."""
    if is_remote(value):
        return _remote_index(key, f"{value.rstrip('/')}/{split}", cfg, split)
    split_dir = Path(value) / split
    if not (split_dir / "index.json").is_file():
        raise ConfigError(
            f"{key}={value} has no prepared '{split}' split ({split_dir / 'index.json'} "
            "is missing): run `orchestrator prepare` on it again"
            + (" or set data.val_dir" if split == "val" else "")
        )
    return split_dir


def prepared_split(key: str, value: str, split: str, cfg: Config | None = None) -> str | Path:
    """The prepared split a config value points at (the dir itself, or its <split>/), or a ConfigError."""
    if is_remote(value):
        try:
            found = resolve_split(value, split, stream_options(cfg) if cfg else None)
        except (StorageError, ValueError) as e:
            raise ConfigError(f"{key}={value}: {e}") from None
        return _remote_index(key, str(found), cfg, split)
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


def _remote_index(key: str, url: str, cfg: Config | None, split: str) -> str:
    """`url` after reading its index.json from the store (any failure: a ConfigError naming both)."""
    try:
        read_index(url, stream_options(cfg) if cfg else None)
    except (StorageError, ValueError) as e:
        raise ConfigError(f"{key}: cannot use the '{split}' split {url}: {e}") from None
    return url


def _prepare_stats(split: str | Path, cfg: Config | None) -> dict | None:
    """The prepare_stats.json beside a prepared split (a prepare output's record), if any."""
    try:
        if is_remote(split):
            parent = str(split).rstrip("/").rsplit("/", 1)[0]
            store = ObjectStore(parent, cfg.storage.options() if cfg else None)
            if not store.exists("prepare_stats.json"):
                return None
            return json.loads(store.read_text("prepare_stats.json"))
        stats_file = Path(split).parent / "prepare_stats.json"
        if not stats_file.is_file():
            return None
        return json.loads(stats_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable record: nothing to check against (the index was read already)


def check_datasets_match_tokenizer(
    cfg: Config, datasets: list[tuple[str, str, str | Path]], tokenizer_path: Path
) -> None:
    """Token ids only mean something with the tokenizer they were made with, and must fit the embedding."""
    tokenizer_sha = None
    for key, value, split_dir in datasets:
        stats = _prepare_stats(split_dir, cfg)
        if stats is None:
            continue  # a split dir made elsewhere: nothing recorded to check against
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


def check_chunk_files(cfg: Config, datasets: list[tuple[str, str, str | Path]]) -> None:
    """Every chunk of every dataset is there at the size its index records (a truncated or missing
    chunk is a ConfigError naming it, not a hang at its first read); datasets prepared before chunk
    checksums were recorded are said so once, with how to check them."""
    unchecked = []
    for key, value, split in datasets:
        try:
            index = read_index(split, stream_options(cfg))
            check_sizes(split, index, cfg.storage.options())
        except (DamagedChunk, StorageError) as e:
            raise ConfigError(f"{key}={value}: {e}") from None
        if not has_checksums(index) and f"{key}={value}" not in unchecked:
            unchecked.append(f"{key}={value}")
    if unchecked and os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0":
        print(
            f"warning: {', '.join(unchecked)} was prepared without chunk checksums (before they were "
            "recorded): its chunks are checked for size and token ids only, so damage that keeps "
            "ids in the vocabulary would train unnoticed. Check it with `orchestrator prepare "
            "--verify DIR`, or prepare it again to record them",
            file=sys.stderr,
        )


def tokenizer_vocab_size(path: Path) -> int:
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer={path} is not a sentencepiece model: {e}") from e


GIB = 2**30


def host_memory_bytes() -> int | None:
    """MemTotal of this machine (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_async_save_memory(cfg: Config, memory: int | None = None) -> None:
    """checkpoint.async_save with FSDP on CPUs: the background save snapshots each rank's weights
    and AdamW moments (12 bytes a parameter, sharded) in host memory, beside the training state
    (16 bytes a parameter: weights, gradients, moments). Refuse before launch what cannot fit the
    node (measured at TinyLlama-1.1B on 2 processes: the kernel killed a rank during the first
    async save on a 24 GiB machine)."""
    s = cfg.strategy
    if not (cfg.checkpoint.async_save and s.name == "fsdp" and s.accelerator in ("cpu", "auto")):
        return
    if s.accelerator == "auto":
        import torch  # already loaded by the trainer

        if torch.cuda.is_available():
            return
    memory = memory if memory is not None else host_memory_bytes()
    if memory is None:
        return
    per_param_rank = cfg.model.num_params() / (s.devices * s.num_nodes)
    node = s.devices * 28 * per_param_rank
    if node > memory:
        raise ConfigError(
            f"checkpoint.async_save=true on CPU keeps a snapshot of each rank's weights and "
            f"optimizer state in host memory while training goes on: ~{12 * per_param_rank / GIB:.1f} "
            f"GiB per rank beside ~{16 * per_param_rank / GIB:.1f} GiB of training state, "
            f"~{node / GIB:.1f} GiB for the {s.devices} processes of this node, which has "
            f"{memory / GIB:.1f} GiB: set checkpoint.async_save=false (a synchronous save makes "
            "no copy) or use more processes / nodes"
        )


def process_count(cfg: Config) -> tuple[int, int]:
    """(processes per rank, processes per node): each rank's own process plus data.num_workers
    DataLoader workers (one loader serves every source of a mixture; validation reads in the
    rank's process)."""
    per_rank = 1 + cfg.data.num_workers
    return per_rank, per_rank * cfg.strategy.devices


def report_processes(cfg: Config) -> list[str]:
    """State, once per node, how many processes the run starts there; warn (naming the keys) when
    that exceeds the CPUs Slurm gave each task or the machine's cores, a known cause of slow
    starts and hangs. Returns the warnings."""
    if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
        return []
    per_rank, per_node = process_count(cfg)
    devices, workers = cfg.strategy.devices, cfg.data.num_workers
    print(
        f"processes per node: {per_node} = strategy.devices {devices} x (1 rank + data.num_workers "
        f"{workers} data workers; validation reads in the rank's process)",
        file=sys.stderr,
    )
    warnings = []
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm_cpus and slurm_cpus.isdigit() and per_rank > int(slurm_cpus):
        warnings.append(
            f"each rank runs {per_rank} processes (1 + data.num_workers={workers}) but Slurm gave each "
            f"task SLURM_CPUS_PER_TASK={slurm_cpus} CPUs: lower data.num_workers or raise --cpus-per-task"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and per_node > cores:
        warnings.append(
            f"{per_node} processes per node (strategy.devices={devices} x (1 + data.num_workers={workers})) "
            f"exceed the {cores} CPU cores this process may use: lower data.num_workers or strategy.devices"
        )
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return warnings
