"""Evaluate a trained model: validation perplexity of a checkpoint, lm-evaluation-harness tasks on
an exported model with local data (nothing is downloaded), and exact match on instruction records.

    orchestrator evaluate --checkpoint runs/demo [--data .cache/sample/tokens] [--split val]
    orchestrator evaluate --checkpoint runs/demo --local-task qa.jsonl --local-task-kind exact_match

The scoring rules (perplexity, the harness's local tasks, exact match, BOS, the encoder-decoder
scored in process): docs/evaluation.md, "How `orchestrator evaluate` scores".
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
from data.sample_corpus import generate_document, sample_world
from data.tokenizer import Tokenizer
from models.llama import LanguageModel
from orchestrator.checkpoint.layout import (
    MANIFEST_NAME,
    META_NAME,
    load_saved_config,
    resolve_checkpoint,
)
from orchestrator.devices import pick_device
from orchestrator.evaluation.generation import completion, greedy
from orchestrator.evaluation.scoring import (
    ANSWER_STOP,
    continuation_logprobs,
    exact_match_answer,
    generation_prompt,
    read_instruction_records,
)
from orchestrator.tools.hf import DTYPES, export_checkpoint, inference_dtype, load_model

EXACT_MATCH_TOKENS = 16  # default max_new_tokens of exact match (CLI, eval.max_new_tokens)
EXACT_MATCH_FILTER = "strip"  # the harness task's filter: its results are exact_match,strip

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
    validation split the run was configured with. `max_batches` 0 reads the whole split. Read as
    the run's validation reads it: instruction data (`prepare --format instruction`) over its
    response targets only, and with data.document_mask (or instruction data) each document on
    its own; `tokens` counts the targets the loss is over."""
    # imported on use: preflight loads the checkpointer, hence lightning (seconds)
    from orchestrator.training.preflight import check_datasets_match_tokenizer

    ckpt_dir = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    torch_dtype = inference_dtype(dtype, dev)
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
    instruction, documents = split_reading(cfg, split_dir)
    loader = make_dataloader(
        split_dir,
        seq_len=T,
        batch_size=batch_size,
        shuffle=False,
        seed=0,
        drop_last=False,
        vocab_size=cfg.model.vocab_size,
    )
    started = time.perf_counter()
    total_loss, tokens, sequences = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = batch.long()  # (B, T+1), as stored (instruction data: loss flags)
            sequences += batch.shape[0]
            if instruction or documents is not None:  # decoded and packed as validation does
                loss, count = packed_loss(model, cfg, batch, documents, instruction, dev)
                total_loss += loss * count
                tokens += count
                continue
            batch = batch.to(dev)
            logits = model(batch[:, :-1])  # (B, T, V); the encoder-decoder: (B, T-P, V)
            targets = batch[:, batch.shape[1] - logits.shape[1] :]  # the tokens they predict
            total_loss += float(
                F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            )
            tokens += targets.numel()
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


def split_reading(cfg, split_dir: Path) -> tuple[bool, Any]:
    """How validation reads a prepared split for this checkpoint's config: (instruction data?,
    its DocumentBoundary when the run masked documents or the data is instruction data, else
    None), from the prepare_stats.json beside it."""
    from data.documents import DocumentBoundary, read_prepare_stats

    stats = read_prepare_stats(split_dir) or {}
    instruction = stats.get("format", "text") == "instruction"
    if not (instruction or cfg.data.document_mask):
        return False, None
    if not stats:
        raise ValueError(
            f"{split_dir}: the checkpoint was trained with data.document_mask=true, which needs the "
            "prepare_stats.json beside the split (where documents start): score the prepare's output"
        )
    return instruction, DocumentBoundary.from_stats(stats)


def packed_loss(
    model: LanguageModel, cfg, batch: torch.Tensor, documents, instruction: bool, dev
) -> tuple[float, int]:
    """(mean loss, targets it is over) of a (B, T+1) stored batch read as validation reads it:
    instruction data decoded (the responses' targets only), documents kept apart, the
    encoder-decoder's examples or prefix split packed (orchestrator/training/data.py)."""
    from models.kernels import IGNORE_INDEX
    from orchestrator.training.data import model_batch, packing_arguments

    inputs, targets, count = model_batch(batch, instruction)
    packing = packing_arguments(cfg.model, inputs, targets, documents, instruction, dev)
    if cfg.model.arch == "encoder_decoder" and not instruction:  # the decoder's targets
        P = cfg.model.encoder_tokens(inputs.shape[1])
        count = targets[:, P:].numel()
    elif not instruction:
        count = int((targets != IGNORE_INDEX).sum())
    if count == 0:  # a batch without a response target adds nothing
        return 0.0, 0
    loss = model(inputs.to(dev), targets=targets.to(dev), **packing)  # eval mode: plain CE
    return float(loss), count


# --------------------------------------------------------------------------------------------
# Log-likelihood of a continuation (either family)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
# --------------------------------------------------------------------------------------------
# lm-evaluation-harness with local tasks
# --------------------------------------------------------------------------------------------


def write_local_task(
    out_dir: str | Path,
    name: str,
    data_file: str | Path,
    kind: str = "perplexity",
    max_new_tokens: int = EXACT_MATCH_TOKENS,
) -> Path:
    """A harness task `name` reading the local JSON-lines `data_file` (see the module docstring);
    returns the YAML path. Pass `out_dir` as the harness's include path. Kind `exact_match` also
    writes the normalised records, `out_dir`/`name`.prompts.jsonl, which the task reads, and
    generates up to `max_new_tokens` tokens per answer."""
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(
            f"{data_file} does not exist: a local task needs its JSON-lines file"
        )
    first = json.loads(next(line for line in data_file.read_text().splitlines() if line.strip()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    read_from = data_file
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
    elif kind == "exact_match":
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")
        # The harness reads prompt and stripped target from a normalised copy (no template).
        read_from = (out / f"{name}.prompts.jsonl").resolve()
        if read_from == data_file:
            raise ValueError(f"{data_file} would be overwritten by its normalised copy: rename it")
        pairs = [{"input": p, "target": t} for p, t in read_instruction_records(data_file)]
        read_from.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
        body = [
            f"# normalised from {json.dumps(str(data_file))}: prompt and stripped first response",
            "output_type: generate_until",
            "doc_to_text: input",  # feature names: the strings as they are, no Jinja
            "doc_to_target: target",
            'target_delimiter: ""',
            "generation_kwargs:",
            f"  until: [{json.dumps(ANSWER_STOP)}]",
            "  do_sample: false",
            f"  max_gen_toks: {int(max_new_tokens)}",
            "filter_list:",
            f"  - name: {EXACT_MATCH_FILTER}",
            "    filter:",
            "      - function: remove_whitespace",  # str.strip() of every response
            "      - function: take_first",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
        ]
    else:
        raise ValueError(f"kind={kind!r}: use perplexity, multiple_choice or exact_match")
    lines = [
        f"task: {name}",
        "dataset_path: json",  # the datasets library's local JSON loader: no hub, no download
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(read_from))}",
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
    world = sample_world(seed)
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


def exact_match(
    checkpoint: str | Path,
    jsonl: str | Path,
    tokenizer: str | Path | None = None,
    limit: int = 0,
    max_new_tokens: int = EXACT_MATCH_TOKENS,
    instruction_format: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Exact-match accuracy of a checkpoint (or a run dir: its latest) on instruction records.

    `jsonl`: records in a data/instructions.py format (`instruction_format`: auto or one of its
    FORMATS); the prompt is the example's text before its first response, exactly as the training
    template builds it, encoded as in training ([BOS] + ids; `generation_prompt`). Greedy
    generation of up to `max_new_tokens` tokens; the answer is the text before EOS and before the
    first newline, stripped, compared with the first response, stripped (`exact_match_answer`):
    the rule of the harness kind `exact_match` and of eval.tasks (see the module docstring).
    `limit` > 0: the first `limit` records.
    Returns {"accuracy", "correct", "total", "predictions": [{prompt, target, answer, correct}]}."""
    dev = pick_device(device)
    torch_dtype = inference_dtype(dtype, dev)
    model, cfg = load_model(checkpoint, device=dev, dtype=torch_dtype)
    tok = Tokenizer(tokenizer or cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces, more than model.vocab_size="
            f"{cfg.model.vocab_size}: pass the tokenizer the model was trained with"
        )
    records = read_instruction_records(jsonl, limit, instruction_format)
    eos = tok.eos_id if tok.eos_id >= 0 else None
    predictions = []
    for prompt, target in records:
        ids = generation_prompt(tok, prompt, cfg.model.max_seq_len, max_new_tokens)
        out = greedy(model, ids, max_new_tokens, tok.vocab_size, eos)
        answer = exact_match_answer(tok, out, len(ids))
        predictions.append(
            {"prompt": prompt, "target": target, "answer": answer, "correct": answer == target}
        )
    correct = sum(p["correct"] for p in predictions)
    return {
        "accuracy": correct / len(predictions),
        "correct": correct,
        "total": len(predictions),
        "predictions": predictions,
    }


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


ROLLING_REFUSAL = (
    "rolling perplexity tasks score a document from BOS alone, which leaves the encoder-decoder's "
    "encoder nothing to read: evaluate its perplexity with `orchestrator evaluate --checkpoint "
    "CKPT` (the validation split, scored as in training), or run multiple-choice / generation tasks"
)


def is_encoder_decoder_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint (or run dir) of ours holding an encoder-decoder model."""
    try:
        return load_saved_config(resolve_checkpoint(path)).model.arch == "encoder_decoder"
    except FileNotFoundError:
        return False


def checkpoint_lm(
    checkpoint: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    tokenizer: str | Path | None = None,
):
    """An lm-evaluation-harness model (`lm_eval.api.model.TemplateLM`) over a checkpoint, scored in
    this process: for the encoder-decoder, which has no `hf` model (see the module docstring). Its
    scoring works for either family, but a decoder goes through its export and the `hf` model,
    which also scores rolling perplexity (refused here)."""
    from lm_eval.api.model import TemplateLM  # after go_offline(), like every harness import

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    model, cfg = load_model(checkpoint, device=pick_device(device), dtype=DTYPES[dtype])
    tok = Tokenizer(tokenizer or cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces, more than model.vocab_size="
            f"{cfg.model.vocab_size}: is it the tokenizer the model was trained with?"
        )
    if tok.bos_id < 0:
        raise ValueError(f"tokenizer {tok.path} has no BOS token, which every context starts with")

    class CheckpointLM(TemplateLM):
        @property
        def eot_token_id(self) -> int:
            return tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return tok.bos_id  # what an empty context becomes (BOS starts every document)

        @property
        def max_length(self) -> int:
            return cfg.model.max_seq_len

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
            return tok.encode(string, bos=add_special_tokens is not False)  # as the hf model: BOS

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            for _, context, continuation in requests:  # one at a time: contexts differ in length
                logp, greedy = continuation_logprobs(model, context, continuation)
                out.append((float(logp.sum()), greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise ValueError(ROLLING_REFUSAL)

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                # [BOS] + context, truncated as the hf model truncates (what exact_match encodes)
                ids = generation_prompt(tok, context, cfg.model.max_seq_len, max_new)
                eos = tok.eos_id if tok.eos_id >= 0 else None
                # Greedy, as the harness's generation tasks ask by default.
                out_ids = greedy(model, ids, max_new, tok.vocab_size, eos)
                # The continuation decoded alone, as the hf model decodes it (its leading space
                # dropped); cut at each stop sequence: with until ["\n"], stripped (the exact-match
                # task's filter), exactly exact_match_answer.
                text = tok.decode(completion(out_ids, len(ids), eos))
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return CheckpointLM()


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
    harness's `hf` model, e.g. `add_bos_token=False` (see the module docstring). An encoder-decoder
    checkpoint (what `export_for_harness` passes for one) is scored by `checkpoint_lm` instead.
    Generation tasks through the `hf` model never produce the model's padding rows
    (`padding_rows`: `suppress_tokens` added to every generate_until task's generation_kwargs)."""
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
    native = not (hf_dir / "config.json").is_file() and is_encoder_decoder_checkpoint(hf_dir)
    if not native and not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no config.json: pass a directory written by `orchestrator export`"
        )
    if native and model_args:
        raise ValueError(
            f"--model-args {model_args!r} are for the harness's hf model; {hf_dir} is an "
            "encoder-decoder checkpoint, scored in this process (it has no Hugging Face export)"
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
    # Before any scoring where the task files say so (a group's members are refused when reached).
    rolling = [t for t in tasks if native and _output_type(manager, t) == "loglikelihood_rolling"]
    if rolling:
        raise ValueError(f"task(s) {', '.join(rolling)}: {ROLLING_REFUSAL}")
    generation = any(_output_type(manager, t) in (None, "generate_until") for t in tasks)
    padding = padding_rows(hf_dir) if generation and not native else []
    out = simple_evaluate(
        model=checkpoint_lm(hf_dir, device, dtype) if native else "hf",
        model_args=None
        if native
        else f"pretrained={hf_dir},dtype={dtype}" + (f",{model_args}" if model_args else ""),
        tasks=tasks,
        task_manager=manager,
        device=device,
        batch_size=batch_size,
        limit=limit,
        log_samples=False,
        # generation tasks never produce the padding rows (checkpoint_lm and exact_match: vocab_limit)
        gen_kwargs={"suppress_tokens": padding} if padding else None,
    )
    return out["results"]


def padding_rows(hf_dir: str | Path) -> list[int]:
    """Ids of an exported model's embedding rows past its tokenizer's pieces (model.vocab_size is
    often rounded up, e.g. to a multiple of 64): no text, so a generation must never pick them, as
    `exact_match` never does (vocab_limit). Empty when the directory does not say."""
    hf_dir = Path(hf_dir)
    try:
        rows = int(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
        tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return []
    ids = set(tokenizer.get("model", {}).get("vocab", {}).values())
    ids |= {t["id"] for t in tokenizer.get("added_tokens", [])}
    pieces = max(ids, default=rows - 1) + 1
    return list(range(pieces, rows))


def _output_type(manager, task: str) -> str | None:
    """A task's `output_type` as its YAML file gives it (None for groups, or when not written there)."""
    entry = getattr(manager, "task_index", {}).get(task)
    cfg = getattr(entry, "cfg", None)
    return cfg.get("output_type") if isinstance(cfg, dict) else None


def export_for_harness(checkpoint: str | Path, tokenizer: str | None = None) -> Path:
    """Export a checkpoint into a temporary HF directory (deleted at interpreter exit). An
    encoder-decoder has no export: its checkpoint is returned as it is, for `run_lm_eval` to score
    in this process."""
    if is_encoder_decoder_checkpoint(checkpoint):
        return resolve_checkpoint(checkpoint)
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
