"""The built-in question set on the sample corpus's facts (data/sample_instructions.py): deterministic,
held-out (country, relation) pairs disjoint from the train pairs, every fact asked once."""

from __future__ import annotations

from data.instructions import to_example
from data.sample_corpus import sample_world
from data.sample_instructions import (
    RELATIONS,
    read_jsonl,
    split_pairs,
    write_sample_instructions,
)


def test_sample_instructions_are_deterministic_and_held_out_pairs_disjoint(tmp_path):
    train, heldout = write_sample_instructions(tmp_path / "a")
    again = write_sample_instructions(tmp_path / "b")
    assert [p.read_bytes() for p in (train, heldout)] == [p.read_bytes() for p in again]
    assert (
        train.parent.name == "train"
    )  # SlimPajama layout: train/, validation/ (held-out, repeated)
    val = read_jsonl(tmp_path / "a" / "validation" / "sample_qa_heldout.jsonl")
    assert sorted(map(str, val)) == sorted(map(str, read_jsonl(heldout) * 4))

    train_records, heldout_records = read_jsonl(train), read_jsonl(heldout)
    train_prompts = {r["input"] for r in train_records}
    heldout_prompts = {r["input"] for r in heldout_records}
    assert train_prompts and heldout_prompts and not train_prompts & heldout_prompts
    assert len(heldout_prompts) == len(heldout_records)  # each held-out question once

    world = sample_world(0)
    train_pairs, heldout_pairs = split_pairs(0)
    assert not set(train_pairs) & set(heldout_pairs)
    everything = {(i, r) for i in range(len(world)) for r in RELATIONS}
    assert set(train_pairs) | set(heldout_pairs) == everything
    assert {i for i, _ in heldout_pairs} == set(range(len(world)))  # one per country
    assert {r for _, r in heldout_pairs} == set(RELATIONS)

    facts = {
        r: {str(getattr(c, r)) for c in world} for r in RELATIONS
    }  # every answer is a fact of the world
    assert all(any(r["target"] in facts[k] for k in RELATIONS) for r in heldout_records)
    example = to_example(heldout_records[0])  # the input_target template
    assert example.prompt.startswith("Q: ") and example.prompt.endswith("\nA:")

    # Rewriting unchanged files leaves them alone; another seed gives another set.
    mtime = train.stat().st_mtime_ns
    write_sample_instructions(tmp_path / "a")
    assert train.stat().st_mtime_ns == mtime
    assert split_pairs(1) != split_pairs(0)
