"""torch.compile applied to the model from outside (`model.compile: true`)."""

from __future__ import annotations

from torch import nn

from orchestrator.parallel.activation_checkpointing import transformer_blocks


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile every transformer block in place (`Module.compile`): parameter names,
    state-dict keys and hooks stay those of the plain model. Blocks share code, so one
    compilation serves all."""
    for block in transformer_blocks(model):
        block.compile(**compile_kwargs)
    return model
