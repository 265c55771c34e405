"""Evaluate a trained model: validation perplexity of a checkpoint, and lm-evaluation-harness
tasks on an exported model with local data (nothing is downloaded).

    orchestrator evaluate --checkpoint runs/demo [--data .cache/sample/tokens] [--split val]
    orchestrator evaluate --write-sample-tasks evals/tasks          (two tiny local harness tasks)
    orchestrator evaluate --hf-dir hf/demo --tasks sample_capitals,sample_heldout --include-path evals/tasks
    orchestrator evaluate --checkpoint runs/demo --local-task docs.jsonl --local-task-kind perplexity

Perplexity: exp of the mean next-token cross-entropy over every token of the prepared split
(sequences of seq_len + 1 tokens, as in training; the last partial batch included), computed in
one process without Fabric. The encoder-decoder (`model.arch: encoder_decoder`) is scored as its
validation scores it: the first model.encoder_len tokens of each block (0: half) are encoded and
the loss is over the decoder's predictions of the rest.

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

The encoder-decoder has no Hugging Face export (orchestrator/tools/hf.py says why), so the
harness scores its checkpoint in this process (`checkpoint_lm`), with the harness's own
tokenisation of each (context, continuation) pair (as its `hf` model does: [BOS] + context, the
continuation split off after the context's tokens). Scoring is the prefix LM's
(`continuation_logprobs`): the encoder reads the context but its last token, the decoder reads
that token and the continuation but its last, and predicts the continuation; one example at a
time, as contexts differ in length. So a task needs a non-empty context. Greedy generation tasks
(`generate_until`, exact match) use `orchestrator.tools.generate.generate`. Rolling perplexity
tasks are refused: they score a document from BOS alone, which leaves the encoder nothing to
read (the model is never trained so); use `--checkpoint` validation perplexity instead.
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
from data.tokenizer import Tokenizer
from models.llama import LanguageModel
from orchestrator.checkpoint.layout import (
    MANIFEST_NAME,
    META_NAME,
    load_saved_config,
    resolve_checkpoint,
)
from orchestrator.devices import pick_device
from orchestrator.tools.generate import completion, generate
from orchestrator.tools.hf import DTYPES, export_checkpoint, inference_dtype, load_model

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
            logits = model(batch[:, :-1])  # (B, T, V); the encoder-decoder: (B, T-P, V)
            targets = batch[:, batch.shape[1] - logits.shape[1] :]  # the tokens they predict
            total_loss += float(
                F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            )
            tokens += targets.numel()
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
# Log-likelihood of a continuation (either family)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_logprobs(
    model: LanguageModel, context: list[int], continuation: list[int]
) -> tuple[torch.Tensor, bool]:
    """(log p of each continuation token given the context and the continuation before it: (C,)
    fp32 on the model's device, whether greedy decoding would produce the continuation).

    Decoder: the logits of model(ids[:-1]) over ids = context + continuation, at the last
    len(continuation) positions. Encoder-decoder (prefix LM): the same block with
    encoder_len = len(context) - 1: the encoder reads the context but its last token, the decoder
    reads [last context token] + continuation[:-1], and its logits are exactly the continuation's.
    A context longer than the model's window loses its first tokens (as the harness's `hf` model
    truncates); the encoder-decoder keeps at least two (one to encode, one to start the decoder).
    """
    if not continuation:
        raise ValueError("an empty continuation has no tokens to score")
    encdec = model.cfg.arch == "encoder_decoder"
    window = model.cfg.max_seq_len + 1  # block length + the last target
    ids = (context + continuation)[-window:]
    n_context = len(ids) - len(continuation)
    if n_context < (2 if encdec else 1):
        raise ValueError(
            f"a context of {len(context)} tokens with a continuation of {len(continuation)} in a "
            f"window of {model.cfg.max_seq_len} leaves {max(n_context, 0)} context tokens: "
            + (
                "the encoder-decoder needs >= 2 (its encoder reads all but the last, which starts "
                "the decoder): give a non-empty context after BOS, or a shorter continuation"
                if encdec
                else "the continuation must fit the window after at least one context token"
            )
        )
    device = next(model.parameters()).device
    inputs = torch.tensor([ids[:-1]], device=device)  # (1, L-1)
    kwargs = {"encoder_len": n_context - 1} if encdec else {}
    logits = model(inputs, **kwargs)[0, -len(continuation) :]  # (C, V)
    targets = torch.tensor(continuation, device=device)  # (C,)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    greedy = bool((logits.argmax(dim=-1) == targets).all())
    return logp[torch.arange(len(continuation), device=device), targets], greedy


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


def exact_match(
    checkpoint: str | Path,
    jsonl: str | Path,
    tokenizer: str | Path | None = None,
    limit: int = 0,
    max_new_tokens: int = 8,
    instruction_format: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Exact-match accuracy of a checkpoint (or a run dir: its latest) on instruction records.

    `jsonl`: records in a data/instructions.py format (`instruction_format`: auto or one of its
    FORMATS); the prompt is the example's text before its first response, exactly as the training
    template builds it, encoded as in training ([BOS] + ids). Greedy generation of up to
    `max_new_tokens` tokens; the answer is the text before EOS and before the first newline,
    stripped, compared with the first response, stripped. `limit` > 0: the first `limit` records.
    Returns {"accuracy", "correct", "total", "predictions": [{prompt, target, answer, correct}]}."""
    from data.instructions import to_example

    dev = pick_device(device)
    torch_dtype = inference_dtype(dtype, dev)
    model, cfg = load_model(checkpoint, device=dev, dtype=torch_dtype)
    tok = Tokenizer(tokenizer or cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces, more than model.vocab_size="
            f"{cfg.model.vocab_size}: pass the tokenizer the model was trained with"
        )
    with Path(jsonl).open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    if limit > 0:
        records = records[:limit]
    if not records:
        raise ValueError(f"{jsonl} holds no records")
    eos = tok.eos_id if tok.eos_id >= 0 else None
    predictions = []
    for record in records:
        example = to_example(record, instruction_format)
        prompt, target = example.prompt, example.responses[0].strip()
        ids = tok.encode(prompt, bos=True)
        out = generate(
            model,
            torch.tensor([ids]),
            max_new_tokens,
            temperature=0,
            eos_id=eos,
            vocab_limit=tok.vocab_size,
        )[0].tolist()
        new = completion(out, len(ids), eos)
        answer = tok.decode(new).split("\n", 1)[0].strip()
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
                ids = self.tok_encode(context)
                ids = ids[-max(cfg.model.max_seq_len - max_new, 2) :]  # the hf model's truncation
                eos = tok.eos_id if tok.eos_id >= 0 else None
                # Greedy, as the harness's generation tasks ask by default.
                out_ids = generate(model, torch.tensor([ids]), max_new, temperature=0.0, eos_id=eos,
                                   vocab_limit=tok.vocab_size)  # fmt: skip
                new = completion(out_ids[0].tolist(), len(ids), eos)
                # Decoded after the context, so that a leading space survives sentencepiece.
                prompt, whole = tok.decode(ids), tok.decode(ids + new)
                text = whole[len(prompt) :] if whole.startswith(prompt) else tok.decode(new)
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
    checkpoint (what `export_for_harness` passes for one) is scored by `checkpoint_lm` instead."""
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
    )
    return out["results"]


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
