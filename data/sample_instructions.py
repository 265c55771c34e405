"""A built-in instruction set made from the sample corpus's own facts (no download): short
questions about the countries of data/sample_corpus.py's fixed world, answered with the fact alone.

    {"input": "Q: What is the capital of Bolusstan?\\nA:", "target": "Diastrain"}

The held-out split and the files written: docs/evaluation.md, "The finetuning demo".
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from data.sample_corpus import Country, sample_world

RELATIONS = ("capital", "language", "currency", "continent")

# One question per relation, as the corpus's pages (data/sample_corpus.py `_stackexchange`) ask it.
QUESTIONS = {
    "capital": "What is the capital of {country}?",
    "language": "Which language is spoken in {country}?",
    "currency": "What currency does {country} use?",
    "continent": "On which continent is {country}?",
}

TRAIN_FILE = Path("train") / "sample_qa_train.jsonl"
VAL_FILE = Path("validation") / "sample_qa_heldout.jsonl"
HELDOUT_FILE = Path("heldout.jsonl")


def question_answer(country: Country, relation: str) -> dict[str, str]:
    """The {input, target} record asking `relation` of `country`."""
    question = QUESTIONS[relation].format(country=country.name)
    return {"input": f"Q: {question}\nA:", "target": str(getattr(country, relation))}


def split_pairs(seed: int = 0) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(train, held-out) lists of (country index, relation): every pair of the world in one of them."""
    world = sample_world(seed)
    rng = random.Random(f"sample-instructions:{seed}")
    order = list(range(len(world)))
    rng.shuffle(order)
    held = {(i, RELATIONS[k % len(RELATIONS)]) for k, i in enumerate(order)}
    train = [(i, r) for i in range(len(world)) for r in RELATIONS if (i, r) not in held]
    heldout = sorted(held, key=lambda p: (p[0], RELATIONS.index(p[1])))
    rng.shuffle(train)
    return train, heldout


def _jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_sample_instructions(
    out_dir: str | Path, seed: int = 0, repeats: int = 4
) -> tuple[Path, Path]:
    """Write the question files under `out_dir` (see the module's docstring); returns the paths of
    the train file and of the held-out file (each held-out question once).

    The train/ and validation/ files hold each pair `repeats` times (shuffled per repeat). Files
    are rewritten only when their content would change (a prepare of them stays valid)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    world = sample_world(seed)
    train_pairs, heldout_pairs = split_pairs(seed)
    rng = random.Random(f"sample-instructions-order:{seed}")

    def repeated(pairs: list[tuple[int, str]]) -> list[dict[str, str]]:
        records: list[dict[str, str]] = []
        for _ in range(repeats):
            block = [question_answer(world[i], r) for i, r in pairs]
            rng.shuffle(block)
            records += block
        return records

    heldout = [question_answer(world[i], r) for i, r in heldout_pairs]
    out = Path(out_dir)
    files = {
        out / TRAIN_FILE: repeated(train_pairs),
        out / VAL_FILE: repeated(heldout_pairs),
        out / HELDOUT_FILE: heldout,
    }
    for path, records in files.items():
        text = _jsonl(records)
        if not (path.is_file() and path.read_text() == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # never a truncated file under the final name
    return out / TRAIN_FILE, out / HELDOUT_FILE


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
