"""Checkpoints that are either complete or ignored.

Layout: <run.dir>/checkpoints/step-00000100/ holding `state` (a file, or a directory for
sharded strategies), `config.yaml` and `meta.json`. Everything is written into
`step-00000100.partial/` first; only after every rank has finished does rank 0 write
`meta.json` and rename the directory. A crash mid-save leaves a `.partial` directory, which
is never taken for a checkpoint and is removed at the next start.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric

from orchestrator.config import Config, save_config
from orchestrator.distributed import gather_object, on_rank_zero

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state"
META_NAME = "meta.json"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and STEP_DIR.match(path.name) is not None and (path / META_NAME).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resume_target(cfg: Config) -> Path | None:
    """The checkpoint this run continues from, per checkpoint.resume."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(checkpoint_root(cfg))
    return Path(cfg.checkpoint.resume)


def remove_partial(root: Path) -> list[Path]:
    """Delete leftovers of interrupted saves; returns what was removed."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        # As plain types: checkpoints load with torch.load(weights_only=True), which refuses ndarrays.
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(fabric: Fabric, cfg: Config, state: dict[str, Any], step: int) -> Path:
    """Write a complete checkpoint for `step` (collective: every rank must call it)."""
    root = checkpoint_root(cfg)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    on_rank_zero(fabric, lambda: (root.mkdir(parents=True, exist_ok=True), shutil.rmtree(partial, True)))
    fabric.barrier()
    # Every rank's RNG state, so each process continues its own random stream.
    full_state = dict(state, rng=gather_object(fabric, capture_rng()))
    fabric.save(partial / STATE_NAME, full_state)
    fabric.barrier()

    def finish() -> None:
        save_config(cfg, partial / "config.yaml")
        meta = {"step": step, "world_size": fabric.world_size, "time": time.time()}
        (partial / META_NAME).write_text(json.dumps(meta, indent=2))
        if final.exists():  # a re-run of the same step (e.g. after resuming from an older one)
            shutil.rmtree(final)
        partial.rename(final)
        prune(root, cfg.checkpoint.keep_last)

    on_rank_zero(fabric, finish)
    fabric.barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Fill `state` in place from checkpoint dir `path`; returns what was not a stateful object."""
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {META_NAME}); pass a directory like "
            f"<run.dir>/checkpoints/step-00000100"
        )
    state["rng"] = None
    remainder = fabric.load(path / STATE_NAME, state)
    rng_per_rank = state.pop("rng")
    if rng_per_rank is not None:
        # Same world size: each rank takes its own stream; otherwise rank 0's is all we can offer.
        same_world = len(rng_per_rank) == fabric.world_size
        restore_rng(rng_per_rank[fabric.global_rank if same_world else 0])
    return remainder


def load_weights(fabric: Fabric, path: Path, model: torch.nn.Module) -> None:
    """Only the model weights of checkpoint `path` (a new run starting from pretrained weights)."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META_NAME})")
    contents = fabric.load(path / STATE_NAME)
    if "model" not in contents:
        raise KeyError(f"{path / STATE_NAME} holds no model weights (keys: {sorted(contents)})")
    model.load_state_dict(contents["model"], strict=True)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_NAME).read_text())
