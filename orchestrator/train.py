"""Pretrain a Llama model with Lightning Fabric.

    python orchestrator/train.py --config configs/quickstart.yaml --train.max_steps 100
    fabric run --accelerator=cpu --devices=2 orchestrator/train.py -- --config configs/quickstart.yaml
    orchestrator train --config configs/tinyllama-1.1b.yaml        (same thing)

The loop reads top to bottom; checkpointing, evaluation and monitoring are calls into small
modules. Everything needed to resume is in `state` and saved as one checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from lightning.fabric import Fabric

from data.loader import (
    make_dataloader,
    make_mixture_loader,
    num_blocks,
    resolve_split,
    source_samples,
)
from models.kernels import compile_blocks
from models.llama import Llama, count_parameters
from orchestrator import checkpoint as ckpt
from orchestrator.config import Config, load_config, save_config
from orchestrator.distributed import (
    build_fabric,
    fail_fast,
    gather_object,
    launched_by_fabric_cli,
    on_rank_zero,
    threads_per_process,
)
from orchestrator.epochs import EpochTracker
from orchestrator.guard import StepGuard
from orchestrator.monitor import Monitor, batch_fingerprint, make_loggers, tensorboard_dir
from orchestrator.optim import build_optimizer
from orchestrator.preflight import check_inputs
from orchestrator.schedule import build_scheduler
from orchestrator.schema import ConfigError
from orchestrator.slurm import StopSignals, finish_stop
from orchestrator.strategies import (
    apply_activation_checkpointing,
    check_resume_strategy,
    scheduler_optimizer,
    wants_activation_checkpointing_outside,
)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        check_inputs(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import atexit
    import gc

    # At exit, skip the interpreter's last full garbage collection over the millions of objects that
    # torch & co. hold (~3 s per process, paid by every rank of every run).
    atexit.register(gc.freeze)
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one rank failing ends every rank, with a clear message
        fail_fast(e, cfg.strategy.timeout_s)  # returns only in a single-process run
        raise
    return summary.get("exit_code", 0)


def train(cfg: Config) -> dict:
    # SIGUSR1 / SIGTERM from now on: finish the step, save, requeue under Slurm, exit (orchestrator/slurm.py).
    stop_signals = StopSignals()
    fabric = build_fabric(cfg, loggers=make_loggers(cfg, resume_step=ckpt.resume_step_hint(cfg)))
    if not launched_by_fabric_cli():
        fabric.launch()
    if fabric.device.type == "cpu":
        threads_per_process(fabric.world_size // max(1, cfg.strategy.num_nodes))
    accumulation = cfg.gradient_accumulation(fabric.world_size)
    run_dir = Path(cfg.run.dir)
    on_rank_zero(fabric, lambda: prepare_run_dir(cfg))
    fabric.barrier()

    fabric.seed_everything(cfg.run.seed)
    with fabric.init_module():
        model = Llama(cfg.model)
    if wants_activation_checkpointing_outside(cfg):  # FSDP applies it while sharding
        apply_activation_checkpointing(model, cfg.strategy.activation_checkpointing)
    if cfg.model.compile:  # torch.compile each block in place (names and hooks unchanged)
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = build_scheduler(
        scheduler_optimizer(optimizer), cfg
    )  # DeepSpeed: its inner torch optimizer
    if cfg.data.sources:  # weighted mixture of prepared datasets
        train_loader = make_mixture_loader(
            [(s.name, s.dir, s.weight) for s in cfg.data.sources],
            seq_len=cfg.seq_len,
            batch_size=cfg.train.micro_batch_size,
            shuffle=cfg.data.shuffle,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_workers,
        )
    else:
        train_loader = make_dataloader(
            Path(cfg.data.dir) / "train",
            seq_len=cfg.seq_len,
            batch_size=cfg.train.micro_batch_size,
            shuffle=cfg.data.shuffle,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_workers,
        )
    progress = {"step": 0, "tokens_seen": 0, "initial_val_loss": None}
    epochs = EpochTracker(
        fabric,
        sum(num_blocks(resolve_split(s.dir), cfg.seq_len) for s in cfg.data.sources)
        if cfg.data.sources
        else num_blocks(Path(cfg.data.dir) / "train", cfg.seq_len),
    )
    guard = StepGuard(cfg)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "train_loader": train_loader,
        "guard": guard,
        "epochs": epochs,
        "progress": progress,
    }
    checkpointer = ckpt.Checkpointer(fabric, cfg)
    # Rank 0 verifies the checkpoints (checksums) once; every rank loads the one it chose.
    resume_from, damaged = fabric.broadcast(on_rank_zero(fabric, lambda: ckpt.choose_resume(cfg)))
    for path, reason in damaged:
        fabric.print(
            f"Skipping damaged checkpoint {path}: {reason}; falling back to an older one",
            flush=True,
        )
    if resume_from is not None:
        check_resume_strategy(resume_from, cfg, fabric.world_size)
        checkpointer.load(resume_from, state)
        progress = state["progress"]
        fabric.print(f"Resumed from {resume_from} at step {progress['step']}", flush=True)
    elif cfg.checkpoint.init_from is not None:
        checkpointer.load_weights(Path(cfg.checkpoint.init_from), model)
        fabric.print(f"Initialised model weights from {cfg.checkpoint.init_from}", flush=True)

    tokens_per_step = cfg.train.micro_batch_size * cfg.seq_len * accumulation * fabric.world_size
    fabric.print(
        f"Model {cfg.model.name}: {count_parameters(model):,} parameters | {fabric.world_size} process(es) on "
        f"{fabric.device.type} | {cfg.strategy.precision} | {accumulation} micro-batch(es) of "
        f"{cfg.train.micro_batch_size}x{cfg.seq_len} per process per step = {tokens_per_step:,} tokens/step",
        flush=True,
    )
    monitor = Monitor(fabric, cfg, start_step=progress["step"], guard=guard)
    val_loss = None
    if progress["step"] == 0 and cfg.eval.at_start:
        val_loss = validate(fabric, model, cfg)
        progress["initial_val_loss"] = val_loss
        monitor.validation(0, val_loss)

    batches = endless(train_loader)
    faults_fired: set[int] = set()
    model.train()
    while progress["step"] < cfg.train.max_steps:
        step = progress["step"] + 1
        monitor.begin_step()  # step time, split into data wait and compute
        step_loss = torch.zeros((), device=fabric.device)
        hashes = []
        for micro_step in range(accumulation):
            with monitor.waiting_for_data():
                new_epoch, tokens = next(batches)
            epochs.read(new_epoch, tokens.shape[0])
            tokens = tokens.to(fabric.device, non_blocking=True).long()  # (B, T+1)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
            if cfg.logging.batch_hashes == "batch":
                hashes.append(f"{batch_fingerprint(tokens):016x}")
            elif cfg.logging.batch_hashes == "sequence":
                hashes.extend(
                    f"{epochs.local_epoch}:{batch_fingerprint(seq):016x}" for seq in tokens
                )
            with fabric.no_backward_sync(model, enabled=micro_step < accumulation - 1):
                loss = model(
                    inputs, targets=targets
                )  # mean next-token loss through model.loss_kernel
                if step in cfg.faults.nan_loss_at_steps and step not in faults_fired:
                    loss = loss * float(
                        "nan"
                    )  # a transient fault: once per step number per process
                fabric.backward(loss / accumulation)
            step_loss += loss.detach() / accumulation
        if step in cfg.faults.nan_loss_at_steps:
            faults_fired.add(step)
        monitor.layer_grad_norms(
            step, model
        )  # logging.layer_grad_norms: per-block norms, before clipping
        max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf")
        grad_norm = float(
            fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        )
        mean_loss = fabric.all_reduce(step_loss, reduce_op="mean").item()
        lr = optimizer.param_groups[0]["lr"]
        bad_reason = guard.judge(mean_loss, grad_norm)
        if bad_reason is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress["step"] = step
        progress["tokens_seen"] += tokens_per_step

        all_hashes = [h for rank in gather_object(fabric, hashes) for h in rank] if hashes else None
        monitor.train_step(
            step, mean_loss, lr, grad_norm, progress["tokens_seen"], tokens_per_step, all_hashes
        )
        monitor.data_sources(step, source_samples(train_loader), cfg.seq_len)
        for epoch, sequences in epochs.end_step():
            monitor.epoch_end(step, epoch, sequences, epochs.blocks)
        if guard.record(bad_reason, mean_loss):
            progress = roll_back(fabric, cfg, checkpointer, state, guard, monitor, step)
            if not cfg.guard.rollback_skip_data:
                batches = endless(train_loader)  # re-read from the checkpoint's data position
            continue
        if bad_reason is not None:
            monitor.bad_step(step, bad_reason, guard.bad_steps)
        last = step == cfg.train.max_steps
        if (cfg.eval.interval and step % cfg.eval.interval == 0) or last:
            val_loss = validate(fabric, model, cfg)
            monitor.validation(step, val_loss)
        monitor.sample_generations(step, model)  # every logging.sample_interval steps
        saved = (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last
        if saved:
            monitor.checkpoint(checkpointer.save(state, step, progress["tokens_seen"]))
        stop = stop_signals.agreed(fabric)
        if stop and not last:
            if not saved:
                monitor.checkpoint(checkpointer.save(state, step, progress["tokens_seen"]))
            checkpointer.wait()
            monitor.close()
            return finish_stop(fabric, cfg, stop, step)

    checkpointer.wait()
    for report in checkpointer.completed:
        if report.write_seconds is not None and cfg.checkpoint.async_save:
            monitor.checkpoint(report)
    monitor.close()
    summary = {
        "steps": progress["step"],
        "tokens_seen": progress["tokens_seen"],
        "initial_val_loss": progress.get("initial_val_loss"),
        "final_val_loss": val_loss,
        "latest_checkpoint": str(ckpt.latest_checkpoint(ckpt.checkpoint_root(cfg))),
        "tensorboard": str(tensorboard_dir(run_dir)),
    }
    on_rank_zero(fabric, lambda: finish_run(cfg, summary))
    return summary


def roll_back(
    fabric: Fabric,
    cfg: Config,
    checkpointer: ckpt.Checkpointer,
    state: dict,
    guard: StepGuard,
    monitor: Monitor,
    step: int,
) -> dict:
    """Too many bad steps in a row: reload the last good checkpoint instead of diverging further."""
    guard.rollbacks += 1
    if guard.rollbacks > cfg.guard.max_rollbacks:
        raise RuntimeError(
            f"step {step}: {guard.consecutive_bad} bad steps in a row after {cfg.guard.max_rollbacks} rollbacks; "
            "stopping instead of diverging (lower optimizer.lr, check the data, or raise guard.max_rollbacks)"
        )
    checkpointer.wait()
    target, _ = fabric.broadcast(on_rank_zero(fabric, lambda: ckpt.choose_resume(cfg)))
    if target is None:
        raise RuntimeError(
            f"step {step}: {guard.consecutive_bad} bad steps in a row and no checkpoint to roll back to"
        )
    counters = guard.state_dict()
    to_load = dict(state)
    if cfg.guard.rollback_skip_data:
        to_load.pop("train_loader")  # keep reading after the offending batches
    checkpointer.load(target, to_load)
    state["progress"] = to_load["progress"]
    # The counters describe the whole run, not the checkpoint's past.
    guard.load_state_dict(dict(counters, consecutive_bad=0, loss_mean=guard.loss_mean))
    monitor.rollback(step, target, guard.rollbacks)
    return state["progress"]


def prepare_run_dir(cfg: Config) -> None:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    for stale in ckpt.remove_partial(ckpt.checkpoint_root(cfg)):
        print(f"Removed incomplete checkpoint {stale} (an interrupted save)", flush=True)


def endless(loader) -> Iterator[tuple[bool, torch.Tensor]]:
    """(first batch of a new epoch?, batch) across epochs; the loader's state records the position."""
    finished_epoch = False
    while True:
        yielded = False
        for batch in loader:
            yield finished_epoch, batch
            yielded, finished_epoch = True, False
        if not yielded:
            raise ValueError(
                "the training split yields no batch: it is smaller than one micro-batch per process"
            )
        finished_epoch = True


@torch.no_grad()
def validate(fabric: Fabric, model: torch.nn.Module, cfg: Config) -> float:
    """Mean next-token loss over (up to eval.max_batches of) the validation split, all ranks."""
    model.eval()
    loader = make_dataloader(
        resolve_split(cfg.data.val_split(), "val"),
        seq_len=cfg.seq_len,
        batch_size=cfg.train.micro_batch_size,
        shuffle=False,
        seed=cfg.run.seed,
        num_workers=0,
    )
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # (sum of losses, batches)
    for i, tokens in enumerate(loader):
        if cfg.eval.max_batches and i >= cfg.eval.max_batches:
            break
        tokens = tokens.to(fabric.device).long()  # (B, T+1)
        totals[0] += model(tokens[:, :-1], targets=tokens[:, 1:]).double()  # mean next-token loss
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


def finish_run(cfg: Config, summary: dict) -> None:
    run_dir = Path(cfg.run.dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    initial = summary["initial_val_loss"]
    final = summary["final_val_loss"]
    print("", flush=True)
    print(f"Run finished: {summary['steps']} steps, {summary['tokens_seen']:,} tokens.")
    if initial is not None and final is not None:
        print(f"Validation loss: {initial:.4f} at step 0 -> {final:.4f} at step {summary['steps']}")
    print(f"Run directory:  {run_dir}  (config.yaml, metrics.jsonl, summary.json)")
    print(f"Checkpoint:     {summary['latest_checkpoint']}  (rerun the same command to resume)")
    print(f"TensorBoard:    tensorboard --logdir {summary['tensorboard']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
