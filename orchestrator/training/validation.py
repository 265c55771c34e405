"""Validation during training: mean next-token loss over the validation split, on every rank,
every eval.interval steps, at the last step, and (eval.at_start) before the first."""

from __future__ import annotations

import torch
from lightning_fabric import Fabric

from data.documents import DocumentBoundary
from data.loader import make_dataloader, resolve_split
from models.kernels import IGNORE_INDEX
from orchestrator.config import Config
from orchestrator.parallel.compile import eager
from orchestrator.parallel.fsdp import gathered
from orchestrator.training.data import model_batch, packing_arguments, stream_options
from orchestrator.training.monitor import Monitor


class Validator:
    """Decides when to validate, runs it, and reports the loss to the monitor; then scores the
    eval.tasks (orchestrator/training/downstream.py) and reports them too."""

    def __init__(
        self,
        fabric: Fabric,
        cfg: Config,
        model: torch.nn.Module,
        monitor: Monitor,
        documents: DocumentBoundary | None = None,
        instruction: bool = False,
    ):
        self.fabric = fabric
        self.cfg = cfg
        self.model = model
        self.monitor = monitor
        self.documents = documents  # data.document_mask: where the validation documents start
        self.instruction = instruction  # instruction data: the loss over the responses only
        self.last_loss: float | None = None
        # eval.tasks: downstream tasks scored right after the loss (orchestrator/training/downstream.py)
        from orchestrator.training.downstream import Downstream

        self.downstream = Downstream(cfg) if cfg.eval.tasks else None
        self.last_downstream: dict[str, float] | None = None

    def due(self, step: int) -> bool:
        interval = self.cfg.eval.interval
        return bool(interval and step % interval == 0) or step == self.cfg.train.max_steps

    def maybe_run(self, step: int) -> float | None:
        return self.run(step) if self.due(step) else None

    def run(self, step: int) -> float:
        with eager():  # compiled graphs are for the training step (parallel/compile.py)
            self.last_loss = validate(
                self.fabric, self.model, self.cfg, self.documents, self.instruction
            )
            self.monitor.validation(step, self.last_loss)
            if self.downstream is not None:
                with gathered(self.model):  # many small forwards: FSDP2 gathers each unit once
                    self.last_downstream = self.downstream.score(self.model, self.fabric)
                self.monitor.downstream(step, self.last_downstream)
        return self.last_loss


@torch.no_grad()
def validate(
    fabric: Fabric,
    model: torch.nn.Module,
    cfg: Config,
    documents: DocumentBoundary | None = None,
    instruction: bool = False,
) -> float:
    """Mean next-token loss over (up to eval.max_batches of) the validation split, all ranks: over
    every target (the decoder), or the decoder's targets (the encoder-decoder, whose forward pass
    scores only those); eval.loss_from > 0 leaves out the targets before that position. With
    `documents` (data.document_mask) each document attends only to itself, as in training.
    `instruction` (instruction data): blocks are decoded as in training and the loss is the mean
    over the response targets of all batches (each batch's mean weighed by its count)."""
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
        vocab_size=cfg.model.vocab_size,
    )
    # (sum of losses, batches); instruction data: (sum of losses x counted targets, counted targets)
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    batches = 0
    for i, tokens in enumerate(loader):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        batches += 1
        tokens = tokens.long()  # (B, T+1), on the host
        # instruction data: decoded as in training (prompt targets IGNORE_INDEX)
        inputs, targets, count = model_batch(tokens, instruction)
        if cfg.eval.loss_from:  # e.g. only the positions an encoder-decoder's decoder predicts
            targets = targets.clone()
            targets[:, : cfg.eval.loss_from] = IGNORE_INDEX
            count = int((targets != IGNORE_INDEX).sum())
        # on the host, as in training
        packing = packing_arguments(
            cfg.model, inputs, targets, documents, instruction, fabric.device
        )
        inputs, targets = inputs.to(fabric.device), targets.to(fabric.device)  # (B, T) each
        # mean loss; every rank runs every batch's forward (sharded models gather in it)
        loss = model(inputs, targets=targets, **packing).double()
        if not instruction:
            totals[0] += loss
            totals[1] += 1
        elif count:  # a batch without a counted target adds nothing
            totals[0] += loss * count
            totals[1] += count
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    if instruction and batches and totals[1] == 0:
        raise ValueError(
            f"the validation split {cfg.data.val_split()} has no response token in the batches read "
            "(instruction data: every prompt is longer than the blocks read): add validation data or "
            "raise eval.max_batches / train.seq_len"
        )
    if totals[1] == 0:
        raise ValueError(
            f"the validation split {cfg.data.val_split()} yields no batch of "
            f"{cfg.train.micro_batch_size}x{cfg.seq_len + 1} tokens per process: add validation data or lower "
            "train.micro_batch_size / train.seq_len"
        )
    return float(totals[0] / totals[1])
