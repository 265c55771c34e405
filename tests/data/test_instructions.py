"""Instruction data (data/instructions.py, `prepare --format instruction`): the three record formats'
templates, bad records counted by reason, and the loss flag stored with each token: a prepared
block decodes to the example's tokens and the mask of its response positions."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from data.instructions import (
    LOSS_FLAG,
    BadRecord,
    Example,
    decode,
    detect_format,
    encode_example,
    split_block,
    to_example,
)
from data.loader import make_dataloader, read_documents
from data.prepare import PrepareOptions, prepare_dataset
from data.shards import SKIP_REASONS
from data.tokenizer import Tokenizer

torch.set_num_threads(1)

ALPACA = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
ALPACA_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
PAIR = {"input": "The capital of France is", "target": "Paris."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},  # after the last assistant turn: dropped
    ]
}


# -------------------------------------------------------------------------------------------
# Templates
# -------------------------------------------------------------------------------------------


def test_templates_of_the_three_formats():
    assert [detect_format(r) for r in (PAIR, ALPACA, CHAT, {"text": "x"}, [1])] == [
        "input_target",
        "alpaca",
        "chat",
        None,
        None,
    ]
    assert to_example(PAIR).parts == (("The capital of France is", False), ("Paris.", True))
    # Alpaca: the input part is left out when empty (or missing / null).
    assert to_example(ALPACA).parts == (("Name a colour.\n\n", False), ("Blue", True))
    assert to_example({**ALPACA, "input": None}) == to_example(ALPACA)
    assert to_example({k: v for k, v in ALPACA.items() if k != "input"}) == to_example(ALPACA)
    assert to_example(ALPACA_INPUT).parts == (
        ("Add the numbers.\n\n2 and 3\n\n", False),
        ("5", True),
    )
    # Chat: "<role>: content\n" lines; an assistant's content (and newline) is the response.
    chat = to_example(CHAT)
    assert chat.parts == (
        ("system: Be brief.\nuser: Hi\nassistant:", False),
        ("Hello!\n", True),
        ("user: 2+2?\nassistant:", False),
        ("4\n", True),
    )
    assert chat.prompt == "system: Be brief.\nuser: Hi\nassistant:"
    assert chat.responses == ["Hello!\n", "4\n"]
    # A forced format reads only its own fields.
    assert to_example(ALPACA, "alpaca") == to_example(ALPACA)
    with pytest.raises(BadRecord) as e:
        to_example(ALPACA, "input_target")
    assert e.value.reason == "missing_field"


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ({"text": "plain"}, "auto", "unknown_format"),
        ([1, 2], "auto", "unknown_format"),
        ("a string", "chat", "unknown_format"),
        ({"input": "q", "target": 3}, "auto", "missing_field"),
        ({"input": None, "target": "a"}, "auto", "missing_field"),
        ({"instruction": 1, "output": "a"}, "auto", "missing_field"),
        ({"instruction": "i", "input": 2, "output": "a"}, "auto", "missing_field"),
        ({"messages": "hi"}, "auto", "missing_field"),
        ({"messages": []}, "auto", "missing_field"),
        ({"messages": [{"role": "user"}]}, "auto", "missing_field"),
        ({"messages": [{"role": "assistant", "content": None}]}, "auto", "missing_field"),
        ({"input": "q", "target": " \n"}, "auto", "empty_response"),
        ({"instruction": "i", "output": ""}, "auto", "empty_response"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "auto",
            "empty_response",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "auto", "no_response"),
    ],
)
def test_bad_records_name_their_reason(record, fmt, reason):
    assert reason in SKIP_REASONS
    with pytest.raises(BadRecord) as e:
        to_example(record, fmt)
    assert e.value.reason == reason


def test_encoding_flags_the_response_and_eos():
    def encode(text):  # a stand-in tokenizer: one id per character
        return [3 + ord(c) % 50 for c in text]

    example = Example((("ab", False), ("cd", True), ("e", False), ("f", True)))
    stored = encode_example(example, encode, bos_id=1, eos_id=2)
    assert stored.dtype == np.int32
    ids, mask = decode(stored)
    assert ids.tolist() == [1, *encode("ab"), *encode("cd"), *encode("e"), *encode("f"), 2]
    assert mask.tolist() == [False, False, False, True, True, False, True, True]
    assert (stored[mask] & LOSS_FLAG).all() and not (stored[~mask] & LOSS_FLAG).any()
    # The trainer's split: inputs are the ids, targets the next ids where their flag is set.
    inputs, targets = split_block(torch.from_numpy(stored).long()[None], ignore_index=-100)
    assert inputs[0].tolist() == ids[:-1].tolist()
    assert targets[0].tolist() == [-100, -100, ids[3], ids[4], -100, ids[6], 2]


# -------------------------------------------------------------------------------------------
# Prepare
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    from data.sample_corpus import write_sample_corpus
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("inst_tok")
    write_sample_corpus(root / "raw", train_docs=60, val_docs=10, docs_per_shard=60)
    return train_tokenizer(root / "raw", root / "tok", vocab_size=512)


GOOD = [PAIR, ALPACA, ALPACA_INPUT, CHAT]
MAX_TOKENS = 100
BAD = [
    ('{"input": "q", "target": ', "invalid_json"),
    ("", "blank_line"),
    (json.dumps({"text": "pretraining text"}), "unknown_format"),
    (json.dumps({"input": "q", "target": 7}), "missing_field"),
    (json.dumps({"instruction": "i", "input": "", "output": "  "}), "empty_response"),
    (json.dumps({"messages": [{"role": "user", "content": "alone"}]}), "no_response"),
    (json.dumps({"input": "a long prompt " * 40, "target": "x"}), "too_long"),
]


def variant(record: dict, i: int) -> dict:
    """The record with `i` in its prompt: distinct texts, which the hash holdout spreads over splits."""
    if "messages" in record:
        first = {**record["messages"][0], "content": f"{record['messages'][0]['content']} ({i})"}
        return {"messages": [first, *record["messages"][1:]]}
    key = "instruction" if "instruction" in record else "input"
    return {**record, key: f"{record[key]} ({i})"}


def test_prepare_instruction_data(tokenizer_path, tmp_path):
    """Good and bad records: the bad ones counted by reason (with their lines), the good ones in the
    chunks in input order, each with the loss flag on exactly its response tokens and EOS."""
    good = [variant(r, i) for i in range(6) for r in GOOD]
    lines = [json.dumps(r) for r in good] + [line for line, _ in BAD]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "sft.jsonl").write_text("\n".join(lines) + "\n")
    stats = prepare_dataset(
        PrepareOptions(
            tmp_path / "raw",
            tmp_path / "out",
            tokenizer_path,
            num_workers=1,
            val_every=3,
            format="instruction",
            max_tokens=MAX_TOKENS,
        )
    )
    assert stats["format"] == "instruction" and stats["loss_mask_bit"] == 30
    assert stats["dtype"] == "int32" and stats["separator"] == "bos+eos"
    expected = {reason: 0 for reason in SKIP_REASONS}
    for _, reason in BAD:
        expected[reason] += 1
    assert stats["skipped"] == expected
    assert stats["skip_locations"]["too_long"] == [f"sft.jsonl:{len(good) + len(BAD)}"]
    assert stats["skip_locations"]["blank_line"] == [f"sft.jsonl:{len(good) + 2}"]
    train, val = stats["splits"]["train"], stats["splits"]["val"]
    assert train["docs"] and val["docs"] and stats["docs"] == len(good)
    saved = json.loads((tmp_path / "out" / "prepare_stats.json").read_text())
    assert saved["format"] == "instruction" and saved["loss_mask_bit"] == 30

    tok = Tokenizer(tokenizer_path)
    examples = [to_example(r) for r in good]
    encoded = [encode_example(e, tok._sp.encode, tok.bos_id, tok.eos_id) for e in examples]
    assert max(map(len, encoded)) <= MAX_TOKENS
    held_out = [zlib.crc32(e.text.encode()) % 3 == 0 for e in examples]
    for split, in_val in (("train", False), ("val", True)):
        stored = read_documents(tmp_path / "out" / split)
        want = [(e, x) for e, x, v in zip(examples, encoded, held_out, strict=True) if v == in_val]
        assert [d.tolist() for d in stored] == [x.tolist() for _, x in want]  # ids and flags
        loss_tokens = 0
        for doc, (example, _) in zip(stored, want, strict=True):
            ids, mask = decode(doc)
            prompt = tok.encode(example.prompt)
            assert ids[0] == tok.bos_id and ids[1 : 1 + len(prompt)].tolist() == prompt
            assert not mask[: 1 + len(prompt)].any() and mask[-1] and ids[-1] == tok.eos_id
            # The flagged tokens are the responses' tokens, then the EOS.
            responses = [i for text in example.responses for i in tok.encode(text)]
            assert ids[mask].tolist() == [*responses, tok.eos_id]
            loss_tokens += int(mask.sum())
        assert stats["splits"][split]["loss_tokens"] == loss_tokens


def test_a_loaded_block_decodes_to_tokens_and_response_mask(tokenizer_path, tmp_path):
    """Through the training loader: a block is a slice of the stored stream, flags included."""
    (tmp_path / "raw").mkdir()
    records = [variant(r, i) for i in range(30) for r in GOOD]
    (tmp_path / "raw" / "sft.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    prepare_dataset(
        PrepareOptions(
            tmp_path / "raw",
            tmp_path / "out",
            tokenizer_path,
            num_workers=1,
            val_every=5,
            format="instruction",
        )
    )
    stream = torch.cat(read_documents(tmp_path / "out" / "train"))
    loader = make_dataloader(tmp_path / "out" / "train", 31, 2, shuffle=False, seed=0)
    block = next(iter(loader))  # (2, 32) int64, as stored
    assert block.dtype == torch.int64 and block.tolist() == stream[:64].view(2, 32).tolist()
    ids, mask = decode(block)
    assert int(ids.max()) < 512 and mask.any() and not mask.all()
    assert ((block & LOSS_FLAG) != 0).tolist() == mask.tolist()


def test_instruction_options_are_checked(tokenizer_path, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text(json.dumps(PAIR) + "\n")
    common = dict(num_workers=1, format="instruction")
    with pytest.raises(ValueError, match="separator do not apply to instruction data"):
        prepare_dataset(
            PrepareOptions(
                tmp_path / "raw", tmp_path / "o", tokenizer_path, separator="eos", **common
            )
        )
    with pytest.raises(ValueError, match="instruction data only"):
        prepare_dataset(
            PrepareOptions(tmp_path / "raw", tmp_path / "o", tokenizer_path, max_tokens=10)
        )
    with pytest.raises(ValueError, match="instruction_format must be auto or one of"):
        prepare_dataset(
            PrepareOptions(
                tmp_path / "raw", tmp_path / "o", tokenizer_path, instruction_format="x", **common
            )
        )


def test_orchestrator_prepare_format_instruction(tokenizer_path, tmp_path, capsys):
    from orchestrator.cli import main

    (tmp_path / "raw").mkdir()
    lines = [json.dumps(variant(r, i)) for i in range(10) for r in GOOD]
    lines += [json.dumps({"input": "q"}), json.dumps({"messages": []})]
    (tmp_path / "raw" / "sft.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["prepare", "--input", str(tmp_path / "raw"), "--output", str(out), "--tokenizer",
            str(tokenizer_path), "--num-workers", "1", "--val-every", "4", "--no-progress"]  # fmt: skip
    assert main([*args, "--format", "instruction"]) == 0
    printed = capsys.readouterr().out
    assert "'unknown_format': 1" in printed and "'missing_field': 1" in printed
    assert "instruction examples" in printed and "in the loss (responses and EOS)" in printed
    assert json.loads((out / "prepare_stats.json").read_text())["format"] == "instruction"
    # Forced format: the record without a target is now a missing field.
    # Forced format: every record that is not {input, target} is a missing field.
    forced = ["--format", "instruction", "--instruction-format", "input_target", "--overwrite"]
    assert main([*args, *forced]) == 0
    skipped = json.loads((out / "prepare_stats.json").read_text())["skipped"]
    assert skipped["missing_field"] == 3 * 10 + 2 and skipped["unknown_format"] == 0
    capsys.readouterr()
    assert main([*args[:-1], "--format", "text", "--max-tokens", "5"]) == 2
    assert "instruction data only" in capsys.readouterr().err


def test_a_text_prepare_from_before_the_format_option_is_reused(tokenizer_path, tmp_path):
    """Outputs whose prepare_stats.json predates format / instruction_format / max_tokens are the
    same as text prepares made now: reused, not refused as made with other settings."""
    (tmp_path / "raw").mkdir()
    docs = [{"text": f"document number {i} " * 5} for i in range(40)]
    (tmp_path / "raw" / "a.jsonl").write_text("\n".join(map(json.dumps, docs)) + "\n")
    kwargs = dict(num_workers=1, val_every=4)
    stats = prepare_dataset(
        PrepareOptions(tmp_path / "raw", tmp_path / "out", tokenizer_path, **kwargs)
    )
    assert stats["format"] == "text" and "loss_mask_bit" not in stats
    stats_file = tmp_path / "out" / "prepare_stats.json"
    old = json.loads(stats_file.read_text())
    del old["format"]
    for key in ("format", "instruction_format", "max_tokens"):
        del old["options"][key]
    stats_file.write_text(json.dumps(old))
    assert (
        prepare_dataset(
            PrepareOptions(tmp_path / "raw", tmp_path / "out", tokenizer_path, **kwargs)
        )
        == old
    )
    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset(
            PrepareOptions(
                tmp_path / "raw", tmp_path / "out", tokenizer_path, format="instruction", **kwargs
            )
        )


def test_parquet_instruction_records(tokenizer_path, tmp_path):
    """Parquet rows are records too: Alpaca columns, and a chat's list of {role, content} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "raw").mkdir()
    alpaca = [variant(ALPACA_INPUT, i) for i in range(20)] + [{**ALPACA, "output": None}]
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "raw" / "a.parquet")
    chats = [variant(CHAT, i) for i in range(20)]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "raw" / "b.parquet")
    stats = prepare_dataset(PrepareOptions(
        tmp_path / "raw", tmp_path / "out", tokenizer_path, num_workers=1, val_every=4,
        format="instruction",
    ))  # fmt: skip
    assert stats["docs"] == 40 and stats["skipped_total"] == 1
    assert stats["skip_locations"] == {"missing_field": ["a.parquet:21"]}
    tok = Tokenizer(tokenizer_path)
    stored = read_documents(tmp_path / "out" / "train") + read_documents(tmp_path / "out" / "val")
    want = {
        tuple(encode_example(to_example(r), tok._sp.encode, tok.bos_id, tok.eos_id).tolist())
        for r in alpaca[:-1] + chats
    }
    assert {tuple(d.tolist()) for d in stored} == want
