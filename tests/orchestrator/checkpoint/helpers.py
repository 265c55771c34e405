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


# A tiny Llama under FSDP2 on 2 CPU processes (tests run as scripts by Fabric's launcher).
FSDP2_TINY = [
    "--model.name", "tiny", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_hidden", "172", "--model.vocab_size", "512",
    "--model.max_seq_len", "64",
    "--strategy.name", "fsdp", "--strategy.accelerator", "cpu", "--strategy.devices", "2",
    "--strategy.precision", "32-true", "--checkpoint.keep_last", "0",
]  # fmt: skip


def fsdp2_config(root, name: str, async_save: bool):
    from orchestrator.config import load_config

    return load_config(
        [
            *FSDP2_TINY,
            "--run.dir",
            str(root / name),
            "--checkpoint.async_save",
            str(async_save).lower(),
        ]
    )


def fsdp2_trained(cfg):
    """On every rank: Fabric for `cfg`, a Llama and AdamW set up under FSDP2 and trained one step
    (the optimizer has state), and the function that takes another step."""
    import torch

    from models.llama import Llama
    from orchestrator.parallel.launch import build_fabric

    fabric = build_fabric(cfg)
    fabric.launch()
    fabric.seed_everything(0)
    with fabric.init_module():
        model = Llama(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)

    def train_step():
        tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(7))
        fabric.backward(model(tokens[:, :-1], targets=tokens[:, 1:]))
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    return fabric, model, optimizer, train_step


def write_rank_checks(checks, root: str) -> int:
    """A test file run as a script by Fabric's launcher: each rank writes what `checks(root)`
    saw (a dict with its "rank") to root/rank<R>.json for the test to read."""
    import json
    from pathlib import Path

    out = checks(Path(root))
    (Path(root) / f"rank{out['rank']}.json").write_text(json.dumps(out))
    return 0
