"""Validation during training: mean next-token loss over the validation split, on every rank,
every eval.interval steps, at the last step, and (eval.at_start) before the first."""

from __future__ import annotations

import torch
from lightning.fabric import Fabric

from data.loader import make_dataloader, resolve_split
from models.kernels import IGNORE_INDEX
from orchestrator.config import Config
from orchestrator.training.data import stream_options
from orchestrator.training.monitor import Monitor


class Validator:
    """Decides when to validate, runs it, and reports the loss to the monitor."""

    def __init__(self, fabric: Fabric, cfg: Config, model: torch.nn.Module, monitor: Monitor):
        self.fabric = fabric
        self.cfg = cfg
        self.model = model
        self.monitor = monitor
        self.last_loss: float | None = None

    def due(self, step: int) -> bool:
        interval = self.cfg.eval.interval
        return bool(interval and step % interval == 0) or step == self.cfg.train.max_steps

    def maybe_run(self, step: int) -> float | None:
        return self.run(step) if self.due(step) else None

    def run(self, step: int) -> float:
        self.last_loss = validate(self.fabric, self.model, self.cfg)
        self.monitor.validation(step, self.last_loss)
        return self.last_loss


@torch.no_grad()
def validate(fabric: Fabric, model: torch.nn.Module, cfg: Config) -> float:
    """Mean next-token loss over (up to eval.max_batches of) the validation split, all ranks: over
    every target (the decoder), or the decoder's targets (the encoder-decoder, whose forward pass
    scores only those); eval.loss_from > 0 leaves out the targets before that position."""
    model.eval()
    stream = stream_options(cfg)
    loader = make_dataloader(
        resolve_split(cfg.data.val_split(), "val", stream),
        seq_len=cfg.seq_len,
        batch_size=cfg.train.micro_batch_size,
        shuffle=False,
        seed=cfg.run.seed,
        num_workers=0,
        stream=stream,
    )
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # (sum of losses, batches)
    for i, tokens in enumerate(loader):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        tokens = tokens.to(fabric.device).long()  # (B, T+1)
        targets = tokens[:, 1:]  # (B, T)
        if cfg.eval.loss_from:  # e.g. only the positions an encoder-decoder's decoder predicts
            targets = targets.clone()
            targets[:, : cfg.eval.loss_from] = IGNORE_INDEX
        totals[0] += model(tokens[:, :-1], targets=targets).double()  # mean next-token loss
        totals[1] += 1
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    if totals[1] == 0:
        raise ValueError(
            f"the validation split {cfg.data.val_split()} yields no batch of "
            f"{cfg.train.micro_batch_size}x{cfg.seq_len + 1} tokens per process: add validation data or lower "
            "train.micro_batch_size / train.seq_len"
        )
    return float(totals[0] / totals[1])
