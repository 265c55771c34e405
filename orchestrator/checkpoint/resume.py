"""Which checkpoint a run resumes from, and whether this run can resume it at all.

The checks here run before any process is launched (preflight) or before anything is loaded,
so that a mismatch is one clear error naming the checkpoint and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.config import KERNEL_FIELDS
from orchestrator.checkpoint.consolidate import checkpoint_format
from orchestrator.checkpoint.layout import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
    saved_config,
)
from orchestrator.checkpoint.manifest import manifest_step, read_manifest, verify
from orchestrator.checkpoint.remote import fetch_newer
from orchestrator.config import Config
from orchestrator.parallel.strategy import strategy_label
from orchestrator.schema import ConfigError, to_dict


def choose_resume(
    cfg: Config,
    remote: bool = False,
    check: Callable[[Path], str | None] | None = None,
    listing: Callable[[Path], list[Path]] = list_checkpoints,
    fetch: Callable[..., Path | None] | None = None,
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from per checkpoint.resume, and the damaged ones passed over.

    `remote` (a run's start): with checkpoint.remote_dir, a newer complete remote checkpoint than
    the run dir's newest good one is downloaded into the run dir first (checkpoint/remote.py),
    and chosen. Without a checkpoint of the run's own (or with checkpoint.resume=never),
    checkpoint.branch_from when set: a branch starts from another run's full state.

    `check(path)`: the reason a checkpoint cannot be used, or None (default: `manifest.verify`
    in this process, checksums per checkpoint.verify_checksums). `listing` and `fetch` replace
    list_checkpoints and remote.fetch_newer: every rank of a run calls this together, verifying
    its share of each checkpoint (Checkpointer.choose_resume), on rank 0's listing and download.
    """
    if check is None:
        checksums = cfg.checkpoint.verify_checksums
        check = lambda path: verify(path, checksums=checksums)  # noqa: E731
    if cfg.checkpoint.resume == "never":
        return branch_point(cfg, check), []
    if cfg.checkpoint.resume != "auto":
        path = Path(cfg.checkpoint.resume)
        reason = check(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume={path} cannot be used: {reason}")
        return path, []
    skipped = []
    chosen = None
    for path in reversed(listing(checkpoint_root(cfg))):
        reason = check(path)
        if reason is None:
            chosen = path
            break
        skipped.append((path, reason))
    if remote and cfg.checkpoint.remote_dir:
        fetched = (fetch or fetch_newer)(
            cfg, checkpoint_root(cfg), chosen, lambda saved: model_mismatch(saved, cfg)
        )
        if fetched is not None:  # it replaced a damaged local copy of its step, if there was one
            return fetched, [(p, r) for p, r in skipped if p.name > fetched.name]
    if chosen is None:
        chosen = branch_point(cfg, check)
    return chosen, skipped


def branch_point(cfg: Config, check: Callable[[Path], str | None] | None = None) -> Path | None:
    """checkpoint.branch_from, verified (`check`, as in choose_resume), for a run with no
    checkpoint of its own to resume (None without one). Its full state starts the run; a damaged
    one is an error, never a fresh start."""
    if cfg.checkpoint.branch_from is None:
        return None
    path = Path(cfg.checkpoint.branch_from)
    reason = (
        verify(path, checksums=cfg.checkpoint.verify_checksums) if check is None else check(path)
    )
    if reason is not None:
        raise CheckpointError(f"checkpoint.branch_from={path} cannot be used: {reason}")
    return path


def is_branch(cfg: Config, path: Path | None) -> bool:
    """Whether `path`, the checkpoint a run starts from, is its checkpoint.branch_from."""
    branch = cfg.checkpoint.branch_from
    return path is not None and branch is not None and Path(path) == Path(branch)


def resume_target(cfg: Config) -> Path | None:
    """Where a run would resume from without verifying contents (cheap; for pre-launch checks):
    also checkpoint.branch_from, for a run without a checkpoint of its own."""
    branch = None if cfg.checkpoint.branch_from is None else Path(cfg.checkpoint.branch_from)
    if cfg.checkpoint.resume == "never":
        return branch
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(checkpoint_root(cfg)) or branch
    return Path(cfg.checkpoint.resume)


def resume_step_hint(cfg: Config) -> int | None:
    """The step a run will probably resume at (before verification), from the manifest."""
    path = resume_target(cfg)
    return None if path is None else manifest_step(path)


def model_mismatch(saved: dict[str, Any], cfg: Config) -> str | None:
    """How the model of a checkpoint's saved config differs from this run's (None: the same)."""
    saved_model = saved.get("model") if isinstance(saved, dict) else None
    saved_model = saved_model if isinstance(saved_model, dict) else {}
    current = to_dict(cfg.model)
    # Kernel choices (attention, fused kernels, compile) compute the same model; z_loss (a term of
    # the training loss) and dropout (training-mode noise, no parameter: finetuning from a checkpoint
    # usually turns it on) are not part of the weights: they may change, on resume and with init_from.
    differing = [
        k
        for k in current
        if k in saved_model
        and saved_model[k] != current[k]
        and k not in ("name", "z_loss", "dropout", *KERNEL_FIELDS)
    ]
    if not differing:
        return None
    return ", ".join(
        f"model.{k}={saved_model[k]!r} there but {current[k]!r} here" for k in differing
    )


def check_resume_compatible(cfg: Config) -> None:
    """A checkpoint only continues a run of the same model; say so before loading it fails."""
    for path in (resume_target(cfg), cfg.checkpoint.init_from):
        if path is None:
            continue
        details = model_mismatch(saved_config(path), cfg)
        if details and is_branch(cfg, path):
            raise ConfigError(
                f"checkpoint.branch_from={path} was trained with a different model ({details}): a "
                "branch continues that run, so use its model settings (or checkpoint.init_from for "
                "its weights alone)"
            )
        if details:
            raise ConfigError(
                f"checkpoint {path} was trained with a different model ({details}): use the same model "
                "settings, a new run.dir, or --checkpoint.resume never"
            )


def check_resume_strategy(ckpt_dir: str | Path, cfg: Config, world_size: int) -> None:
    """A clear error, before loading, when checkpoint `ckpt_dir` cannot be resumed by this run's
    strategy (its optimizer state is laid out for another one); the weights can always start a
    new run."""
    ckpt_dir = Path(ckpt_dir)
    try:
        kind = checkpoint_format(ckpt_dir)
        saved = saved_config(ckpt_dir).get("strategy", {})
        has_manifest = (ckpt_dir / MANIFEST_NAME).is_file()
        saved_world = read_manifest(ckpt_dir).get("world_size") if has_manifest else None
    except (OSError, ValueError):
        return  # unreadable: the loader reports it
    s = cfg.strategy
    wanted = {
        "ddp": "file",
        "single": "file",
        "auto": "file",
        "fsdp": "dcp" if s.sharded_checkpoint else "file",
        "deepspeed": "deepspeed",
    }[s.name]
    problem = None
    replicated = ("ddp", "single", "auto")
    if kind != wanted:
        problem = f"it holds a {kind!r} checkpoint, this run ({strategy_label(cfg)}) reads {wanted!r} ones"
    elif (
        kind == "file"
        and saved.get("name")
        and (saved["name"] in replicated) != (s.name in replicated)
    ):
        problem = f"its optimizer state is laid out for {saved['name']}, this run uses {s.name}"
    elif kind == "deepspeed" and saved.get("zero_stage") not in (None, s.zero_stage):
        problem = f"it was written by ZeRO stage {saved.get('zero_stage')}, this run uses stage {s.zero_stage}"
    elif kind == "deepspeed" and saved_world not in (None, world_size):
        problem = f"its ZeRO partitions are for {saved_world} processes, this run has {world_size}"
    if problem:
        source = f"{saved.get('name', '?')}" + (
            f" (ZeRO-{saved.get('zero_stage')})" if saved.get("name") == "deepspeed" else ""
        )
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: {problem} (written with strategy {source}). Resume with the "
            f"strategy and world size that wrote it, or start a new run from its weights: "
            f"`--checkpoint.init_from {ckpt_dir} --run.dir NEW_DIR` (any strategy; `orchestrator consolidate "
            f"{ckpt_dir}` makes that instant)"
        )
