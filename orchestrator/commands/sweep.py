"""`orchestrator sweep`: a study (a grid and/or a ladder of sizes of training runs) as one command."""

from __future__ import annotations

import argparse

from orchestrator.commands.options import pick


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a study as one command: a grid (and/or a ladder of sizes) of training runs, run "
        "locally or as a Slurm job array; rerun to resume (args: --section.key value overrides for every run)",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config", action="append", metavar="FILE", help="base config of every run (may repeat)"
    )
    p.add_argument(
        "--study-dir", required=True, help="the study: study.json and one run dir per run"
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a config key and its values (repeatable: the runs are the cartesian product)",
    )
    p.add_argument(
        "--ladder",
        default=None,
        metavar="SIZE1,SIZE2,...",
        help="named model sizes (`orchestrator models`): model.name per run, train.max_steps from "
        "--tokens-per-param",
    )
    p.add_argument(
        "--tokens-per-param",
        type=float,
        default=None,
        help="ladder: tokens = this x parameters (Chinchilla: 20)",
    )
    p.add_argument(
        "--match-params",
        action="store_true",
        help="narrow model.ffn_hidden of each run whose model differs from the baseline (the first "
        "value of every grid key) to the baseline's parameter count (within 0.5%%)",
    )
    p.add_argument(
        "--ffn-multiple",
        type=int,
        default=1,
        help="--match-params: ffn_hidden is a multiple of this",
    )
    p.add_argument("--executor", default="local", choices=["local", "slurm"])
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="local: runs at once (each on its own GPUs; default 1); slurm: array tasks at once "
        "(default: no limit)",
    )
    p.add_argument(
        "--slurm-args",
        default="",
        help='slurm: extra sbatch flags, after the defaults; write it with "=": '
        '--slurm-args="--partition=gpu --time=4:00:00"',
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="slurm: wait until every task has ended, then record the outcomes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every run and write study.json; start nothing",
    )
    p.set_defaults(fn=run, takes_rest=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    # imported on use: the sweep's checks load the data stack (seconds)
    from orchestrator.tools.sweep import sweep

    executor_parallel = args.parallel
    if executor_parallel is None:  # local: one at a time; slurm: no limit on running tasks
        executor_parallel = 1 if args.executor == "local" else 0
    return sweep(
        args.study_dir,
        configs=args.config or [],
        overrides=rest,
        grid=args.grid or [],
        parallel=executor_parallel,
        **pick(args, "ladder", "tokens_per_param", "executor", "slurm_args", "match_params"),
        **pick(args, "ffn_multiple", "dry_run", "wait"),
    )
