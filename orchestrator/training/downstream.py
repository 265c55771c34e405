"""Downstream evaluation during training (`eval.tasks`): multiple-choice tasks from local JSON-lines
files, scored by the Validator right after the validation loss (every eval.interval steps, at the
last step, and with eval.at_start before the first), with the numbers `orchestrator evaluate`
reports for the same checkpoint.

A task file holds lines {"context": str, "choices": [str, ...], "label": i} (the label may also be
the correct choice itself): the format of `orchestrator evaluate --local-task FILE
--local-task-kind multiple_choice` (orchestrator/tools/evaluate.py `write_local_task`), and the
task has the name that command gives it (the file's stem, `-` and `.` made `_`). Its metrics are
lm-evaluation-harness's (lm-eval 0.4.13, ConfigurableTask.process_results), for either family:

  * acc: whether the label is the argmax over the choices of sum log p(" " + choice | context);
  * acc_norm: the same argmax after dividing each sum by the choice's length in characters;
  ties go to the first choice (numpy's argmax, torch's argmax).

Tokenisation is the harness's (TemplateLM.loglikelihood / _encode_pair, with the tokenizer adding
BOS as the exported one and `checkpoint_lm` do): trailing spaces of the context move to the
continuation, context + continuation is encoded in one piece after BOS and split after the
context's own tokens; an empty context is BOS alone. Each (context, continuation) pair is scored
by `continuation_logprobs`, the function `orchestrator evaluate` scores encoder-decoder checkpoints
with (its decoder path, the harness's `hf` model, computes the same log-likelihoods); the model is
the one training holds, called as validation calls it (through Fabric's wrapper: DDP, FSDP2,
DeepSpeed, torch.compile'd blocks), in eval mode under no_grad, in training's precision. With
strategy.precision 32-true the accuracies are exactly `orchestrator evaluate`'s (checked in
tests/orchestrator/training/test_downstream.py); bf16 can flip near-ties.

Across processes: rank r scores examples r::world of all tasks (in file order) and every rank runs
the same number of forward passes (ranks with fewer choices to score run copies of the first pair,
whose results are discarded), since sharded models (FSDP2, ZeRO-3) and DDP's buffer broadcast make
every forward a collective. The correct counts go through one all-reduce per evaluation, after
which every rank holds the same results. Every example is read, tokenised and checked against the
model's window at load time (preflight, before any process starts, and again on each rank), so no
rank can fail mid-evaluation while the others wait.

Rolling-perplexity files (lines {"text": ...}) are refused: the validation loss measures that in
the loop, and `orchestrator evaluate --checkpoint` scores a checkpoint's perplexity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric import Fabric

from data.tokenizer import Tokenizer
from orchestrator.config import Config
from orchestrator.schema import ConfigError
from orchestrator.tools.evaluate import continuation_logprobs

METRICS = ("acc", "acc_norm")
TARGET_DELIMITER = " "  # the harness's default between a multiple-choice context and its choice


def task_name(path: str | Path) -> str:
    """The name `orchestrator evaluate --local-task` gives a file's task."""
    return Path(path).stem.replace("-", "_").replace(".", "_")


@dataclass(frozen=True)
class Example:
    task: int  # index into Downstream.tasks
    pairs: tuple[tuple[list[int], list[int]], ...]  # (context ids, continuation ids), per choice
    label: int
    lengths: tuple[float, ...]  # each choice's length in characters (acc_norm's divisor)


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    size: int  # examples scored


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness tokenises a loglikelihood request
    (TemplateLM.loglikelihood and _encode_pair, causal models) with a tokenizer that adds BOS."""
    if context == "":  # BOS as the context
        ids = tok.encode(continuation, bos=False)
        return ([tok.bos_id], ids) if not ids or ids[0] != tok.bos_id else (ids[:1], ids[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # trailing spaces belong to the continuation
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, bos=True)
    context_ids = tok.encode(context, bos=True)
    return context_ids, whole[len(context_ids) :]


def read_task_file(path: str | Path, limit: int = 0) -> list[dict]:
    """The documents of a multiple-choice task file (its first `limit`, 0: all), each checked;
    ConfigError naming eval.tasks, the file and the line otherwise."""
    where = f"eval.tasks: {path}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{where} does not exist: give JSON-lines files of multiple-choice examples, lines "
            '{"context": ..., "choices": [...], "label": i} (`orchestrator evaluate '
            "--write-sample-tasks DIR` writes one, DIR/sample_capitals.jsonl)"
        )
    docs = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if limit and len(docs) == limit:
            break
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}, line {number}, is not JSON: {e}") from None
        if not isinstance(doc, dict):
            doc = {}
        if "text" in doc and "choices" not in doc:
            raise ConfigError(
                f'{where}, line {number}, is a perplexity document ({{"text": ...}}): in-loop tasks are '
                "multiple choice; the validation loss measures perplexity during training, and "
                "`orchestrator evaluate --checkpoint CKPT --local-task FILE` scores such a file"
            )
        context, choices, label = doc.get("context"), doc.get("choices"), doc.get("label")
        if (
            not isinstance(context, str)
            or not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(
                f"{where}, line {number}: a multiple-choice example needs a line like "
                '{"context": "...", "choices": ["...", ...], "label": 0} (non-empty choices)'
            )
        if isinstance(label, str) and label.isdigit():  # as the harness reads `{{label}}`
            label = int(label)
        elif isinstance(label, str) and label in choices:  # the correct choice itself
            label = choices.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ConfigError(
                f"{where}, line {number}: label {doc.get('label')!r} is not the index of one of its "
                f"{len(choices)} choices (nor one of them)"
            )
        docs.append({"context": context, "choices": choices, "label": label})
    if not docs:
        raise ConfigError(f"{where} holds no example")
    return docs


def load_tasks(cfg: Config) -> tuple[list[Task], list[Example]]:
    """Every example of eval.tasks, tokenised and checked against the model's window."""
    tok = Tokenizer(cfg.data.tokenizer)
    if tok.bos_id < 0:
        raise ConfigError(
            f"eval.tasks: data.tokenizer={cfg.data.tokenizer} has no BOS token, which every context "
            "starts with"
        )
    encdec = cfg.model.arch == "encoder_decoder"
    window = cfg.model.max_seq_len + 1  # continuation_logprobs' window
    tasks, examples = [], []
    for path in cfg.eval.tasks:
        docs = read_task_file(path, cfg.eval.task_limit)
        for number, doc in enumerate(docs, 1):
            pairs = tuple(
                encode_pair(tok, doc["context"], TARGET_DELIMITER + choice)
                for choice in doc["choices"]
            )
            for context, continuation in pairs:  # what continuation_logprobs would refuse
                n_context = len((context + continuation)[-window:]) - len(continuation)
                if not continuation or n_context < (2 if encdec else 1):
                    raise ConfigError(
                        f"eval.tasks: {path}, example {number}: a choice of {len(continuation)} tokens "
                        f"after a context of {len(context)} leaves too little context in the model's "
                        f"window of {cfg.model.max_seq_len} tokens"
                        + (
                            " (the encoder-decoder needs a non-empty context after BOS)"
                            if encdec
                            else ""
                        )
                    )
            lengths = tuple(float(len(choice)) for choice in doc["choices"])
            examples.append(Example(len(tasks), pairs, doc["label"], lengths))
        tasks.append(Task(task_name(path), str(path), len(docs)))
    return tasks, examples


def check_tasks(cfg: Config) -> None:
    """Preflight: every eval.tasks file readable, every example scorable (ConfigError otherwise)."""
    if cfg.eval.tasks:
        load_tasks(cfg)


class Downstream:
    """The eval.tasks of a run, loaded once; `score` evaluates them on every rank."""

    def __init__(self, cfg: Config) -> None:
        self.tasks, self.examples = load_tasks(cfg)
        self._lengths: dict[
            torch.device, torch.Tensor
        ] = {}  # (examples, most choices), on a device

    def forwards(self, rank: int, world_size: int) -> int:
        """Forward passes rank `rank` needs for its examples."""
        return sum(len(e.pairs) for e in self.examples[rank::world_size])

    @torch.no_grad()
    def score(self, model: torch.nn.Module, fabric: Fabric) -> dict[str, float]:
        """{"<task>/acc": ..., "<task>/acc_norm": ...} of every task, the same on every rank (call it
        on every rank: its forward passes and its all-reduce are collective)."""
        rank, world = fabric.global_rank, fabric.world_size
        device = fabric.device
        if device not in self._lengths:  # one copy to the device, at the first evaluation
            most = max(len(e.lengths) for e in self.examples)
            rows = [list(e.lengths) + [1.0] * (most - len(e.lengths)) for e in self.examples]
            self._lengths[device] = torch.tensor(rows, dtype=torch.float64, device=device)
        lengths = self._lengths[device]
        padded = max(self.forwards(r, world) for r in range(world))  # the same on every rank
        hits = torch.zeros(len(self.tasks), len(METRICS), dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        try:
            done = 0
            for i in range(rank, len(self.examples), world):
                example = self.examples[i]
                # sum log p per choice, fp32 sums (as checkpoint_lm's), compared in float64
                lls = torch.stack(
                    [continuation_logprobs(model, c, k)[0].sum() for c, k in example.pairs]
                ).double()
                done += len(example.pairs)
                hits[example.task, 0] += lls.argmax() == example.label
                hits[example.task, 1] += (lls / lengths[i, : len(lls)]).argmax() == example.label
            for _ in range(padded - done):  # lockstep with the ranks that have more to score
                continuation_logprobs(model, *self.examples[0].pairs[0])
        finally:
            model.train(was_training)
        hits = fabric.all_reduce(hits, reduce_op="sum")
        results = {}
        for task, row in zip(self.tasks, hits.tolist(), strict=True):
            for metric, value in zip(METRICS, row, strict=True):
                results[f"{task.name}/{metric}"] = value / task.size
        return results
