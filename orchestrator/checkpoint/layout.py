"""Where checkpoints live and how they are named, found, cleaned up and pruned.

    <run.dir>/checkpoints/step-00000100/   a published checkpoint:
        state          a file (ddp, single, gathered fsdp) or a directory (sharded fsdp, deepspeed)
        config.yaml    the resolved config of the run that wrote it
        manifest.json  written last: the checkpoint is complete (see manifest.py)
    <run.dir>/checkpoints/step-00000200.partial/   a save in progress, or an interrupted one
    <checkpoint.remote_dir>/step-00000100/...      the same files in an object store (remote.py)

A directory counts as a checkpoint only once it is renamed into place with its manifest.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import Config, config_from_dict

STATE_NAME = "state"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.yaml"
META_NAME = "meta.json"  # what `orchestrator import` records about its source
CONSOLIDATED_NAME = "consolidated.pt"  # `orchestrator consolidate`'s default output
PARTIAL_SUFFIX = ".partial"
STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def partial_dir(final: Path) -> Path:
    """Where the checkpoint `final` is written before it is published."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def checkpoint_step(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step-NNNNNNNN checkpoint directory")
    return int(match.group(1))


def is_published(path: Path) -> bool:
    """Renamed into place with a manifest (cheap; `manifest.verify` checks the contents)."""
    return (
        path.is_dir() and STEP_DIR.match(path.name) is not None and (path / MANIFEST_NAME).is_file()
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_published(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given; a run directory or its `checkpoints/` gives the latest
    published one (the offline tools' way of naming a checkpoint)."""
    path = Path(path)
    if (path / STATE_NAME).exists() and (path / CONFIG_NAME).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected a directory holding `{STATE_NAME}` and "
        f"`{CONFIG_NAME}` (like <run.dir>/checkpoints/step-00001000), or a run directory with "
        "complete checkpoints"
    )


def remove_partial(root: Path) -> list[Path]:
    """Delete leftovers of interrupted saves; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def retention_victims(
    names: list[str], keep_last: int, keep_every: int = 0, protect: str | None = None
) -> list[str]:
    """The retention rule on checkpoint names (oldest first), shared by the local run dir and
    checkpoint.remote_dir: all but the newest `keep_last`, except multiples of `keep_every` and
    `protect`. `keep_last` <= 0 keeps everything."""
    if keep_last <= 0:
        return []
    return [
        name
        for name in names[:-keep_last]
        if not (keep_every and checkpoint_step(Path(name)) % keep_every == 0) and name != protect
    ]


def prune(
    root: Path,
    keep_last: int,
    keep_every: int = 0,
    protect: Path | None = None,
    keep: Collection[str] = (),
) -> list[Path]:
    """Keep the newest `keep_last` checkpoints plus every step that is a multiple of `keep_every`,
    and always `protect` (the checkpoint just published: after a fallback from a damaged newer
    one, or an explicit resume from an older one, it is not among the newest by step) and the
    checkpoints named in `keep` (those still waiting for their upload to checkpoint.remote_dir)."""
    found = list_checkpoints(root)
    victims = retention_victims(
        [p.name for p in found], keep_last, keep_every, None if protect is None else protect.name
    )
    victims = [name for name in victims if name not in keep]
    removed = []
    for old in (p for p in found if p.name in victims):
        # Unlist it atomically first: a kill during the delete leaves a .partial, never a half
        # checkpoint.
        doomed = old.with_name(old.name + ".deleting" + PARTIAL_SUFFIX)
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def initial_progress() -> dict[str, Any]:
    """The `progress` entry of the training state before the first step."""
    return {"step": 0, "tokens_seen": 0, "initial_val_loss": None}


def saved_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The resolved config saved with a checkpoint, as a plain dict ({} when there is none)."""
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def load_saved_config(ckpt_dir: str | Path) -> Config:
    """The full resolved `Config` saved next to the weights."""
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: every checkpoint holds the config it was trained with"
        )
    return config_from_dict(saved_config(ckpt_dir))
