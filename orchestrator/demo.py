"""The demo (`orchestrator demo`, `make demo`): the built-in sample corpus, its tokenizer and token
chunks, the quickstart model pretrained on them by 2 CPU processes, and with `--finetune` that model
finetuned on the built-in question set, with exact-match accuracy before and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.resources import as_file, files
from pathlib import Path

from data.prepare import PrepareOptions, is_prepared, prepare_dataset
from data.sample_corpus import write_sample_corpus
from data.tokenizer import train_tokenizer
from orchestrator.checkpoint.layout import checkpoint_step, resolve_checkpoint
from orchestrator.commands.prepare import print_prepare_stats

# Package data (read through importlib.resources: works from an installed package, no checkout).
# The demo config; configs/quickstart.yaml is a link to it (tests/orchestrator/test_cli.py checks).
QUICKSTART_CONFIG = files("orchestrator") / "resources" / "quickstart.yaml"

# The demo's model per family (overrides of the quickstart config) and its default run dirs: the
# quickstart decoder, or its RedLLM partner (a size with the decoder's width, heads and about its
# parameter count; models/config.py REDLLM_PAIRS).
DEMO_MODELS = {
    "llama": ([], "runs/demo"),
    "encoder_decoder": (["--model.name", "redllm-tiny"], "runs/demo-redllm"),
}

# The finetune demo's schedule (overrides of the quickstart config): short (the held-out loss is
# lowest within ~20-60 steps; longer memorises the train questions: 150 steps at lr 1e-3 held out
# 4%, 60 steps at 3e-4 12%), lr 10x below pretraining's 3e-3, blocks of 64 tokens (an example is
# ~20), response-only loss on instruction data.
FINETUNE_OVERRIDES = [
    "--data.document_mask", "true",
    "--train.max_steps", "60", "--train.seq_len", "64",
    "--optimizer.lr", "3.0e-4", "--optimizer.min_lr", "3.0e-5",
    "--schedule.warmup_steps", "5", "--schedule.decay", "cosine",
    "--eval.interval", "20", "--eval.max_batches", "4",
    "--checkpoint.interval", "60", "--checkpoint.keep_last", "1",
]  # fmt: skip


DEMO_ANSWER_TOKENS = 8  # generated per held-out question (the answers are 1-4 tokens)
# The finetune demo's pretraining: `make demo`'s 300 steps leave a model that ranks few of the
# corpus's facts first (measured: 3/24 capitals), so finetuning can teach it the answer format
# but not the answers; at 900 steps it knows most (22/24 capitals) and answers them.
FINETUNE_PRETRAIN_STEPS = 900


def prepare_sample(out: Path) -> tuple[Path, Path]:
    """The built-in sample corpus, its tokenizer and token chunks under `out` (idempotent)."""
    raw, tokenizer, tokens = out / "raw", out / "tokenizer.model", out / "tokens"
    if is_prepared(tokens) and tokenizer.is_file():
        print(f"Sample data already prepared in {out}")
        return tokens, tokenizer
    start = time.perf_counter()
    write_sample_corpus(raw)
    if not tokenizer.is_file():
        train_tokenizer(raw / "train", out / "tokenizer", vocab_size=1024)
    stats = prepare_dataset(PrepareOptions(raw, tokens, tokenizer, num_workers=1))
    print_prepare_stats(stats, tokens)
    print(f"Sample data ready in {time.perf_counter() - start:.1f}s")
    return tokens, tokenizer


def train_quickstart(overrides: list[str]) -> int:
    """`orchestrator train --config <the quickstart config> OVERRIDES` in a child process."""
    with as_file(QUICKSTART_CONFIG) as config:  # a real file even from a zipped install
        command = [sys.executable, "-m", "orchestrator", "train", "--config", str(config)]
        command += overrides
        print("Running:", " ".join(command), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(command, env=env)


def run_demo(
    *,
    data_dir: str | Path,
    arch: str = "llama",
    run_dir: str | None = None,
    finetune: bool = False,
    finetune_dir: str | None = None,
    pretrain_steps: int = FINETUNE_PRETRAIN_STEPS,
    overrides: Sequence[str] = (),
) -> int:
    """`orchestrator demo`: sample data, then the `arch` family's demo model pretrained in `run_dir`
    (default: the family's); with `finetune`, finetune_demo instead. `overrides` (`--section.key
    value ...`) go last to the training runs."""
    model, default_dir = DEMO_MODELS[arch]
    run_dir = run_dir or default_dir
    tokens, tokenizer = prepare_sample(Path(data_dir))
    if finetune:
        return finetune_demo(
            tokens, tokenizer, model, data_dir=data_dir, run_dir=run_dir,
            finetune_dir=finetune_dir or f"{run_dir}-finetune", pretrain_steps=pretrain_steps,
            overrides=overrides,
        )  # fmt: skip
    data = ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]
    return train_quickstart([*data, *model, "--run.dir", run_dir, *overrides])


def finetune_demo(
    tokens: Path,
    tokenizer: Path,
    model: list[str],
    *,
    data_dir: str | Path,
    run_dir: str,
    finetune_dir: str,
    pretrain_steps: int,
    overrides: Sequence[str] = (),
) -> int:
    """`orchestrator demo --finetune`: the pretrained demo model (pretrained first to
    `pretrain_steps` when its run dir has fewer; `model`: the family's overrides) finetuned on the
    built-in question set (data/sample_instructions.py) in `finetune_dir`, with exact-match
    accuracy on the held-out questions before and after. The encoder-decoder reads each question
    with its encoder and answers with its decoder."""
    from data.sample_instructions import write_sample_instructions
    from orchestrator.tools.evaluate import exact_match  # torch (seconds)

    start = time.perf_counter()
    try:
        done = checkpoint_step(resolve_checkpoint(run_dir))
    except FileNotFoundError:
        done = 0
    if done < pretrain_steps:  # a new run, or the demo run resumed with more steps
        print(
            f"Pretraining the demo model in {run_dir} to step {pretrain_steps} first "
            f"(now at step {done}; --pretrain-steps {done} finetunes it as it is)",
            flush=True,
        )
        data = ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]
        steps = ["--train.max_steps", str(pretrain_steps)]
        code = train_quickstart([*data, *model, "--run.dir", run_dir, *steps])
        if code != 0:
            return code
    pretrained = resolve_checkpoint(run_dir)
    root = Path(data_dir) / "instructions"
    _, heldout = write_sample_instructions(root / "raw")
    instr_tokens = root / "tokens"
    stats = prepare_dataset(
        PrepareOptions(root / "raw", instr_tokens, tokenizer, num_workers=1, format="instruction")
    )
    print_prepare_stats(stats, instr_tokens)

    def accuracy(checkpoint: Path, label: str) -> dict:
        result = exact_match(
            checkpoint, heldout, tokenizer=tokenizer, max_new_tokens=DEMO_ANSWER_TOKENS
        )
        print(
            f"{label}: exact match {result['correct']}/{result['total']} = "
            f"{result['accuracy']:.1%} on held-out questions ({checkpoint})",
            flush=True,
        )
        return result

    before = accuracy(pretrained, "pretrained")
    code = train_quickstart(
        [
            "--data.dir", str(instr_tokens), "--data.tokenizer", str(tokenizer),
            "--run.dir", finetune_dir, "--checkpoint.init_from", str(pretrained),
            # the held-out questions scored in the loop too (eval/heldout/exact_match)
            "--eval.tasks", json.dumps([str(Path(heldout).resolve())]),
            "--eval.max_new_tokens", str(DEMO_ANSWER_TOKENS),
            *model, *FINETUNE_OVERRIDES, *overrides,
        ]
    )  # fmt: skip
    if code != 0:
        return code
    after = accuracy(resolve_checkpoint(finetune_dir), "finetuned")
    print("Held-out questions (first 8): target | pretrained | finetuned")
    for b, a in list(zip(before["predictions"], after["predictions"]))[:8]:
        question = b["prompt"].removeprefix("Q: ").split("\n", 1)[0]
        print(f"  {question}  {b['target']!r} | {b['answer']!r} | {a['answer']!r}")
    print(
        f"Exact match on {after['total']} held-out questions: {before['accuracy']:.1%} before, "
        f"{after['accuracy']:.1%} after finetuning ({time.perf_counter() - start:.0f}s)"
    )
    return 0
