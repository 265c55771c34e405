"""The gated-attention stability table (arXiv 2505.06708, Table 2) at a scale a 2-core CPU trains.

    .venv/bin/python benchmarks/gated_attention.py                 # the study, then the table
    .venv/bin/python benchmarks/gated_attention.py --json out.json --parallel 2
    .venv/bin/python benchmarks/gated_attention.py --lrs 3e-3,3e-2 --steps 40   # a quick look

The paper's claim: a sigmoid gate after attention (headwise: one gate per head; elementwise: one
per channel) lowers perplexity and keeps training stable at learning rates where the baseline
diverges; sandwich norm is the other stabiliser it compares with; every method has the
baseline's parameter count (the FFN of a gated model is narrowed).

What this runs, with the project's own tools only:
  corpus     the built-in synthetic corpus (data/sample_corpus.py) at --train-docs documents,
             a 1,024-piece tokenizer, prepared with `orchestrator prepare`'s code;
  model      --d-model / --layers / --heads (default 192 / 4 / 4: ~2M parameters), seq 128,
             global batch 16, AdamW, cosine schedule to lr/10 over --steps, 1 process per run;
  studies    two `orchestrator sweep` studies with `--match-params` (ffn_hidden narrowed to the
             baseline's parameter count, within 0.5%): model.attn_gate=none,headwise,elementwise
             x optimizer.lr, and model.sandwich_norm=false,true x optimizer.lr (its baseline runs
             repeat the first study's, bitwise, which checks the determinism of the comparison);
  divergence the guard ends a diverging run quickly: a loss over 2x its running mean (after 5
             steps) or a non-finite one is a bad step, 3 in a row roll back to the last checkpoint
             (every 20 steps; before the first one the run ends at once), the 3rd rollback ends the
             run as `diverged`;
  report     `orchestrator report` of each study, and here the paper's table: per method the
             largest learning rate that trained, and the final validation perplexity at each
             learning rate (at the largest that every method trained, the common ground).

Re-running resumes the studies (finished and diverged runs are not redone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from data.sample_corpus import prepare_sample_tokens  # noqa: E402
from orchestrator.tools.report import write_report  # noqa: E402

METHODS = [
    # (label in the table, study, its grid value)
    ("baseline", "gates", "none"),
    ("sandwich norm", "sandwich", "true"),
    ("headwise gate", "gates", "headwise"),
    ("elementwise gate", "gates", "elementwise"),
]
STUDIES = {
    "gates": "model.attn_gate=none,headwise,elementwise",
    "sandwich": "model.sandwich_norm=false,true",
}
VARIANT_KEY = {"gates": "model.attn_gate", "sandwich": "model.sandwich_norm"}


def base_config(args: argparse.Namespace, tokens: Path, tokenizer: Path) -> dict:
    return {
        "model": {
            "name": "tiny",
            "d_model": args.d_model,
            "n_layers": args.layers,
            "n_heads": args.heads,
            "n_kv_heads": args.heads,
            "ffn_hidden": args.ffn_hidden,
            "vocab_size": 1024,
            "max_seq_len": 128,
        },
        "data": {"dir": str(tokens), "tokenizer": str(tokenizer)},
        "optimizer": {"min_lr": 1e-5, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"warmup_steps": max(1, args.steps // 20), "decay": "cosine"},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": 16,
            "global_batch_size": 16,
            "seq_len": 128,
            "log_interval": 10,
        },  # fmt: skip
        "eval": {"interval": max(1, args.steps // 5), "max_batches": 20},
        "checkpoint": {"interval": 20, "keep_last": 1},
        "guard": {"spike_factor": 2.0, "spike_warmup": 5, "rollback_after": 3, "max_rollbacks": 2},
        "logging": {"tensorboard": False, "batch_hashes": "off"},
        "strategy": {"name": "single", "accelerator": "cpu", "devices": 1, "precision": "32-true"},
    }


def run_study(name: str, args: argparse.Namespace, base: Path, work: Path) -> Path:
    study = work / f"study-{name}"
    cmd = [sys.executable, "-m", "orchestrator", "sweep", "--config", str(base),
           "--study-dir", str(study), "--grid", f"optimizer.lr={args.lrs}", "--grid", STUDIES[name],
           "--match-params", "--parallel", str(args.parallel)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads)), PYTHONPATH=str(REPO_ROOT))
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if done.returncode not in (0, 1):  # 1: some run neither finished nor diverged (reported)
        raise SystemExit(f"sweep {name} failed with exit code {done.returncode}")
    return study


def paper_table(reports: dict[str, dict], lrs: list[float]) -> dict:
    rows = []
    for label, study, value in METHODS:
        runs = [r for r in reports[study]["runs"] if r["overrides"][VARIANT_KEY[study]] == value]
        by_lr = {float(r["overrides"]["optimizer.lr"]): r for r in runs}
        trained = [lr for lr, r in by_lr.items() if r["status"] == "finished" and not r["diverged"]]
        rows.append({
            "method": label,
            "params": runs[0]["params"] if runs else None,
            "ffn_hidden": runs[0].get("ffn_hidden") if runs else None,
            "max_lr_trained": max(trained) if trained else None,
            "diverged_lrs": sorted(lr for lr, r in by_lr.items() if r["diverged"]),
            "ppl_by_lr": {lr: (None if by_lr[lr]["diverged"] else by_lr[lr]["final_val_perplexity"])
                          for lr in sorted(by_lr)},
            "status_by_lr": {lr: by_lr[lr]["status"] for lr in sorted(by_lr)},
        })  # fmt: skip
    common = [lr for lr in lrs if all(r["ppl_by_lr"].get(lr) is not None for r in rows)]
    return {"rows": rows, "common_lr": max(common) if common else None}


def markdown(table: dict, lrs: list[float]) -> str:
    head = "| method | parameters (ffn_hidden) | max lr that trained | " + " | ".join(
        f"val ppl @ lr {lr:g}" for lr in lrs
    )
    lines = [head + " |", "|---|---|---|" + "---|" * len(lrs)]
    for r in table["rows"]:
        cells = []
        for lr in lrs:
            ppl = r["ppl_by_lr"].get(lr)
            status = r["status_by_lr"].get(lr)
            cells.append("diverged" if lr in r["diverged_lrs"] else
                         (f"{ppl:.3f}" if ppl is not None and math.isfinite(ppl) else str(status)))  # fmt: skip
        best = f"{r['max_lr_trained']:g}" if r["max_lr_trained"] is not None else "none"
        lines.append(f"| {r['method']} | {r['params']:,} ({r['ffn_hidden']}) | {best} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/gated-attention")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2,1e-1,3e-1")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=512)
    p.add_argument("--train-docs", type=int, default=30000)
    p.add_argument("--val-docs", type=int, default=600)
    p.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--json", default=None, help="write the table and the settings here")
    args = p.parse_args(argv)
    import yaml

    started = time.time()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    tokens, tokenizer = prepare_sample_tokens(work, args.train_docs, args.val_docs)
    base = work / "base.yaml"
    base.write_text(yaml.safe_dump(base_config(args, tokens, tokenizer), sort_keys=False))
    reports = {}
    for name in STUDIES:
        study = run_study(name, args, base, work)
        reports[name] = write_report(study)
    lrs = [float(x) for x in args.lrs.split(",")]
    table = paper_table(reports, lrs)
    text = markdown(table, lrs)
    stats = json.loads((tokens / "prepare_stats.json").read_text())
    print(f"\ncorpus: {stats['tokens']:,} tokens ({args.train_docs:,} train documents); "
          f"{args.steps} steps x 2,048 tokens; took {time.time() - started:.0f} s\n")  # fmt: skip
    print(text)
    if table["common_lr"] is not None:
        print(f"\nlargest learning rate every method trained at: {table['common_lr']:g}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "corpus_tokens": stats["tokens"], "table": table,
            "seconds": time.time() - started, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg(),
        }, indent=1, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
