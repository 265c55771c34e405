"""Shared builders for the checkpoint unit tests: configs and fake published checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint.files import write_state_file
from orchestrator.checkpoint.layout import CONFIG_NAME, STATE_NAME, step_dir
from orchestrator.checkpoint.manifest import write_manifest
from orchestrator.config import Config, load_config, save_config


def make_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(["--model.name", "tiny", "--run.dir", str(run_dir), *overrides])


def make_checkpoint(
    root: Path,
    step: int,
    cfg: Config | None = None,
    state: dict[str, Any] | None = None,
    **info: Any,
) -> Path:
    """A published checkpoint `root/step-NNNNNNNN` (state file, optional config, manifest last)."""
    path = step_dir(root, step)
    if state is None:
        state = {"model": {"w": torch.arange(64, dtype=torch.float32) + step}, "step": step}
    digest = write_state_file(state, path / STATE_NAME)
    if cfg is not None:
        save_config(cfg, path / CONFIG_NAME)
    write_manifest(
        path,
        {"step": step, "tokens_seen": step * 16, "world_size": 1, **info},
        {STATE_NAME: digest},
    )
    return path


def flip_middle_byte(file: Path) -> None:
    """Same size, different bytes: only a checksum sees it."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
