"""The one typed config tree of a pretraining run.

`load_config(["--config", "configs/quickstart.yaml", "--train.max_steps", "10"])` reads the
YAML, applies dotted overrides, checks every key and value, and returns a `Config`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from data.storage import is_remote, join, storage_options
from data.util import parse_size
from models.config import ModelConfig, model_config
from orchestrator.schema import ConfigError, doc, from_dict, parse_overrides, section, to_dict


@dataclass
class SourceConfig:
    name: str = doc(
        "", "Source name (letters, digits, _ . -); TensorBoard scalar data/tokens_<name>."
    )
    dir: str = doc(
        "",
        "Prepared dataset: an `orchestrator prepare` output (its train/ is read) or a split dir.",
    )
    weight: float = doc(1.0, "Relative sampling weight (the weights are normalised to sum to 1).")


@dataclass
class DataConfig:
    dir: str = doc(
        ".cache/sample/tokens",
        "Prepared dataset (output of `orchestrator prepare`) with train/ and val/.",
    )
    sources: list[SourceConfig] = doc(
        [],
        "Weighted mixture of prepared datasets instead of data.dir/train: a list of {name, dir, weight} "
        "(docs/data.md#mixing-datasets).",
    )
    val_dir: str | None = doc(
        None,
        "Validation split (a split dir, or a prepare output whose val/ is read); null: data.dir/val, or the "
        "first source's val/.",
    )
    tokenizer: str = doc(
        ".cache/sample/tokenizer.model", "sentencepiece model used to prepare the data."
    )
    num_workers: int = doc(0, "DataLoader worker processes per rank.")
    shuffle: bool = doc(True, "Shuffle training chunks and samples (seeded by run.seed).")
    document_mask: bool = doc(
        False,
        "Each packed document attends only to itself, RoPE positions restarting at 0; required with "
        "instruction data (docs/data.md).",
    )
    cache_dir: str | None = doc(
        None,
        "Node-local cache of chunks streamed from an object store (s3://, gs://, azure://); null: "
        "$LITDATA_CACHE_DIR, else the temp dir.",
    )
    max_cache_size: str = doc(
        "50GB",
        "Bound on each streamed dataset's cached chunks on a node (oldest evicted); at least a few chunks per "
        "rank and worker.",
    )

    def validate(self) -> None:
        names = []
        for i, src in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not src.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", src.name):
                raise ConfigError(
                    f"{key}.name={src.name!r} must be a non-empty name of letters, digits, _ . -"
                )
            if not src.dir:
                raise ConfigError(
                    f"{key}.dir is empty: give the output directory of `orchestrator prepare`"
                )
            if not src.weight > 0:
                raise ConfigError(f"{key}.weight={src.weight} must be positive")
            names.append(src.name)
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources names must be unique, got {names}")
        try:
            parse_size(self.max_cache_size)
        except ValueError as e:
            raise ConfigError(f"data.max_cache_size: {e}") from None
        if is_remote(self.tokenizer):
            raise ConfigError(
                f"data.tokenizer={self.tokenizer!r}: the tokenizer is read from a local path; copy the "
                f".model file (a few hundred KB) next to the job"
            )
        if is_remote(self.cache_dir):
            raise ConfigError(f"data.cache_dir={self.cache_dir!r} must be a local directory")

    def remote_keys(self) -> dict[str, str]:
        """Each data key that names an object-store URL: {key: URL}."""
        keys = {"data.dir": self.dir, "data.val_dir": self.val_dir or ""}
        keys.update({f"data.sources[{i}].dir": s.dir for i, s in enumerate(self.sources)})
        return {k: v for k, v in keys.items() if is_remote(v)}

    def val_split(self) -> str:
        """The validation dataset (see val_dir)."""
        if self.val_dir:
            return self.val_dir
        return join(self.sources[0].dir if self.sources else self.dir, "val")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adafactor"] = doc(
        "adamw",
        "`adamw` or `adafactor` (ddp, single or auto only); keys and limits: "
        "docs/training.md#optimizers-adamw-and-adafactor.",
    )
    lr: float = doc(
        4e-4,
        "Peak learning rate (schedule.* scales it); adafactor: the relative step size, e.g. 0.01 (docs/training.md).",
    )
    min_lr: float = doc(4e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = doc(
        0.1,
        "Decoupled weight decay on matrices (not on norms or biases), both optimizers.",
    )
    beta1: float = doc(0.9, "AdamW beta1 (adamw only; adafactor keeps no first moment).")
    beta2: float = doc(0.95, "AdamW beta2 (adamw only; adafactor: optimizer.beta2_decay).")
    eps: float = doc(
        1e-8,
        "AdamW epsilon (adamw only; adafactor uses torch's defaults).",
    )
    beta2_decay: float = doc(
        -0.8,
        "adafactor only: second-moment decay, beta2_t = 1 - t^beta2_decay at step t (-0.8: the paper's 0.8). "
        "Must be <= 0.",
    )
    clip_threshold: float = doc(
        1.0,
        "adafactor only: update clipping threshold d (torch's `d`), >= 1; .inf disables it. Independent of "
        "optimizer.grad_clip.",
    )
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this value (0 disables).")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = doc(
        "auto",
        "How torch's optimizer runs its update: `fused` (adamw only), `foreach`, `for-loop`, or `auto` "
        "(docs/training.md).",
    )

    def validate(self) -> None:
        # Values torch.optim.AdamW (or the schedule) would only reject, or silently misuse, inside
        # the ranks. lr = 0 has no use: the schedule is relative to the peak lr (it divides by it).
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optimizer.lr must be positive (and finite), got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.min_lr} must be between 0 and optimizer.lr={self.lr}"
            )
        for key, beta in (("optimizer.beta1", self.beta1), ("optimizer.beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise ConfigError(
                    f"{key} must be in [0, 1) (e.g. 0.9 and 0.95), got {beta}: it is the decay rate "
                    "of AdamW's running average"
                )
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(
                f"optimizer.eps must be positive (and finite; e.g. 1e-8), got {self.eps}: it keeps "
                "AdamW's update from dividing by zero"
            )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(
                f"optimizer.weight_decay must be >= 0 (0 disables), got {self.weight_decay}"
            )
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ConfigError(
                f"optimizer.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}"
            )
        if not (self.beta2_decay <= 0 and math.isfinite(self.beta2_decay)):
            raise ConfigError(
                f"optimizer.beta2_decay must be <= 0 (and finite; e.g. -0.8, the Adafactor paper's decay "
                f"0.8), got {self.beta2_decay}: Adafactor's beta2 at step t is 1 - t^beta2_decay"
            )
        if not self.clip_threshold >= 1:  # also refuses NaN; .inf (no clipping) is fine
            raise ConfigError(
                f"optimizer.clip_threshold must be >= 1 (1.0 in the Adafactor paper), got "
                f"{self.clip_threshold}: torch's Adafactor refuses a clipping threshold d below 1"
            )
        if self.name == "adafactor" and self.implementation == "fused":
            raise ConfigError(
                "optimizer.implementation=fused is not available with optimizer.name=adafactor: torch's "
                "Adafactor has no fused kernel; use foreach, for-loop or auto"
            )


@dataclass
class ScheduleConfig:
    warmup_steps: int = doc(2000, "Optimizer steps of linear warmup from 0 to optimizer.lr.")
    decay: Literal["cosine", "linear", "constant", "wsd"] = doc(
        "cosine",
        "Decay from optimizer.lr to optimizer.min_lr after the warmup; `wsd`: warmup-stable-decay (docs/training.md).",
    )
    decay_steps: int | None = doc(
        None, "Steps of warmup+decay; null means train.max_steps (not with decay=wsd)."
    )
    wsd_decay_steps: int | None = doc(
        None,
        "decay=wsd: optimizer steps of the decay phase (instead of schedule.wsd_decay_fraction).",
    )
    wsd_decay_fraction: float | None = doc(
        None,
        "decay=wsd: decay phase as a fraction of train.max_steps; null: 0.2 unless schedule.wsd_decay_steps is "
        "set (not both).",
    )
    wsd_shape: Literal["linear", "cosine", "1-sqrt"] = doc(
        "1-sqrt",
        "decay=wsd: shape of the decay phase: `linear`, `cosine` or `1-sqrt` (Hägele et al. 2024).",
    )
    decay_start_step: int | None = doc(
        None,
        "decay=wsd: optimizer steps taken when the decay phase begins; null: train.max_steps minus the decay length.",
    )

    def validate(self, max_steps: int | None = None) -> None:
        """The schedule's own keys; with `max_steps` (train.max_steps) also the WSD phases."""
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(
                f"schedule.decay_steps must be positive, or null for train.max_steps; got {self.decay_steps}"
            )
        wsd_keys = {
            "schedule.wsd_decay_steps": self.wsd_decay_steps,
            "schedule.wsd_decay_fraction": self.wsd_decay_fraction,
            "schedule.decay_start_step": self.decay_start_step,
        }
        if self.decay != "wsd":
            for key, value in wsd_keys.items():
                if value is not None:
                    raise ConfigError(
                        f"{key}={value} applies only to schedule.decay=wsd (here {self.decay!r}): "
                        f"set --schedule.decay wsd or drop {key}"
                    )
            return
        if self.decay_steps is not None:
            raise ConfigError(
                f"schedule.decay_steps={self.decay_steps} does not apply to schedule.decay=wsd: give the "
                "decay phase as schedule.wsd_decay_steps or schedule.wsd_decay_fraction"
            )
        if self.wsd_decay_steps is not None and self.wsd_decay_fraction is not None:
            raise ConfigError(
                f"set only one of schedule.wsd_decay_steps={self.wsd_decay_steps} and "
                f"schedule.wsd_decay_fraction={self.wsd_decay_fraction}"
            )
        if self.wsd_decay_steps is not None and self.wsd_decay_steps <= 0:
            raise ConfigError(
                f"schedule.wsd_decay_steps must be positive, got {self.wsd_decay_steps}"
            )
        fraction = self.wsd_decay_fraction
        if fraction is not None and not 0 < fraction <= 1:  # also refuses NaN
            raise ConfigError(f"schedule.wsd_decay_fraction must be in (0, 1], got {fraction}")
        start = self.decay_start_step
        if start is not None and start < self.warmup_steps:
            raise ConfigError(
                f"schedule.decay_start_step={start} must be >= schedule.warmup_steps={self.warmup_steps} "
                "(the decay phase begins after the warmup)"
            )
        if max_steps is None or max_steps <= 0:
            return
        length = self.wsd_decay_length(max_steps)
        if start is None and max_steps - length < self.warmup_steps:
            raise ConfigError(
                f"schedule.decay=wsd: the warmup ({self.warmup_steps} steps) and the decay phase ({length} "
                f"steps) do not fit in train.max_steps={max_steps}: lower schedule.warmup_steps or "
                f"schedule.{'wsd_decay_steps' if self.wsd_decay_steps else 'wsd_decay_fraction'}, or set "
                "schedule.decay_start_step"
            )

    def wsd_decay_length(self, max_steps: int) -> int:
        """Optimizer steps of the WSD decay phase."""
        if self.wsd_decay_steps is not None:
            return self.wsd_decay_steps
        fraction = 0.2 if self.wsd_decay_fraction is None else self.wsd_decay_fraction
        return max(1, round(fraction * max_steps))

    def wsd_decay_start(self, max_steps: int) -> int:
        """Optimizer steps taken when the WSD decay phase begins."""
        if self.decay_start_step is not None:
            return self.decay_start_step
        return max_steps - self.wsd_decay_length(max_steps)


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
    log_interval: int = doc(
        10, "Optimizer steps between progress lines and TensorBoard train scalars."
    )
    gc_interval: int = doc(
        1000,
        "Optimizer steps between the garbage collections every rank runs together; 0 keeps Python's automatic "
        "GC (docs/training.md).",
    )


@dataclass
class EvalConfig:
    interval: int = doc(
        100, "Optimizer steps between validation runs (0 disables; also run at the end)."
    )
    max_batches: int = doc(
        20, "Validation micro-batches per process per evaluation (0 = whole val split)."
    )
    at_start: bool = doc(
        True, "Evaluate before the first step (gives the initial validation loss)."
    )
    loss_from: int = doc(
        0,
        "Validation loss over the targets at block positions >= this only (0 = all); compares the two families "
        "(docs/encoder-decoder.md).",
    )
    tasks: list[str] = doc(
        [],
        "Multiple-choice or exact-match JSON-lines files scored at every validation (docs/evaluation.md); "
        "checked before the run starts.",
    )
    task_limit: int = doc(
        0,
        "Examples scored of each eval.tasks file: its first N (0 = all), as evaluate's --limit N.",
    )
    max_new_tokens: int = doc(
        16,
        "Tokens generated per exact-match example of eval.tasks (always this many forward passes); at most "
        "model.max_seq_len - 2.",
    )

    def validate(self) -> None:
        if self.task_limit < 0:
            raise ConfigError(f"eval.task_limit must be >= 0 (0 = all), got {self.task_limit}")
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ConfigError(
                f"eval.max_new_tokens must be >= 1 (tokens generated per exact-match answer), got "
                f"{self.max_new_tokens}"
            )
        names: dict[str, str] = {}
        for path in self.tasks:
            if not isinstance(path, str) or not path.strip():
                raise ConfigError(f"eval.tasks holds {path!r}: give paths of JSON-lines files")
            # The name `orchestrator evaluate --local-task` gives the file's task.
            name = Path(path).stem.replace("-", "_").replace(".", "_")
            if name in names:
                raise ConfigError(
                    f"eval.tasks: {names[name]} and {path} are both task {name!r} (a task is named "
                    "after its file): rename one"
                )
            names[name] = path


@dataclass
class CheckpointConfig:
    interval: int = doc(500, "Optimizer steps between checkpoints (a final one is always written).")
    keep_last: int = doc(
        3, "Newest complete checkpoints to keep (older ones are deleted); 0 keeps all."
    )
    keep_every: int = doc(
        0, "Also keep, permanently, every checkpoint whose step is a multiple of this (0: none)."
    )
    async_save: bool = doc(
        False,
        "Write checkpoints in a background thread (ddp, single, sharded fsdp); training stalls only for a CPU "
        "snapshot.",
    )
    verify_checksums: bool = doc(
        True, "Check every file's SHA-256 against the manifest before resuming from it."
    )
    resume: str = doc(
        "auto", "`auto`: latest complete checkpoint in the run dir; `never`; or a checkpoint path."
    )
    init_from: str | None = doc(
        None,
        "Checkpoint (e.g. from `orchestrator import`) whose model weights start a new run; "
        "ignored once the run dir has its own checkpoints.",
    )
    branch_from: str | None = doc(
        None,
        "Another run's checkpoint whose full training state starts this run on its own schedule (docs/training.md).",
    )
    remote_dir: str | None = doc(
        None,
        "Object-store prefix (s3://bucket/runs/NAME) that gets a copy of every checkpoint; null: local only "
        "(docs/checkpoints.md).",
    )
    remote_retry_s: float = doc(
        120.0,
        "Seconds a run's start retries a failing checkpoint.remote_dir (with backoff) before it stops with "
        "exit code 75.",
    )
    upload_warn_s: float = doc(
        60.0,
        "Warn when an upload to checkpoint.remote_dir has had no answer from the store for this many seconds.",
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = doc(
        True,
        "Write TensorBoard event files under <run.dir>/tensorboard (false: none, even with "
        "`tensorboard` in logging.trackers).",
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = doc(
        ["tensorboard"],
        "Where the scalars go (rank 0): `tensorboard`, `wandb`, `mlflow` (docs/tracking.md).",
    )
    tracker_project: str | None = doc(
        None,
        "W&B project / MLflow experiment of the run (null: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else "
        "`orchestrator`).",
    )
    tracker_run_name: str | None = doc(
        None, "The run's name in W&B / MLflow (null: the name of run.dir)."
    )
    batch_hashes: Literal["off", "batch", "sequence"] = doc(
        "batch",
        "Fingerprints in metrics.jsonl for resume audits: one per micro-batch, one per sequence, or none.",
    )
    peak_tflops: float | None = doc(
        None,
        "Peak dense TFLOP/s of one device at the run's precision, for MFU; null: from the device table "
        "(docs/training.md).",
    )
    layer_grad_norms: bool = doc(
        False,
        "Also log the gradient norm of every transformer block, the embedding and the output head "
        "(grad_norm/<part>) at the log interval, before clipping.",
    )
    sample_interval: int = doc(
        500,
        "Optimizer steps between greedy sample generations from logging.sample_prompts; 0 disables.",
    )
    sample_prompts: list[str] = doc(
        ["The capital of", "Once upon a time", "def add(a, b):"],
        "Fixed prompts for the sample generations.",
    )
    sample_tokens: int = doc(32, "New tokens generated per prompt for the sample generations.")

    def validate(self) -> None:
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"logging.trackers lists a tracker twice: {self.trackers}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(
                f"logging.peak_tflops must be positive (or null), got {self.peak_tflops}"
            )
        if self.sample_interval < 0:
            raise ConfigError(
                f"logging.sample_interval must be >= 0 (0 disables), got {self.sample_interval}"
            )
        if self.sample_interval and (self.sample_tokens < 1 or not self.sample_prompts):
            raise ConfigError(
                "logging.sample_interval > 0 needs logging.sample_tokens >= 1 and at least one "
                "logging.sample_prompts entry (or set logging.sample_interval 0)"
            )


@dataclass
class GuardConfig:
    skip_nonfinite: bool = doc(
        True, "Skip the update of a step whose loss or gradient norm is NaN or Inf."
    )
    spike_factor: float = doc(
        0.0, "Skip the update of a step whose loss exceeds this x the running mean (0: off)."
    )
    spike_warmup: int = doc(50, "Good steps that build the running mean before spikes are judged.")
    rollback_after: int = doc(
        5, "Bad steps in a row that roll the run back to the last checkpoint (0: never)."
    )
    rollback_skip_data: bool = doc(
        True, "After a rollback, go on with the data after the offending batches."
    )
    max_rollbacks: int = doc(
        3, "Rollbacks before the run stops with an error instead of diverging."
    )


@dataclass
class FaultsConfig:
    nan_loss_at_steps: list[int] = doc(
        [], "Fault drill: make the loss of these steps NaN, once each (tests the guard)."
    )


@dataclass
class StrategyConfig:
    name: Literal["ddp", "fsdp", "deepspeed", "single", "auto"] = doc(
        "ddp",
        "How the model is spread over processes: `ddp`, `fsdp` (FSDP2), `deepspeed` (ZeRO), `single` or `auto` "
        "(docs/distributed.md).",
    )
    accelerator: Literal["auto", "cpu", "cuda"] = doc(
        "auto", "Device type; `auto` uses CUDA when present."
    )
    devices: int = doc(
        1,
        "Processes (GPUs, or CPU processes) per node; under Slurm and `fabric run` the launcher's count is used.",
    )
    num_nodes: int = doc(
        1, "Number of nodes (taken from Slurm / `fabric run` when launched by them)."
    )
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = doc(
        "32-true",
        "Fabric precision: `bf16-mixed` on GPUs from A100 on; `32-true` or `bf16-true` too; `16-mixed` is refused.",
    )
    matmul_precision: Literal["highest", "high", "medium"] = doc(
        "high",
        "float32 matmul precision of CUDA processes: `high` (TF32), `highest` (exact fp32) or `medium` "
        "(docs/distributed.md).",
    )
    zero_stage: int = doc(
        2,
        "DeepSpeed ZeRO stage (strategy.name=deepspeed): 1 shards optimizer state, 2 also gradients, 3 also "
        "parameters.",
    )
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = doc(
        "auto",
        "DeepSpeed under bf16: dtype of the gradient partitions; `auto`: bf16 for ZeRO-3 with one micro-batch "
        "per step, else fp32.",
    )
    offload_optimizer: bool = doc(
        False,
        "DeepSpeed: keep optimizer state (and its step) in CPU memory (GPU runs; slower, saves GPU memory).",
    )
    offload_params: bool = doc(
        False, "DeepSpeed ZeRO-3: keep parameters in CPU memory between uses (GPU runs)."
    )
    reshard_after_forward: bool = doc(
        True,
        "FSDP: free gathered parameters after each block's forward (ZeRO-3-like); false keeps them until backward.",
    )
    activation_checkpointing: bool | Literal["none", "selective", "full"] = doc(
        False,
        "Recompute block activations in backward: `full` (or true), `selective` or `none` (or false) (docs/gpus.md).",
    )
    fsdp_shard_size: int | None = doc(
        None,
        "FSDP: ranks that shard each parameter; null or 0 = all; a divisor of the world size gives HSDP "
        "(docs/distributed.md).",
    )
    sharded_checkpoint: bool = doc(
        True,
        "FSDP: every rank writes its own shard; false gathers one full file on rank 0 (DeepSpeed: always sharded).",
    )
    timeout_s: int = doc(
        1800,
        "Seconds a collective (and the rendezvous) waits for the other ranks before the job fails instead of hanging.",
    )
    requeue: bool = doc(
        True,
        "Under Slurm: on SIGUSR1 save, `scontrol requeue` and exit (docs/slurm.md); SIGTERM saves and exits.",
    )

    def validate(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"strategy.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and not (self.name == "deepspeed" and self.zero_stage == 3):
            raise ConfigError(
                "strategy.offload_params needs strategy.name=deepspeed and strategy.zero_stage=3"
            )
        if self.offload_optimizer and self.name != "deepspeed":
            raise ConfigError("strategy.offload_optimizer needs strategy.name=deepspeed")
        if self.precision == "16-mixed":
            where = "needs a GPU, and even there it " if self.accelerator == "cpu" else ""
            raise ConfigError(
                f"strategy.precision=16-mixed {where}is not supported by this trainer: fp16 needs loss "
                "scaling, and here it would be wrong (a step skipped by the bad-step guard never reaches "
                "the scaler's update, so the loss scale never backs off; fused AdamW cannot be unscaled "
                "for gradient clipping; FSDP2 and DeepSpeed fp16 have the same gaps). Use "
                "strategy.precision=bf16-mixed on GPUs from A100 on (no loss scaling needed), or 32-true."
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"strategy.timeout_s must be positive, got {self.timeout_s}")
        shard = self.fsdp_shard_size or 0
        world = self.devices * self.num_nodes
        if shard < 0:
            raise ConfigError(
                f"strategy.fsdp_shard_size must be >= 0 (0 or null: shard over all ranks), got {shard}"
            )
        if shard and self.name != "fsdp":
            raise ConfigError(
                f"strategy.fsdp_shard_size={shard} needs strategy.name=fsdp (it is {self.name}); "
                "remove it, or set strategy.name=fsdp for hybrid sharding"
            )
        if shard and world > 0 and world % shard:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ConfigError(
                f"strategy.fsdp_shard_size={shard} does not divide the world size {world} "
                f"(strategy.devices x strategy.num_nodes = {self.devices} x {self.num_nodes}): HSDP "
                f"needs whole replicas of {shard} ranks. Set strategy.fsdp_shard_size to one of "
                f"{divisors} (usually strategy.devices = {self.devices}, one replica per node), or 0 "
                "to shard over all ranks"
            )


@dataclass
class StorageConfig:
    endpoint_url: str | None = doc(
        None,
        "S3-compatible endpoint (e.g. http://10.0.0.5:9000) for every s3:// URL; null: AWS_ENDPOINT_URL, else AWS S3.",
    )

    def validate(self) -> None:
        url = self.endpoint_url
        if url and not re.fullmatch(r"https?://[^/@\s]+/?", url):
            raise ConfigError(
                f"storage.endpoint_url={url!r} must be http(s)://HOST[:PORT] (no path, no credentials: "
                f"set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment)"
            )

    def options(self) -> dict:
        """Client options for litdata and data.storage (endpoint only)."""
        return storage_options(self.endpoint_url)


@dataclass
class RunConfig:
    dir: str = doc(
        "runs/default", "Run directory: resolved config, checkpoints, TensorBoard logs, metrics."
    )
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
    storage: StorageConfig = section(
        StorageConfig, "Object-store access (s3:// data and checkpoints)."
    )
    logging: LoggingConfig = section(LoggingConfig, "TensorBoard and metrics.")
    strategy: StrategyConfig = section(StrategyConfig, "Parallelism and precision.")
    guard: GuardConfig = section(GuardConfig, "Bad-step detection and rollback.")
    faults: FaultsConfig = section(
        FaultsConfig, "Fault injection for drills and tests (empty in real runs)."
    )

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    def validate(self) -> None:
        """Value checks: no files, no network, no processes (those are training/preflight.py's);
        raise ConfigError naming the key. Each section checks its own keys, then the rules that
        span sections, one small function each."""
        self.model.validate()
        self.strategy.validate()
        self.data.validate()
        self.storage.validate()
        self.logging.validate()
        self.optimizer.validate()
        self.eval.validate()
        self.schedule.validate(self.train.max_steps)
        for rule in CROSS_SECTION_RULES:
            rule(self)

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


# -- rules that span sections (Config.validate runs each) -------------------------------------


def _counts_are_positive(cfg: Config) -> None:
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.log_interval": cfg.train.log_interval,
        "strategy.devices": cfg.strategy.devices,
        "strategy.num_nodes": cfg.strategy.num_nodes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in {
        "eval.interval": cfg.eval.interval,
        "eval.max_batches": cfg.eval.max_batches,
        "checkpoint.interval": cfg.checkpoint.interval,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "data.num_workers": cfg.data.num_workers,
        "checkpoint.keep_every": cfg.checkpoint.keep_every,
        "checkpoint.remote_retry_s": cfg.checkpoint.remote_retry_s,
        "checkpoint.upload_warn_s": cfg.checkpoint.upload_warn_s,
        "guard.spike_factor": cfg.guard.spike_factor,
        "guard.spike_warmup": cfg.guard.spike_warmup,
        "guard.rollback_after": cfg.guard.rollback_after,
        "guard.max_rollbacks": cfg.guard.max_rollbacks,
        "train.gc_interval": cfg.train.gc_interval,
    }.items():
        if not value >= 0:  # also refuses NaN
            raise ConfigError(f"{key} must be >= 0, got {value}")


def _lengths_fit_the_model(cfg: Config) -> None:
    if cfg.train.seq_len is not None and not 0 < cfg.train.seq_len <= cfg.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} must be in 1..model.max_seq_len={cfg.model.max_seq_len}"
        )
    if not 0 <= cfg.eval.loss_from < cfg.seq_len:
        raise ConfigError(
            f"eval.loss_from={cfg.eval.loss_from} must be in [0, {cfg.seq_len}) (the training sequence length)"
        )
    if cfg.model.arch == "encoder_decoder" and not (
        cfg.model.encoder_len < cfg.seq_len and cfg.seq_len >= 2
    ):
        raise ConfigError(
            f"model.encoder_len={cfg.model.encoder_len} leaves no decoder tokens in a training block of "
            f"{cfg.seq_len} (train.seq_len): choose an encoder_len below it (0 = half the block)"
        )
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_tokens is not None:
        raise ConfigError("set only one of train.global_batch_size and train.global_batch_tokens")


def _strategy_supports_the_rest(cfg: Config) -> None:
    if cfg.checkpoint.async_save and cfg.strategy.name == "deepspeed":
        raise ConfigError(
            "checkpoint.async_save=true is not supported with strategy.name=deepspeed: DeepSpeed writes "
            "its own sharded checkpoint files from every rank, which cannot be snapshotted and written in "
            "a background thread; set checkpoint.async_save=false"
        )
    if cfg.optimizer.name == "adafactor" and cfg.strategy.name in ("deepspeed", "fsdp"):
        why = {
            "deepspeed": "ZeRO hands the optimizer flat 1-D partitions, so Adafactor's row/column "
            "factorisation (and its per-parameter RMS) would silently become an unfactored one",
            "fsdp": "FSDP2's parameters are DTensors, on which torch's Adafactor step fails (in-place "
            "ops on the partial column sums)",
        }[cfg.strategy.name]
        raise ConfigError(
            f"optimizer.name=adafactor does not work with strategy.name={cfg.strategy.name}: {why}; "
            "use strategy.name=ddp (Adafactor's factored state is small: replicating it costs little)"
        )
    if (
        cfg.checkpoint.async_save
        and cfg.strategy.name == "fsdp"
        and not cfg.strategy.sharded_checkpoint
    ):
        raise ConfigError(
            "checkpoint.async_save=true with strategy.name=fsdp needs strategy.sharded_checkpoint=true "
            "(the background write is of per-rank shards); set one of them differently"
        )


def _remote_urls_are_plain(cfg: Config) -> None:
    remote = cfg.checkpoint.remote_dir
    if remote and not (remote.startswith("s3://") and len(remote.rstrip("/").split("/", 3)) == 4):
        raise ConfigError(
            f"checkpoint.remote_dir={remote!r} must be an s3:// URL with a bucket and a path, like "
            f"s3://bucket/runs/NAME (S3-compatible stores through storage.endpoint_url)"
        )
    for key, url in [*cfg.data.remote_keys().items(), ("checkpoint.remote_dir", remote)]:
        if url and "@" in url.split("/")[2]:
            raise ConfigError(
                f"{key} must not hold credentials in the URL; set AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY in the environment instead"
            )


def _one_starting_point(cfg: Config) -> None:
    if cfg.checkpoint.branch_from is not None and cfg.checkpoint.init_from is not None:
        raise ConfigError(
            "set only one of checkpoint.branch_from (the full training state) and "
            "checkpoint.init_from (the model weights only)"
        )


CROSS_SECTION_RULES = (
    _counts_are_positive,
    _lengths_fit_the_model,
    _strategy_supports_the_rest,
    _remote_urls_are_plain,
    _one_starting_point,
)


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
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}"
            )
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
    return make_paths_absolute(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, run dirs)."""
    return config_from_layers([data])


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (against the working directory); URLs and None unchanged."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def make_paths_absolute(cfg: Config) -> Config:
    """Every file-system path of `cfg` made absolute, in place, so that a resolved (and saved)
    config means the same from any directory: export, evaluate and generate read data.tokenizer
    from a checkpoint's config.yaml wherever they run."""
    cfg.run.dir = _absolute(cfg.run.dir)
    cfg.data.dir = _absolute(cfg.data.dir)
    cfg.data.val_dir = _absolute(cfg.data.val_dir)
    cfg.data.tokenizer = _absolute(cfg.data.tokenizer)
    for source in cfg.data.sources:
        source.dir = _absolute(source.dir)
    cfg.eval.tasks = [_absolute(task) for task in cfg.eval.tasks]
    cfg.checkpoint.init_from = _absolute(cfg.checkpoint.init_from)
    cfg.checkpoint.branch_from = _absolute(cfg.checkpoint.branch_from)
    if cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = _absolute(cfg.checkpoint.resume)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, its paths absolute (see `make_paths_absolute`)."""
    data = to_dict(make_paths_absolute(copy.deepcopy(cfg)))
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
