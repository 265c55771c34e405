"""Encoder-decoder vs decoder-only scaling (arXiv 2510.26622) at a scale a 2-core CPU trains.

    .venv/bin/python benchmarks/encdec_scaling.py                       # the study, fits, figure
    .venv/bin/python benchmarks/encdec_scaling.py --json out.json --parallel 2
    .venv/bin/python benchmarks/encdec_scaling.py --sizes micro-0.6m,micro-1m --tokens-per-param 2

The paper's claims about pretraining: DecLLM (decoder-only, causal LM) is more compute-optimal;
RedLLM (encoder-decoder, prefix LM) scales comparably (similar exponents); it reports fitted
exponents for loss against training FLOPs and against parameters for both families.

What this runs, with the project's own tools only:
  corpus   the built-in synthetic corpus (data/sample_corpus.py) at --train-docs documents, a
           1,024-piece tokenizer, prepared with `orchestrator prepare`'s code;
  ladder   the CPU ladder of models/config.py: decoder sizes --sizes (micro-0.6m .. micro-5m) and,
           for each, its redllm-* partner (within 5% of its parameter count; `orchestrator
           models`), all in one `orchestrator sweep --ladder` study: every run sees
           --tokens-per-param x its parameters tokens, the same data in the same order;
  objective blocks of 256 tokens: the decoder learns every next token; the encoder-decoder
           encodes the first 128 and learns the last 128 (prefix LM, the paper's half/half
           split); validation scores both on the same predictions, positions 128..255
           (eval.loss_from 128);
  recipe   AdamW at lr --lr (3e-3, the demo's), --warmup steps of linear warmup, cosine decay to
           lr/10; `--optimizer adafactor --lr 1e-2` is the paper's optimizer (decay 0.8), which
           trained to a higher loss in a 150-step trial at this scale (benchmarks/RESULTS.md);
           global batch --batch x 256 tokens; 1 process per run, --parallel runs at once;
  fits     `orchestrator report` of the study: per family, L(N) = E + A N^-alpha_N and
           L(C) = E + B C^-alpha_C with C the training FLOPs of models/flops.py (the
           encoder-decoder's token passes through one stack, so it costs about half of 6N per
           token), and one figure with both families.

Re-running resumes the study (finished runs are not redone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from data.sample_corpus import prepare_sample_tokens  # noqa: E402
from models.config import model_config, paired_size  # noqa: E402
from orchestrator.tools.report import write_report  # noqa: E402

SEQ_LEN = 256
ENCODER_LEN = SEQ_LEN // 2
PAPER = (
    "arXiv 2510.26622 (RedPajama V1, ~150M-8B): exponents 0.20 0.24 0.17 0.16 (OCR-damaged table)"
)


def base_config(args: argparse.Namespace, tokens: Path, tokenizer: Path) -> dict:
    optimizer = {"name": args.optimizer, "lr": args.lr, "min_lr": args.lr / 10, "grad_clip": 1.0}
    optimizer["weight_decay"] = 0.0 if args.optimizer == "adafactor" else 0.1
    return {
        "model": {"name": "micro-1m"},  # the ladder sets it per run
        "data": {"dir": str(tokens), "tokenizer": str(tokenizer)},
        "optimizer": optimizer,
        "schedule": {"warmup_steps": args.warmup, "decay": "cosine"},
        "train": {
            "micro_batch_size": args.batch,
            "global_batch_size": args.batch,
            "seq_len": SEQ_LEN,
            "log_interval": 20,
        },
        "eval": {"interval": 0, "max_batches": args.val_batches, "loss_from": ENCODER_LEN},
        "checkpoint": {"interval": 200, "keep_last": 1},
        "logging": {"tensorboard": False, "batch_hashes": "off"},
        "strategy": {"name": "single", "accelerator": "cpu", "devices": 1, "precision": "32-true"},
    }


def ladder(sizes: list[str]) -> list[str]:
    """The decoder sizes and their encoder-decoder partners, in that order."""
    partners = []
    for name in sizes:
        if model_config(name).arch != "decoder" or paired_size(name) is None:
            raise SystemExit(f"--sizes {name}: give decoder sizes that have a redllm-* partner")
        partners.append(paired_size(name))
    return [*sizes, *partners]


def run_study(args: argparse.Namespace, base: Path, study: Path) -> None:
    cmd = [sys.executable, "-m", "orchestrator", "sweep", "--config", str(base),
           "--study-dir", str(study), "--ladder", ",".join(ladder(args.sizes.split(","))),
           "--tokens-per-param", str(args.tokens_per_param),
           "--parallel", str(args.parallel)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads)), PYTHONPATH=str(REPO_ROOT))
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed with exit code {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/encdec-scaling")
    p.add_argument("--sizes", default="micro-0.6m,micro-1m,micro-1.5m,micro-2m,micro-5m")
    p.add_argument("--tokens-per-param", type=float, default=0.5)
    p.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (every run)")
    p.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens per step")
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--train-docs", type=int, default=30000)
    p.add_argument("--val-docs", type=int, default=600)
    p.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--json", default=None, help="write the fits and the settings here")
    args = p.parse_args(argv)
    import yaml

    started = time.time()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    tokens, tokenizer = prepare_sample_tokens(work, args.train_docs, args.val_docs)
    base = work / "base.yaml"
    base.write_text(yaml.safe_dump(base_config(args, tokens, tokenizer), sort_keys=False))
    study = work / "study"
    run_study(args, base, study)
    report = write_report(study)
    stats = json.loads((tokens / "prepare_stats.json").read_text())
    print(f"\ncorpus: {stats['tokens']:,} tokens ({args.train_docs:,} train documents); "
          f"took {time.time() - started:.0f} s; report: {study / 'report.md'}")  # fmt: skip
    for fit in report.get("scaling", []):
        print(json.dumps(fit, default=str)[:2000])
    print(f"paper: {PAPER}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "corpus_tokens": stats["tokens"],
            "runs": [{k: r.get(k) for k in ("name", "params", "max_steps", "status", "final_val_loss")}
                     for r in report["runs"]],
            "scaling": report.get("scaling"), "paper": PAPER,
            "seconds": time.time() - started, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg(),
        }, indent=1, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
