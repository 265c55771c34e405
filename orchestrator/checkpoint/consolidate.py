"""One full model state dict from a checkpoint of any strategy.

    orchestrator consolidate CKPT_DIR [--output FILE]

`CKPT_DIR/state` is, depending on the strategy that wrote it:
  * a file (ddp, single, fsdp with sharded_checkpoint=false): torch.save'd dict with "model";
  * a torch.distributed.checkpoint directory (fsdp, sharded): `.metadata` + one shard per rank;
  * a DeepSpeed directory (deepspeed, any ZeRO stage): `latest`, `checkpoint/*_model_states.pt`
    and per-rank `*_optim_states.pt` holding the fp32 master weights.

`load_model_state(ckpt_dir)` reads any of them on one CPU process (no process group) and returns
the fp32 weights under the names of models/llama.py. `consolidate` writes them to one file
(default `CKPT_DIR/consolidated.pt`, which `load_model_state` then reads directly):
`torch.load(FILE, weights_only=True)["model"]` is the plain state dict; the file also records
the source step and strategy. Exports (`orchestrator export`) and runs with any other strategy
(`--checkpoint.init_from CKPT_DIR`) start from it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from orchestrator.checkpoint.files import load_tensors
from orchestrator.checkpoint.layout import CONSOLIDATED_NAME, MANIFEST_NAME, META_NAME, STATE_NAME

# Prefixes wrappers put in front of parameter names (Fabric, DDP, DeepSpeed, torch.compile, checkpoint wrappers).
WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def checkpoint_format(ckpt_dir: str | Path) -> str:
    """`file`, `dcp` (FSDP shards), `deepspeed`, or `consolidated` (a consolidate output file)."""
    path = Path(ckpt_dir)
    if path.is_file():
        return "consolidated"
    state = path / STATE_NAME
    if state.is_file():
        return "file"
    if state.is_dir():
        if (state / ".metadata").is_file():
            return "dcp"
        if (state / "latest").is_file() or (state / "checkpoint").is_dir():
            return "deepspeed"
        raise ValueError(
            f"{state} is a directory but neither a DeepSpeed nor a torch.distributed.checkpoint one"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected {state} (like <run.dir>/checkpoints/step-00001000/state)"
    )


def load_model_state(
    ckpt_dir: str | Path, prefer_consolidated: bool = True
) -> dict[str, torch.Tensor]:
    """The model's full state dict (models/llama.py names, on CPU) from a checkpoint directory
    of any strategy, or from a file written by `consolidate`."""
    path = Path(ckpt_dir)
    if prefer_consolidated and path.is_dir() and (path / CONSOLIDATED_NAME).is_file():
        path = path / CONSOLIDATED_NAME
    kind = checkpoint_format(path)
    if kind in ("consolidated", "file"):
        source = path if kind == "consolidated" else path / STATE_NAME
        model = _model_entry(load_tensors(source), source)
    elif kind == "dcp":
        model = _load_dcp_model(path / STATE_NAME)
    else:
        model = _load_deepspeed_model(path / STATE_NAME)
    return {_strip_prefixes(k): v for k, v in model.items()}


def _model_entry(state, source: Path) -> dict[str, torch.Tensor]:
    """The weights in a loaded file: the trainer's {"model": ...}, a {"state_dict": ...}, or a bare
    state dict (DeepSpeed's zero_to_fp32 output)."""
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                return state[key]
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
    found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
    raise ValueError(
        f"{source} holds no model weights (expected a dict with key 'model'; found {found})"
    )


def _load_dcp_model(state_dir: Path) -> dict[str, torch.Tensor]:
    """Only the model entries of a torch.distributed.checkpoint directory (not the optimizer)."""
    loaded: dict = {}
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(str(state_dir)),
        planner=_EmptyStateDictLoadPlanner(keys={"model"}),
        no_dist=True,
    )
    if not isinstance(loaded.get("model"), dict):
        raise ValueError(f"{state_dir} holds no model weights (top-level keys: {sorted(loaded)})")
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in loaded["model"].items()
    }


def _load_deepspeed_model(state_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights gathered from every rank's ZeRO partition (DeepSpeed's zero_to_fp32)."""
    # deepspeed is imported only here: it takes seconds and only DeepSpeed checkpoints need it.
    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (
        (state_dir / "latest").read_text().strip()
        if (state_dir / "latest").is_file()
        else "checkpoint"
    )
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=tag)
    finally:
        ds_logger.setLevel(level)
    return {k: v.contiguous() for k, v in state.items()}


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        if "._checkpoint_wrapped_module." in name:
            name, changed = name.replace("._checkpoint_wrapped_module.", "."), True
    return name


def consolidate(ckpt_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the full fp32 state dict of checkpoint `ckpt_dir` to one file; returns its path."""
    ckpt_dir = Path(ckpt_dir)
    kind = checkpoint_format(ckpt_dir)
    if kind == "consolidated":
        raise ValueError(f"{ckpt_dir} is already a consolidated file")
    out = Path(output) if output is not None else ckpt_dir / CONSOLIDATED_NAME
    started = time.perf_counter()
    model = load_model_state(ckpt_dir, prefer_consolidated=False)
    meta = _read_json(ckpt_dir / MANIFEST_NAME) or _read_json(ckpt_dir / META_NAME) or {}
    payload = {
        "model": model,
        "step": int(meta["step"]) if "step" in meta else None,
        "source_format": kind,
        "source_strategy": meta.get("strategy"),
        "source_world_size": meta.get("world_size"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)  # never a half-written file under the final name
    print(
        f"Consolidated {kind} checkpoint {ckpt_dir} ({len(model)} tensors, "
        f"{sum(t.numel() for t in model.values()):,} parameters) into {out} in {time.perf_counter() - started:.1f}s"
    )
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
