"""torch.compile applied to the model from outside (`model.compile: true`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from orchestrator.parallel.activation_checkpointing import transformer_blocks


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile every transformer block in place (`Module.compile`): parameter names,
    state-dict keys and hooks stay those of the plain model. Blocks share code, so one
    compilation serves all."""
    for block in transformer_blocks(model):
        block.compile(**compile_kwargs)
    return model


@contextlib.contextmanager
def eager():
    """In-loop evaluation and generation run eagerly: compiled blocks share one frame whose
    recompile limit (8) validation, multiple-choice scoring and KV-cached generation (a variant per
    layer index and cache state) would use up before the first training step, after which
    training itself would run eager."""
    with torch.compiler.set_stance("force_eager"):
        yield
