"""Downstream evaluation during training (`eval.tasks`): multiple-choice and exact-match tasks from
local JSON-lines files, scored by the Validator right after the validation loss, with the numbers
`orchestrator evaluate` reports for the same checkpoint.

Every rank runs the same forward passes in the same order (each one is a collective); the
metrics, tokenisation and rank split: docs/evaluation.md, "How `eval.tasks` scores during training".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric

from data.instructions import FORMATS, detect_format
from data.tokenizer import Tokenizer
from orchestrator.config import Config
from orchestrator.evaluation.generation import greedy
from orchestrator.evaluation.scoring import (
    continuation_logprobs,
    exact_match_answer,
    generation_prompt,
    read_instruction_records,
)
from orchestrator.schema import ConfigError

MULTIPLE_CHOICE, EXACT_MATCH = "multiple_choice", "exact_match"
METRICS = {MULTIPLE_CHOICE: ("acc", "acc_norm"), EXACT_MATCH: ("exact_match",)}
MC_KEYS = ("context", "choices", "label")  # any of them on the first line: multiple choice
TARGET_DELIMITER = " "  # the harness's default between a multiple-choice context and its choice
FORMATS_HINT = (
    'multiple-choice lines {"context": ..., "choices": [...], "label": i} (`orchestrator evaluate '
    "--write-sample-tasks DIR` writes one, DIR/sample_capitals.jsonl) or exact-match instruction "
    f"records ({', '.join(FORMATS)}: "
    '{"input": ..., "target": ...}, {"instruction": ..., "output": ...}, {"messages": [...]})'
)


def task_name(path: str | Path) -> str:
    """The name `orchestrator evaluate --local-task` gives a file's task."""
    return Path(path).stem.replace("-", "_").replace(".", "_")


@dataclass(frozen=True)
class Example:
    """A multiple-choice example."""

    task: int  # index into Downstream.tasks
    pairs: tuple[tuple[list[int], list[int]], ...]  # (context ids, continuation ids), per choice
    label: int
    lengths: tuple[float, ...]  # each choice's length in characters (acc_norm's divisor)


@dataclass(frozen=True)
class Question:
    """An exact-match example."""

    task: int  # index into Downstream.tasks
    prompt: tuple[int, ...]  # [BOS] + encode(prompt), truncated as exact_match truncates it
    target: str  # the first response, stripped


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    size: int  # examples scored
    kind: str = MULTIPLE_CHOICE

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]


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


def task_kind(path: str | Path, number: int, first: Any) -> str:
    """The kind of a task file, from its first record (line `number`); ConfigError when it is
    neither kind (a perplexity document, or a record of no known keys)."""
    where = f"eval.tasks: {path}, line {number}"
    doc = first if isinstance(first, dict) else {}
    if "text" in doc and not any(k in doc for k in MC_KEYS) and detect_format(doc) is None:
        raise ConfigError(
            f'{where}, is a perplexity document ({{"text": ...}}): in-loop tasks are multiple choice '
            "or exact match; the validation loss measures perplexity during training, and "
            "`orchestrator evaluate --checkpoint CKPT --local-task FILE` scores such a file"
        )
    if any(k in doc for k in MC_KEYS):
        return MULTIPLE_CHOICE
    if detect_format(doc) is not None:
        return EXACT_MATCH
    keys = sorted(doc) if isinstance(first, dict) else type(first).__name__
    raise ConfigError(
        f"{where}: {keys} is neither kind of task (read from a file's first line): give "
        + FORMATS_HINT
    )


def multiple_choice_doc(where: str, doc: Any) -> dict:
    """A multiple-choice line checked and its label made an index; ConfigError otherwise."""
    if not isinstance(doc, dict):
        doc = {}
    context, choices, label = doc.get("context"), doc.get("choices"), doc.get("label")
    if (
        not isinstance(context, str)
        or not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ConfigError(
            f"{where}: a multiple-choice example needs a line like "
            '{"context": "...", "choices": ["...", ...], "label": 0} (non-empty choices)'
        )
    if isinstance(label, str) and label.isdigit():  # as the harness reads `{{label}}`
        label = int(label)
    elif isinstance(label, str) and label in choices:  # the correct choice itself
        label = choices.index(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(
            f"{where}: label {doc.get('label')!r} is not the index of one of its "
            f"{len(choices)} choices (nor one of them)"
        )
    return {"context": context, "choices": choices, "label": label}


def read_task_file(path: str | Path, limit: int = 0) -> tuple[str, list]:
    """(kind, examples) of a task file, its first `limit` examples (0: all), each checked:
    multiple choice, {"context", "choices", "label" (an index)} dicts; exact match, (prompt,
    stripped target) pairs as `exact_match` reads them. ConfigError naming eval.tasks, the file
    and the line otherwise."""
    where = f"eval.tasks: {path}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where} does not exist: give JSON-lines files of " + FORMATS_HINT)
    lines = [
        (number, line)
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    if not lines:
        raise ConfigError(f"{where} holds no example")
    docs = []
    for number, line in lines[: limit or None]:
        try:
            docs.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}, line {number}, is not JSON: {e}") from None
    kind = task_kind(path, *docs[0])
    if kind == EXACT_MATCH:
        try:  # the reading of `orchestrator evaluate`'s exact_match, line for line
            return kind, read_instruction_records(p, limit)
        except ValueError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
    return kind, [multiple_choice_doc(f"{where}, line {n}", doc) for n, doc in docs]


def check_generation_budget(cfg: Config, path: str) -> None:
    """eval.max_new_tokens leaves a prompt of >= 2 tokens in the model's window (so every
    generation runs exactly eval.max_new_tokens steps, and the encoder-decoder has a token to
    encode besides the one that starts its decoder)."""
    most = cfg.model.max_seq_len - 2
    if cfg.eval.max_new_tokens > most:
        raise ConfigError(
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} leaves no room in model.max_seq_len="
            f"{cfg.model.max_seq_len} for the prompts of eval.tasks {path} (exact match): set "
            f"eval.max_new_tokens <= {most}"
        )


def load_tasks(cfg: Config) -> tuple[list[Task], list[Example], list[Question]]:
    """Every example of eval.tasks, tokenised and checked against the model's window: (tasks,
    multiple-choice examples, exact-match examples), each list in file order."""
    tok = Tokenizer(cfg.data.tokenizer)
    if tok.bos_id < 0:
        raise ConfigError(
            f"eval.tasks: data.tokenizer={cfg.data.tokenizer} has no BOS token, which every context "
            "starts with"
        )
    encdec = cfg.model.arch == "encoder_decoder"
    window = cfg.model.max_seq_len + 1  # continuation_logprobs' window
    tasks: list[Task] = []
    examples: list[Example] = []
    questions: list[Question] = []
    for path in cfg.eval.tasks:
        kind, docs = read_task_file(path, cfg.eval.task_limit)
        if kind == EXACT_MATCH:
            check_generation_budget(cfg, path)
            for number, (prompt, target) in enumerate(docs, 1):
                ids = generation_prompt(tok, prompt, cfg.model.max_seq_len, cfg.eval.max_new_tokens)
                if encdec and len(ids) < 2:  # what generate would refuse
                    raise ConfigError(
                        f"eval.tasks: {path}, example {number}: an empty prompt leaves the "
                        "encoder-decoder's encoder nothing to read (it reads [BOS] + the prompt but "
                        "its last token, which starts the decoder): give every record a prompt"
                    )
                questions.append(Question(len(tasks), tuple(ids), target))
            tasks.append(Task(task_name(path), str(path), len(docs), kind))
            continue
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
        tasks.append(Task(task_name(path), str(path), len(docs), kind))
    return tasks, examples, questions


def check_tasks(cfg: Config) -> None:
    """Preflight: every eval.tasks file readable, every example scorable (ConfigError otherwise)."""
    if cfg.eval.tasks:
        load_tasks(cfg)


class Downstream:
    """The eval.tasks of a run, loaded once; `score` evaluates them on every rank."""

    def __init__(self, cfg: Config) -> None:
        self.tasks, self.examples, self.questions = load_tasks(cfg)
        self.tok = Tokenizer(cfg.data.tokenizer)  # decodes the answers
        self.max_new_tokens = cfg.eval.max_new_tokens
        self._lengths: dict[
            torch.device, torch.Tensor
        ] = {}  # (examples, most choices), on a device

    def forwards(self, rank: int, world_size: int) -> int:
        """Multiple-choice forward passes rank `rank` needs for its examples."""
        return sum(len(e.pairs) for e in self.examples[rank::world_size])

    def generations(self, world_size: int) -> int:
        """Exact-match generations every rank runs (its own examples, then copies of the first),
        eval.max_new_tokens forward passes each."""
        return -(-len(self.questions) // world_size)

    @torch.no_grad()
    def score(self, model: torch.nn.Module, fabric: Fabric) -> dict[str, float]:
        """{"<task>/<metric>": ...} of every task (acc and acc_norm, or exact_match), the same on
        every rank (call it on every rank: its forward passes and its all-reduce are collective)."""
        hits = torch.zeros(len(self.tasks), 2, dtype=torch.float64, device=fabric.device)
        was_training = model.training
        model.eval()
        try:  # the two phases in this order on every rank (see the module docstring)
            if self.examples:
                self._multiple_choice(model, fabric, hits)
            if self.questions:
                self._exact_match(model, fabric, hits)
        finally:
            model.train(was_training)
        hits = fabric.all_reduce(hits, reduce_op="sum")
        results = {}
        for task, row in zip(self.tasks, hits.tolist(), strict=True):
            for metric, value in zip(task.metrics, row, strict=False):
                results[f"{task.name}/{metric}"] = value / task.size
        return results

    def _multiple_choice(self, model: torch.nn.Module, fabric: Fabric, hits: torch.Tensor) -> None:
        """Adds this rank's correct counts to hits[task, 0] (acc) and hits[task, 1] (acc_norm)."""
        rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
        if device not in self._lengths:  # one copy to the device, at the first evaluation
            most = max(len(e.lengths) for e in self.examples)
            rows = [list(e.lengths) + [1.0] * (most - len(e.lengths)) for e in self.examples]
            self._lengths[device] = torch.tensor(rows, dtype=torch.float64, device=device)
        lengths = self._lengths[device]
        padded = max(self.forwards(r, world) for r in range(world))  # the same on every rank
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

    def _exact_match(self, model: torch.nn.Module, fabric: Fabric, hits: torch.Tensor) -> None:
        """Adds this rank's correct counts to hits[task, 0] (exact_match)."""
        mine = self.questions[fabric.global_rank :: fabric.world_size]
        for i in range(self.generations(fabric.world_size)):  # the same count on every rank
            question = mine[i] if i < len(mine) else self.questions[0]  # a copy: lockstep only
            # eval.max_new_tokens steps whatever is generated (no eos_id: no early stop); the
            # prompt leaves that many positions in the window (generation_prompt)
            out = greedy(
                model, list(question.prompt), self.max_new_tokens, self.tok.vocab_size
            )  # P + max_new_tokens ids
            if i < len(mine):
                answer = exact_match_answer(self.tok, out, len(question.prompt))
                hits[question.task, 0] += answer == question.target
