"""The one typed config tree of a pretraining run.

`load_config(["--config", "configs/quickstart.yaml", "--train.max_steps", "10"])` reads the
YAML, applies dotted overrides, checks every key and value, and returns a `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from models.config import ModelConfig, model_config
from orchestrator.schema import ConfigError, doc, from_dict, parse_overrides, section, to_dict


@dataclass
class DataConfig:
    dir: str = doc(".cache/sample/tokens", "Prepared dataset (output of `orchestrator prepare`) with train/ and val/.")
    tokenizer: str = doc(".cache/sample/tokenizer.model", "sentencepiece model used to prepare the data.")
    num_workers: int = doc(0, "DataLoader worker processes per rank.")
    shuffle: bool = doc(True, "Shuffle training chunks and samples (seeded by run.seed).")


@dataclass
class OptimizerConfig:
    lr: float = doc(4e-4, "Peak learning rate (AdamW).")
    min_lr: float = doc(4e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = doc(0.1, "Decoupled weight decay on matrices (not on norms or biases).")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this value (0 disables).")


@dataclass
class ScheduleConfig:
    warmup_steps: int = doc(2000, "Optimizer steps of linear warmup from 0 to optimizer.lr.")
    decay: Literal["cosine", "linear", "constant"] = doc(
        "cosine", "Shape of the decay from optimizer.lr to optimizer.min_lr over the remaining steps."
    )
    decay_steps: int | None = doc(None, "Steps of warmup+decay; null means train.max_steps.")


@dataclass
class TrainConfig:
    max_steps: int = doc(1000, "Optimizer steps to train for.")
    micro_batch_size: int = doc(8, "Sequences per forward/backward per process.")
    global_batch_size: int | None = doc(
        None, "Sequences per optimizer step across all processes (sets gradient accumulation)."
    )
    global_batch_tokens: int | None = doc(
        None, "Tokens per optimizer step across all processes; alternative to global_batch_size."
    )
    seq_len: int | None = doc(None, "Training sequence length; null means model.max_seq_len.")
    log_interval: int = doc(10, "Optimizer steps between progress lines and TensorBoard train scalars.")


@dataclass
class EvalConfig:
    interval: int = doc(100, "Optimizer steps between validation runs (0 disables; also run at the end).")
    max_batches: int = doc(20, "Validation micro-batches per process per evaluation (0 = whole val split).")
    at_start: bool = doc(True, "Evaluate before the first step (gives the initial validation loss).")


@dataclass
class CheckpointConfig:
    interval: int = doc(500, "Optimizer steps between checkpoints (a final one is always written).")
    keep_last: int = doc(3, "Complete checkpoints to keep (older ones are deleted); 0 keeps all.")
    resume: str = doc("auto", "`auto`: latest complete checkpoint in the run dir; `never`; or a checkpoint path.")
    init_from: str | None = doc(
        None, "Checkpoint (e.g. from `orchestrator import`) whose model weights start a new run; "
        "ignored once the run dir has its own checkpoints."
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = doc(True, "Write TensorBoard event files under <run.dir>/tensorboard.")
    log_batch_hash: bool = doc(True, "Record a fingerprint of each step's batches in metrics.jsonl (resume audits).")


@dataclass
class StrategyConfig:
    name: Literal["ddp", "auto", "single"] = doc("ddp", "How the model is replicated/sharded across processes.")
    accelerator: Literal["auto", "cpu", "cuda"] = doc("auto", "Device type; `auto` uses CUDA when present.")
    devices: int = doc(1, "Processes (GPUs, or CPU processes) per node.")
    num_nodes: int = doc(1, "Number of nodes (set by Slurm in cluster runs).")
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = doc(
        "32-true", "Numerical precision (Fabric precision string)."
    )


@dataclass
class RunConfig:
    dir: str = doc("runs/default", "Run directory: resolved config, checkpoints, TensorBoard logs, metrics.")
    seed: int = doc(1337, "Seed for model init and data order.")


@dataclass
class Config:
    run: RunConfig = section(RunConfig, "Where the run lives and its seed.")
    model: ModelConfig = section(ModelConfig, "Model architecture.")
    data: DataConfig = section(DataConfig, "Prepared data and tokenizer.")
    optimizer: OptimizerConfig = section(OptimizerConfig, "AdamW and gradient clipping.")
    schedule: ScheduleConfig = section(ScheduleConfig, "Learning-rate schedule.")
    train: TrainConfig = section(TrainConfig, "Batching and step counts.")
    eval: EvalConfig = section(EvalConfig, "Validation.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpointing and resume.")
    logging: LoggingConfig = section(LoggingConfig, "TensorBoard and metrics.")
    strategy: StrategyConfig = section(StrategyConfig, "Parallelism and precision.")

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def validate(self) -> None:
        """Value checks that need no files or processes; raise ConfigError naming the key."""
        self.model.validate()
        positive = {
            "train.max_steps": self.train.max_steps,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.log_interval": self.train.log_interval,
            "strategy.devices": self.strategy.devices,
            "strategy.num_nodes": self.strategy.num_nodes,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        for key, value in {
            "eval.interval": self.eval.interval,
            "eval.max_batches": self.eval.max_batches,
            "checkpoint.interval": self.checkpoint.interval,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "schedule.warmup_steps": self.schedule.warmup_steps,
            "data.num_workers": self.data.num_workers,
        }.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.train.seq_len is not None and not 0 < self.train.seq_len <= self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} must be in 1..model.max_seq_len={self.model.max_seq_len}"
            )
        if self.train.global_batch_size is not None and self.train.global_batch_tokens is not None:
            raise ConfigError("set only one of train.global_batch_size and train.global_batch_tokens")
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.optimizer.lr}")
        if not 0 <= self.optimizer.min_lr <= self.optimizer.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.optimizer.min_lr} must be between 0 and optimizer.lr={self.optimizer.lr}"
            )
        if self.checkpoint.resume not in ("auto", "never") and not Path(self.checkpoint.resume).exists():
            raise ConfigError(
                f"checkpoint.resume={self.checkpoint.resume!r} does not exist: give a checkpoint directory, "
                "`auto` (latest in the run dir) or `never`"
            )

        if self.checkpoint.init_from is not None and not Path(self.checkpoint.init_from).is_dir():
            raise ConfigError(
                f"checkpoint.init_from={self.checkpoint.init_from!r} is not a checkpoint directory "
                "(make one with `orchestrator import` or point at <run.dir>/checkpoints/step-N)"
            )

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process, from the global batch."""
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_tokens is not None:
            if self.train.global_batch_tokens % self.seq_len:
                raise ConfigError(
                    f"train.global_batch_tokens={self.train.global_batch_tokens} is not a multiple of the "
                    f"sequence length {self.seq_len}"
                )
            sequences = self.train.global_batch_tokens // self.seq_len
            key = "train.global_batch_tokens"
        elif self.train.global_batch_size is not None:
            sequences, key = self.train.global_batch_size, "train.global_batch_size"
        else:
            return 1
        if sequences % per_step or sequences == 0:
            raise ConfigError(
                f"{key} gives {sequences} sequences per step, which is not a multiple of "
                f"train.micro_batch_size x processes = {self.train.micro_batch_size} x {world_size} = {per_step}: "
                "change the global batch or the micro-batch size"
            )
        return sequences // per_step


def load_config(argv: list[str] | None = None, base: dict | None = None) -> Config:
    """`--config FILE` (optional, may repeat) then dotted overrides, validated."""
    argv = list(argv or [])
    files: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file")
            files.append(argv[i + 1])
            i += 2
        elif argv[i].startswith("--config="):
            files.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    layers: list[dict] = [base or {}]
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        layers.append(loaded)
    layers.append(parse_overrides(rest))
    return config_from_layers(layers)


def config_from_layers(layers: list[dict]) -> Config:
    """Apply dict layers in order; the model section starts from its named size."""
    model_name = ModelConfig().name
    for layer in layers:
        model_layer = layer.get("model") or {}
        if isinstance(model_layer, dict) and "name" in model_layer:
            model_name = str(model_layer["name"])
    cfg = Config(model=model_config(model_name))
    for layer in layers:
        from_dict(Config, layer, base=cfg)
    cfg.validate()
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, run dirs)."""
    return config_from_layers([data])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
