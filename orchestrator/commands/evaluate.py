"""`orchestrator evaluate`: validation perplexity of a checkpoint, or lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from orchestrator.commands import error
from orchestrator.commands.options import add_checkpoint, add_device, add_dtype, add_json, pick


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="validation perplexity of a checkpoint; lm-evaluation-harness tasks (local data)",
    )
    add_checkpoint(p)
    p.add_argument(
        "--data",
        default=None,
        help="prepared dataset (prepare output or split dir); default: the run's validation split",
    )
    p.add_argument("--split", default="val", help="split of --data to read (default val)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-batches", type=int, default=0, help="stop after this many batches (0 = whole split)"
    )
    add_device(p)
    add_dtype(p)
    p.add_argument(
        "--hf-dir",
        default=None,
        help="harness: an `orchestrator export` output (else --checkpoint is "
        "exported to a temporary directory)",
    )
    p.add_argument("--tasks", default=None, help="harness: comma-separated task names")
    p.add_argument(
        "--include-path", default=None, help="harness: directory of task YAML files (local tasks)"
    )
    p.add_argument(
        "--local-task",
        action="append",
        default=None,
        metavar="FILE.jsonl",
        help="harness: make a task of this local JSON-lines file (named after it; may repeat)",
    )
    p.add_argument(
        "--local-task-kind",
        default="perplexity",
        choices=["perplexity", "multiple_choice", "exact_match"],
        help="perplexity: lines {text}; multiple_choice: lines {context, choices, label}; "
        "exact_match: instruction records ({input, target}, alpaca, chat), greedy answers",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="exact_match: most tokens generated per answer (the answer ends at EOS or a newline)",
    )
    p.add_argument(
        "--limit", type=float, default=None, help="harness: documents per task (or a fraction)"
    )
    p.add_argument(
        "--model-args",
        default="",
        help="harness: more key=value,... for its hf model, e.g. "
        "add_bos_token=False for perplexity tasks (docs/evaluation.md)",
    )
    p.add_argument(
        "--write-sample-tasks",
        metavar="DIR",
        default=None,
        help="write two tiny local harness tasks about the sample corpus into DIR",
    )
    add_json(p, "also write the results to this JSON file")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.devices import pick_device
    from orchestrator.tools import evaluate as ev

    if args.write_sample_tasks:
        names = ev.write_sample_tasks(args.write_sample_tasks)
        print(
            f"Local harness tasks {', '.join(names)} written to {args.write_sample_tasks}; run them with "
            f"`orchestrator evaluate --hf-dir HF_DIR --tasks {','.join(names)} "
            f"--include-path {args.write_sample_tasks}`"
        )
        if not (args.tasks or args.checkpoint or args.hf_dir):
            return 0
    harness = bool(args.tasks or args.local_task)
    if args.hf_dir and not harness:
        return error(
            "--hf-dir is for harness tasks: add --tasks NAME (with --include-path) or --local-task FILE"
        )
    if not harness:
        if not args.checkpoint:
            return error(
                "give --checkpoint CKPT_OR_RUN_DIR (validation perplexity), or --hf-dir / --checkpoint with "
                "--tasks (lm-evaluation-harness)"
            )
        result = ev.evaluate_checkpoint(
            args.checkpoint,
            **pick(
                args, "data", "split", "batch_size", "seq_len", "max_batches", "device", "dtype"
            ),
        )
        print(
            f"{result['checkpoint']} (step {result['step']}) on {result['data']}: loss {result['loss']:.4f} | "
            f"perplexity {result['perplexity']:.3f} | {result['bits_per_token']:.4f} bits/token | "
            f"{result['tokens']:,} tokens in {result['sequences']:,} sequences of {result['seq_len']} "
            f"({result['seconds']:.1f}s)"
        )
    else:
        ev.go_offline()  # before anything imports the hub / datasets libraries
        tasks = [t for t in (args.tasks or "").split(",") if t]
        include = args.include_path
        if args.local_task:
            include = include or tempfile.mkdtemp(prefix="orchestrator-tasks-")
            for path in args.local_task:
                name = Path(path).stem.replace("-", "_").replace(".", "_")
                ev.write_local_task(
                    include, name, path, args.local_task_kind, max_new_tokens=args.max_new_tokens
                )
                tasks.append(name)
        if args.hf_dir:
            hf_dir = Path(args.hf_dir)
        elif args.checkpoint:
            hf_dir = ev.export_for_harness(args.checkpoint)
        else:
            return error(
                "harness tasks need --hf-dir (an `orchestrator export` output) or --checkpoint"
            )
        results = ev.run_lm_eval(
            hf_dir,
            tasks,
            include_path=include,
            device=str(pick_device(args.device)),
            batch_size=args.batch_size,
            limit=args.limit,
            dtype="float32" if args.dtype == "auto" else args.dtype,
            model_args=args.model_args,
        )
        print(ev.format_harness_results(results))
        result = {"model": str(hf_dir), "tasks": tasks, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"Results written to {args.json}")
    return 0
