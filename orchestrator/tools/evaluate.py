"""Evaluate a trained model: validation perplexity of a checkpoint, and lm-evaluation-harness
tasks on an exported model with local data (nothing is downloaded).

    orchestrator evaluate --checkpoint runs/demo [--data .cache/sample/tokens] [--split val]
    orchestrator evaluate --write-sample-tasks evals/tasks          (two tiny local harness tasks)
    orchestrator evaluate --hf-dir hf/demo --tasks sample_capitals,sample_heldout --include-path evals/tasks
    orchestrator evaluate --checkpoint runs/demo --local-task docs.jsonl --local-task-kind perplexity

Perplexity: exp of the mean next-token cross-entropy over every token of the prepared split
(sequences of seq_len + 1 tokens, as in training; the last partial batch included), computed in
one process without Fabric.

Harness: `lm_eval.simple_evaluate` with the `hf` model (transformers' LlamaForCausalLM loading the
directory `orchestrator export` wrote, or a checkpoint exported on the fly into a temporary
directory) and tasks found under `--include-path`. A local task is a YAML file whose
`dataset_path: json` reads a local JSON-lines file (`dataset_kwargs.data_files`); the datasets
and hub libraries are put offline before they are imported, so a missing file is an error and
never a download. `write_local_task` writes such a task for a JSON-lines file:
  * kind `perplexity`: lines {"text": ...}; loglikelihood_rolling; word_perplexity,
    byte_perplexity, bits_per_byte (like the harness's wikitext task);
  * kind `multiple_choice`: lines {"context": ..., "choices": [...], "label": i}; acc, acc_norm.

BOS and the harness (lm-eval 0.4.13, checked in tests/orchestrator/tools/test_evaluate.py): the exported tokenizer
adds BOS, as Llama's does. Multiple-choice contexts then start with BOS, as every training
document does. Rolling-perplexity tasks, however, are scored after a doubled BOS, the second one
counted as a predicted token (the harness's issue #3333); with `add_bos_token=False` in the model
arguments they are scored exactly like `[BOS] document` (what `--checkpoint` perplexity does), but
multiple-choice contexts then lose their BOS. Run perplexity tasks with
`--model-args add_bos_token=False` and multiple-choice tasks without it.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.loader import make_dataloader, resolve_split
from data.sample_corpus import _world_cache, generate_document
from orchestrator.checkpoint.layout import MANIFEST_NAME, META_NAME, resolve_checkpoint
from orchestrator.devices import pick_device
from orchestrator.tools.hf import DTYPES, export_checkpoint, load_model

OFFLINE_ENV = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


# --------------------------------------------------------------------------------------------
# Validation perplexity of a checkpoint
# --------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Loss and perplexity of a checkpoint (or a run dir: its latest) on a prepared split.

    `data`: an `orchestrator prepare` output (its `split`/ is read) or a split dir; default: the
    validation split the run was configured with. `max_batches` 0 reads the whole split."""
    # imported on use: preflight loads the checkpointer, hence lightning (seconds)
    from orchestrator.training.preflight import check_datasets_match_tokenizer

    ckpt_dir = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    torch_dtype = (
        (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if dtype == "auto"
        else DTYPES[dtype]
    )
    model, cfg = load_model(ckpt_dir, device=dev, dtype=torch_dtype)
    source = str(data) if data is not None else cfg.data.val_split()
    split_dir = resolve_split(source, split)
    # The ids must come from the tokenizer the model was trained with.
    if Path(cfg.data.tokenizer).is_file():
        check_datasets_match_tokenizer(
            cfg, [("--data", source, split_dir)], Path(cfg.data.tokenizer)
        )
    T = seq_len or cfg.seq_len
    if not 0 < T <= cfg.model.max_seq_len:
        raise ValueError(
            f"--seq-len {T} must be in 1..{cfg.model.max_seq_len} (the model's context)"
        )
    loader = make_dataloader(
        split_dir, seq_len=T, batch_size=batch_size, shuffle=False, seed=0, drop_last=False
    )
    started = time.perf_counter()
    total_loss, tokens, sequences = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = batch.to(dev).long()  # (B, T+1)
            logits = model(batch[:, :-1])  # (B, T, V)
            total_loss += float(
                F.cross_entropy(
                    logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                )
            )
            tokens += batch[:, 1:].numel()
            sequences += batch.shape[0]
    if tokens == 0:
        raise ValueError(f"{split_dir} holds no sequence of {T + 1} tokens: lower --seq-len")
    loss = total_loss / tokens
    meta = {}
    for name in (MANIFEST_NAME, META_NAME):  # the trainer's manifest (older checkpoints: meta.json)
        if (ckpt_dir / name).is_file():
            meta = json.loads((ckpt_dir / name).read_text())
            break
    return {
        "checkpoint": str(ckpt_dir),
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "data": str(split_dir),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_token": loss / math.log(2),
        "tokens": tokens,
        "sequences": sequences,
        "seq_len": T,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness with local tasks
# --------------------------------------------------------------------------------------------


def write_local_task(
    out_dir: str | Path, name: str, data_file: str | Path, kind: str = "perplexity"
) -> Path:
    """A harness task `name` reading the local JSON-lines `data_file` (see the module docstring);
    returns the YAML path. Pass `out_dir` as the harness's include path."""
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(
            f"{data_file} does not exist: a local task needs its JSON-lines file"
        )
    first = json.loads(next(line for line in data_file.read_text().splitlines() if line.strip()))
    if kind == "perplexity":
        if not isinstance(first.get("text"), str):
            raise ValueError(f'{data_file}: a perplexity task needs lines like {{"text": ...}}')
        body = [
            "output_type: loglikelihood_rolling",
            'doc_to_text: ""',
            'doc_to_target: "{{text}}"',
            "metric_list:",
            "  - metric: word_perplexity",
            "  - metric: byte_perplexity",
            "  - metric: bits_per_byte",
        ]
    elif kind == "multiple_choice":
        if not ({"context", "choices", "label"} <= set(first)):
            raise ValueError(
                f"{data_file}: a multiple-choice task needs lines like "
                '{"context": ..., "choices": [...], "label": 0}'
            )
        body = [
            "output_type: multiple_choice",
            'doc_to_text: "{{context}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{label}}"',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
        ]
    else:
        raise ValueError(f"kind={kind!r}: use perplexity or multiple_choice")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"task: {name}",
        "dataset_path: json",  # the datasets library's local JSON loader: no hub, no download
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        *body,
        "metadata:",
        "  version: 1.0",
    ]
    path = out / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sample_tasks(out_dir: str | Path, seed: int = 0, heldout_docs: int = 16) -> list[str]:
    """Two tiny local tasks about the built-in sample corpus (data/sample_corpus.py), for trying
    the harness path end to end: `sample_capitals` (multiple choice: the capital of each country
    of the corpus's fixed world, against three other capitals) and `sample_heldout` (perplexity on
    fresh documents drawn like the corpus's). Returns the task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = _world_cache(seed)
    rng = random.Random(f"sample-tasks:{seed}")
    capitals = [c.capital for c in world]
    with (out / "sample_capitals.jsonl").open("w") as f:
        for c in world:
            choices = [c.capital, *rng.sample([x for x in capitals if x != c.capital], 3)]
            rng.shuffle(choices)
            doc = {
                "context": f"The capital of {c.name} is",
                "choices": choices,
                "label": choices.index(c.capital),
            }
            f.write(json.dumps(doc) + "\n")
    with (out / "sample_heldout.jsonl").open("w") as f:
        for i in range(heldout_docs):
            f.write(json.dumps({"text": generate_document(seed, "eval-heldout", i)["text"]}) + "\n")
    write_local_task(out, "sample_capitals", out / "sample_capitals.jsonl", "multiple_choice")
    write_local_task(out, "sample_heldout", out / "sample_heldout.jsonl", "perplexity")
    return ["sample_capitals", "sample_heldout"]


def go_offline() -> None:
    """Make the hub / datasets libraries fail instead of downloading (before they are imported)."""
    missing = [k for k in OFFLINE_ENV if k not in os.environ]
    for key in missing:
        os.environ[key] = OFFLINE_ENV[key]
    loaded = [m for m in ("huggingface_hub", "datasets") if m in sys.modules]
    if loaded and missing:
        print(
            f"note: {', '.join(loaded)} already imported; offline mode relies on the environment it saw",
            file=sys.stderr,
        )


def run_lm_eval(
    hf_dir: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    device: str = "cpu",
    batch_size: int | str = 1,
    limit: int | float | None = None,
    dtype: str = "float32",
    model_args: str = "",
) -> dict[str, Any]:
    """lm-evaluation-harness on an exported model directory; returns the harness's `results`
    (per task: metric -> value, with `<metric>_stderr`). `model_args`: more `key=value,...` for the
    harness's `hf` model, e.g. `add_bos_token=False` (see the module docstring)."""
    go_offline()
    try:  # lm-eval: optional extra (`eval`), imported after go_offline() so it stays offline
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'lm-eval[hf]' "
            "(or this project's `eval` extra)"
        ) from e
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no config.json: pass a directory written by `orchestrator export`"
        )
    # Indexing the harness's thousands of built-in task files takes long; local tasks need none of them.
    manager = (
        TaskManager(include_path=str(include_path), include_defaults=False)
        if include_path
        else None
    )
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" under {include_path}" if include_path else ""
        raise ValueError(
            f"unknown harness task(s) {unknown}{where}: write one with `orchestrator evaluate "
            "--local-task FILE.jsonl` or `--write-sample-tasks DIR`, and pass --include-path"
        )
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype={dtype}" + (f",{model_args}" if model_args else ""),
        tasks=tasks,
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
        log_samples=False,
    )
    return out["results"]


def export_for_harness(checkpoint: str | Path, tokenizer: str | None = None) -> Path:
    """Export a checkpoint into a temporary HF directory (deleted at interpreter exit)."""
    tmp = Path(tempfile.mkdtemp(prefix="orchestrator-eval-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    export_checkpoint(checkpoint, tmp / "hf", tokenizer=tokenizer, dtype="float32")
    return tmp / "hf"


def format_harness_results(results: dict[str, Any]) -> str:
    lines = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            err = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            lines.append(f"{task:<24} {metric:<16} {value:.4f}{err}")
    return "\n".join(lines)
