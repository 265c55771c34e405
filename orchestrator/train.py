"""Pretrain a Llama (or RedLLM encoder-decoder) model with Lightning Fabric.

    python orchestrator/train.py --config configs/quickstart.yaml --train.max_steps 100
    fabric run --accelerator=cpu --devices=2 orchestrator/train.py -- --config configs/quickstart.yaml
    orchestrator train --config configs/tinyllama-1.1b.yaml        (same thing)

`main()` checks the config and the inputs, `setup()` builds everything a run needs (processes,
model, optimizer, data, resume), and `fit()` is the training loop. The loop reads top to bottom:
each component decides its own timing (the checkpointer when to save, the validator when to
validate, the monitor when to log), and everything needed to resume is in `Run.state`, saved as
one checkpoint.
"""

from __future__ import annotations

import atexit
import gc
import json
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from lightning_fabric import Fabric

from data.documents import DocumentBoundary
from data.loader import source_samples
from models.build import build_model
from models.llama import count_parameters
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.layout import (
    checkpoint_root,
    initial_progress,
    latest_checkpoint,
    remove_partial,
    saved_config,
)
from orchestrator.checkpoint.manifest import read_manifest
from orchestrator.checkpoint.resume import (
    check_resume_strategy,
    is_branch,
    resume_step_hint,
)
from orchestrator.config import Config, load_config, save_config
from orchestrator.parallel.launch import (
    build_fabric,
    fail_fast,
    fix_host_allocator,
    launched_by_fabric_cli,
    on_rank_zero,
    threads_per_process,
)
from orchestrator.parallel.parallelize import parallelize
from orchestrator.parallel.slurm import StopSignals, finish_stop
from orchestrator.parallel.strategy import (
    describe_strategy,
    scheduler_optimizer,
)
from orchestrator.schema import ConfigError
from orchestrator.training.bookkeeping import sync_step
from orchestrator.training.data import (
    build_train_loader,
    data_formats,
    document_boundaries,
    elastic_resume_warning,
    endless,
    model_batch,
    packing_arguments,
    train_blocks,
)
from orchestrator.training.epochs import EpochTracker
from orchestrator.training.faults import install_fault_drills
from orchestrator.training.garbage import GarbageCollection
from orchestrator.training.guard import StepGuard
from orchestrator.training.monitor import (
    Monitor,
    batch_fingerprint,
    make_loggers,
    tensorboard_dir,
)
from orchestrator.training.preflight import check_inputs
from orchestrator.training.schedule import build_scheduler, follow_schedule
from orchestrator.training.validation import Validator


def main(argv: list[str] | None = None) -> int:
    fix_host_allocator()  # before the first large allocation of this process
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        check_inputs(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        if getattr(e, "exit_code", None) is None:
            raise
        print(f"error: {e}", file=sys.stderr)  # an expected failure with its own exit code
        return e.exit_code
    return summary.get("exit_code", 0)


def train(cfg: Config) -> dict:
    # SIGUSR1 from now on, SIGTERM once there is a training state to save: finish the step, save,
    # requeue under Slurm, exit (orchestrator/parallel/slurm.py). Until then SIGTERM ends the
    # process at once: one waiting in the rendezvous for a peer that is gone would otherwise sit
    # there until torchrun's agent, restarting the workers, SIGKILLs it (--shutdown-timeout, 30 s).
    stop_signals = StopSignals(signals=(signal.SIGUSR1,))
    run = setup(cfg, stop_signals)
    stop_signals.install(signal.SIGTERM)
    return fit(run)


@dataclass
class Run:
    """What `setup` builds and `fit` drives. `state` is everything a checkpoint holds."""

    cfg: Config
    fabric: Fabric
    state: dict
    checkpointer: Checkpointer
    validator: Validator
    monitor: Monitor
    guard: StepGuard
    epochs: EpochTracker
    stop_signals: StopSignals
    accumulation: int  # micro-batches per optimizer step and process
    tokens_per_step: int  # all processes
    documents: DocumentBoundary | None = None  # data.document_mask: where training documents start
    instruction: bool = False  # instruction data (prepare --format instruction): response-only loss

    @property
    def progress(self) -> dict:
        return self.state["progress"]


def setup(cfg: Config, stop_signals: StopSignals) -> Run:
    """Processes, model, optimizer, data and the training state, resumed when a checkpoint exists."""
    # Text or instruction data, and with data.document_mask (which instruction data requires) the
    # separator of the training and validation data: both from their prepare_stats.json.
    train_format, val_format = data_formats(cfg)
    train_docs, val_docs = document_boundaries(cfg) if cfg.data.document_mask else (None, None)
    fabric = build_fabric(cfg, loggers=make_loggers(cfg, resume_step=resume_step_hint(cfg)))
    if not launched_by_fabric_cli():
        fabric.launch()
    if fabric.device.type == "cpu":
        threads_per_process(fabric.world_size // max(1, cfg.strategy.num_nodes))
    accumulation = cfg.gradient_accumulation(fabric.world_size)
    on_rank_zero(fabric, lambda: prepare_run_dir(cfg))
    fabric.barrier()

    fabric.seed_everything(cfg.run.seed)
    # FSDP2 builds on the meta device and ZeRO-3 partitions as it builds: each rank materialises
    # only its shards in fabric.setup, with the weights an unsharded build has.
    with fabric.init_module():
        model = build_model(cfg.model)  # model.arch: Llama or the encoder-decoder
    # Activation checkpointing, compilation, then sharding: one order for every strategy.
    model, optimizer = parallelize(fabric, model, cfg)
    # DeepSpeed: the scheduler drives its inner torch optimizer.
    scheduler = build_scheduler(scheduler_optimizer(optimizer), cfg)
    train_loader = build_train_loader(cfg)
    epochs = EpochTracker(fabric, train_blocks(cfg))
    guard = StepGuard(cfg)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "train_loader": train_loader,
        "guard": guard,
        "epochs": epochs,
        "progress": initial_progress(),
    }
    checkpointer = Checkpointer(fabric, cfg)
    # Every rank verifies the checksums of the files it will read; rank 0 brings a newer
    # checkpoint from checkpoint.remote_dir into the (shared) run dir; all load the same one.
    resume_from, damaged = checkpointer.choose_resume(remote=True)
    for path, reason in damaged:
        fabric.print(
            f"Skipping damaged checkpoint {path}: {reason}; falling back to an older one",
            flush=True,
        )
    if resume_from is not None:
        check_resume_strategy(resume_from, cfg, fabric.world_size)
        warning = elastic_resume_warning(
            cfg,
            saved_config(resume_from),
            read_manifest(resume_from).get("world_size"),
            fabric.world_size,
            epochs.blocks,
        )
        if warning:
            fabric.print(f"warning: {warning}", flush=True)
        # The run's own checkpoint, or (checkpoint.branch_from, none of its own yet) another run's
        # full state; either way this run's schedule sets the lr from the next step on.
        checkpointer.load(resume_from, state)
        follow_schedule(scheduler, cfg.optimizer.lr)
        verb = "Branched" if is_branch(cfg, resume_from) else "Resumed"
        fabric.print(f"{verb} from {resume_from} at step {state['progress']['step']}", flush=True)
    elif cfg.checkpoint.init_from is not None:
        checkpointer.load_weights(Path(cfg.checkpoint.init_from), model)
        fabric.print(f"Initialised model weights from {cfg.checkpoint.init_from}", flush=True)
    install_fault_drills(model, cfg, state, accumulation)  # faults.*: empty in real runs

    tokens_per_step = cfg.train.micro_batch_size * cfg.seq_len * accumulation * fabric.world_size
    fabric.print(
        f"Model {cfg.model.name}: {count_parameters(model):,} parameters | {fabric.world_size} process(es) on "
        f"{fabric.device.type} | {describe_strategy(cfg)} | {accumulation} micro-batch(es) of "
        f"{cfg.train.micro_batch_size}x{cfg.seq_len} per process per step = {tokens_per_step:,} tokens/step",
        flush=True,
    )
    monitor = Monitor(fabric, cfg, start_step=state["progress"]["step"], guard=guard)
    return Run(
        cfg=cfg,
        fabric=fabric,
        state=state,
        checkpointer=checkpointer,
        validator=Validator(
            fabric, cfg, model, monitor, documents=val_docs, instruction=val_format == "instruction"
        ),
        monitor=monitor,
        guard=guard,
        epochs=epochs,
        stop_signals=stop_signals,
        accumulation=accumulation,
        tokens_per_step=tokens_per_step,
        documents=train_docs,
        instruction=train_format == "instruction",
    )


def fit(run: Run) -> dict:
    """The training loop: one optimizer step per iteration until train.max_steps."""
    cfg, fabric, state, monitor = run.cfg, run.fabric, run.state, run.monitor
    model, optimizer, train_loader = state["model"], state["optimizer"], state["train_loader"]
    if run.progress["step"] == 0 and cfg.eval.at_start:
        run.progress["initial_val_loss"] = run.validator.run(0)

    batches = endless(train_loader)
    model.train()
    # Python's collector off during the loop; every rank collects at the same steps instead.
    with GarbageCollection(cfg) as garbage:
        while run.progress["step"] < cfg.train.max_steps:
            step = run.progress["step"] + 1
            monitor.begin_step()  # step time, split into data wait and compute
            step_loss, grad_norm, hashes = forward_backward(run, batches)
            # One collective and one host sync for the step's bookkeeping (training/bookkeeping.py).
            totals = sync_step(fabric, step_loss, grad_norm, run.stop_signals, run.epochs)
            lr = optimizer.param_groups[0]["lr"]
            bad_reason = run.guard.judge(totals.loss, totals.grad_norm)
            if bad_reason is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["scheduler"].step()
            run.progress["step"] = step
            run.progress["tokens_seen"] += run.tokens_per_step

            monitor.train_step(
                step,
                totals.loss,
                lr,
                totals.grad_norm,
                run.progress["tokens_seen"],
                run.tokens_per_step,
                hashes if cfg.logging.batch_hashes != "off" else None,
            )
            monitor.data_sources(step, source_samples(train_loader), cfg.seq_len)
            for epoch, sequences in run.epochs.end_step(totals.epoch_counts):
                monitor.epoch_end(step, epoch, sequences, run.epochs.blocks)
            garbage.maybe_collect(step)  # train.gc_interval
            if run.guard.record(bad_reason, totals.loss):
                roll_back(run, step)
                if not cfg.guard.rollback_skip_data:
                    batches = endless(train_loader)  # re-read from the checkpoint's data position
                continue
            if bad_reason is not None:
                monitor.bad_step(step, bad_reason, run.guard.bad_steps)
            run.validator.maybe_run(step)
            monitor.sample_generations(step, model)  # every logging.sample_interval steps
            saved = run.checkpointer.maybe_save(state, step)
            if saved is not None:
                monitor.checkpoint(saved)
            run.checkpointer.log_uploads(monitor)  # checkpoint.remote_dir: finished uploads
            if totals.stop and step < cfg.train.max_steps:  # a stop signal reached some rank
                return stop_early(run, totals.stop, step, saved_this_step=saved is not None)
    return finish(run)


def forward_backward(run: Run, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Forward and backward over the step's micro-batches, then clip. Returns this rank's mean
    loss and the global gradient norm (before clipping), both still on the device, and the
    fingerprints of this rank's batches (computed on the host, before the copy).

    The step's micro-batches are read first. Instruction data (run.instruction): only response
    targets count (data/instructions.py), and each micro-batch's mean loss is weighed by its share
    of the step's counted targets on this rank, so the step's loss is this rank's mean over them."""
    cfg, fabric, model = run.cfg, run.fabric, run.state["model"]
    step_loss = torch.zeros((), device=fabric.device)
    hashes = []
    blocks = []
    for _ in range(run.accumulation):
        with run.monitor.waiting_for_data():
            new_epoch, tokens = next(batches)
        run.epochs.read(new_epoch, tokens.shape[0])
        tokens = tokens.long()  # (B, T+1), on the host, as stored (instruction data: loss flags)
        if cfg.logging.batch_hashes == "batch":
            hashes.append(f"{batch_fingerprint(tokens):016x}")
        elif cfg.logging.batch_hashes == "sequence":
            hashes.extend(
                f"{run.epochs.local_epoch}:{batch_fingerprint(seq):016x}" for seq in tokens
            )
        blocks.append(model_batch(tokens, True) if run.instruction else tokens)
    counted = sum(b[2] for b in blocks) if run.instruction else 0
    for micro_step, block in enumerate(blocks):
        if run.instruction:  # decoded on the host: (B, T) inputs and targets, counted targets
            host_inputs, host_targets, count = block
            inputs = host_inputs.to(fabric.device, non_blocking=True)
            targets = host_targets.to(fabric.device, non_blocking=True)
            weight = count / counted if counted else 0.0
        else:
            host_inputs, host_targets = block[:, :-1], block[:, 1:]
            tokens = block.to(fabric.device, non_blocking=True)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        # data.document_mask: each input position's document; the encoder-decoder on instruction
        # data: which positions its decoder reads. Found on the host.
        packing = packing_arguments(
            cfg.model, host_inputs, host_targets, run.documents, run.instruction, fabric.device
        )
        with fabric.no_backward_sync(model, enabled=micro_step < run.accumulation - 1):
            # mean next-token loss through model.loss_kernel (each document on its own with doc_ids)
            loss = model(inputs, targets=targets, **packing)
            loss = loss * weight if run.instruction else loss / run.accumulation
            fabric.backward(loss)
        step_loss += loss.detach()
        run.monitor.add_z_loss(model, run.accumulation)  # model.z_loss > 0: train/z_loss, no sync
    # logging.layer_grad_norms: per-block norms, before clipping
    run.monitor.layer_grad_norms(run.progress["step"] + 1, model)
    max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf")
    grad_norm = fabric.clip_gradients(
        model, run.state["optimizer"], max_norm=max_norm, error_if_nonfinite=False
    )
    return step_loss, torch.as_tensor(grad_norm), hashes


def roll_back(run: Run, step: int) -> None:
    """Too many bad steps in a row: reload the last good checkpoint instead of diverging further."""
    cfg, guard = run.cfg, run.guard
    guard.rollbacks += 1
    if guard.rollbacks > cfg.guard.max_rollbacks:
        raise RuntimeError(
            f"step {step}: {guard.consecutive_bad} bad steps in a row after {cfg.guard.max_rollbacks} rollbacks; "
            "stopping instead of diverging (lower optimizer.lr, check the data, or raise guard.max_rollbacks)"
        )
    run.checkpointer.wait()
    target, _ = run.checkpointer.choose_resume()
    if target is None:
        raise RuntimeError(
            f"step {step}: {guard.consecutive_bad} bad steps in a row and no checkpoint to roll back to"
        )
    counters = guard.state_dict()
    to_load = dict(run.state)
    if cfg.guard.rollback_skip_data:
        to_load.pop("train_loader")  # keep reading after the offending batches
    run.checkpointer.load(target, to_load)
    follow_schedule(run.state["scheduler"], cfg.optimizer.lr)  # a branch point's lr is not ours
    run.state["progress"] = to_load["progress"]
    # The counters describe the whole run, not the checkpoint's past.
    guard.load_state_dict(dict(counters, consecutive_bad=0, loss_mean=guard.loss_mean))
    run.monitor.rollback(step, target, guard.rollbacks)


def stop_early(run: Run, stop: int, step: int, saved_this_step: bool) -> dict:
    """A stop signal (Slurm preemption, SIGTERM) before the last step: save, requeue, exit."""
    if not saved_this_step:
        run.monitor.checkpoint(run.checkpointer.save(run.state, step, run.progress["tokens_seen"]))
    run.checkpointer.wait()
    upload_code = run.checkpointer.finish_uploads(run.monitor)  # waits for checkpoint.remote_dir
    run.monitor.close()
    summary = finish_stop(run.fabric, run.cfg, stop, step)
    summary["exit_code"] = summary["exit_code"] or upload_code
    return summary


def finish(run: Run) -> dict:
    """After the last step: finish background saves, close the logs, write summary.json."""
    cfg = run.cfg
    run.checkpointer.wait()
    for report in run.checkpointer.completed:
        if report.write_seconds is not None and cfg.checkpoint.async_save:
            run.monitor.checkpoint(report)
    upload_code = run.checkpointer.finish_uploads(run.monitor)  # waits for checkpoint.remote_dir
    run.monitor.close()
    summary = {
        "steps": run.progress["step"],
        "tokens_seen": run.progress["tokens_seen"],
        "initial_val_loss": run.progress.get("initial_val_loss"),
        "final_val_loss": run.validator.last_loss,
        "latest_checkpoint": str(latest_checkpoint(checkpoint_root(cfg))),
        "tensorboard": str(tensorboard_dir(Path(cfg.run.dir))),
        "exit_code": upload_code,  # EXIT_UPLOAD_FAILED: the newest checkpoint is not in the store
    }
    on_rank_zero(run.fabric, lambda: finish_run(cfg, summary))
    return summary


def prepare_run_dir(cfg: Config) -> None:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    for stale in remove_partial(checkpoint_root(cfg)):
        print(f"Removed incomplete checkpoint {stale} (an interrupted save)", flush=True)


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
