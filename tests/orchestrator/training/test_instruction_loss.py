"""Instruction finetuning in the decoder's trainer: the response-only loss (prompt targets take no
part), packed examples that do not attend to each other (through the trainer's decode and document
ids), the config checks on instruction data, and short 2-process runs on a prepared instruction set
(they train, log a loss, and resume bitwise)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from data.documents import DocumentBoundary
from data.instructions import LOSS_FLAG, TOKEN_MASK, Example, encode_example
from models.build import build_model
from models.config import model_config
from models.kernels import IGNORE_INDEX
from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.data import data_formats, model_batch, packing_arguments
from tests.training import TINY, step_records, train

torch.set_num_threads(1)

BOS, EOS = 1, 2
# The boundary the trainer reads from an instruction prepare's prepare_stats.json.
BOUNDARY = DocumentBoundary.from_stats({"separator": "bos+eos", "bos_id": BOS, "eos_id": EOS})
EXAMPLES = [
    Example((("Translate to French: cat", False), ("chat", True))),
    Example(
        (
            ("user: hi\nassistant:", False),
            ("hello\n", True),
            ("user: and?\nassistant:", False),
            ("ok\n", True),
        )
    ),
    Example((("2+2=", False), ("4", True))),
]


def encode(text: str) -> list[int]:  # a stand-in tokenizer: one id in 3..122 per character
    return [3 + (ord(c) * 7) % 120 for c in text]


def stored(examples: list[Example]) -> torch.Tensor:
    """The examples packed one after another as prepare stores them: (1, N) int64, loss flags on."""
    arr = np.concatenate([encode_example(e, encode, BOS, EOS) for e in examples])
    return torch.from_numpy(arr).long()[None]


FAMILIES = ["llama", "encoder_decoder"]


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = model_config(
        "tiny" if arch == "llama" else "redllm-tiny", n_layers=2, vocab_size=128, max_seq_len=128,
        d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=172,
    )  # fmt: skip
    return build_model(cfg).eval()


def loss_of(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as the trainer computes it (its packing arguments; the encoder-decoder: each
    example's prompt to the encoder, its response to the decoder)."""
    packing = packing_arguments(model.cfg, inputs, targets, BOUNDARY, True, "cpu")
    with torch.no_grad():
        return model(inputs, targets=targets, **packing)


def logits_of(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    packing = packing_arguments(model.cfg, inputs, targets, BOUNDARY, True, "cpu")
    with torch.no_grad():
        return model(inputs, **packing)  # (1, T, V)


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_loss_counts_response_targets_only(arch):
    model = tiny_model(arch)
    block = stored(EXAMPLES)
    inputs, targets, count = model_batch(block, instruction=True)
    ids, flags = block & TOKEN_MASK, (block & LOSS_FLAG) != 0
    assert torch.equal(inputs, ids[:, :-1]) and int(inputs.max()) < 128
    assert count == int(flags[:, 1:].sum()) == int((targets != IGNORE_INDEX).sum())
    assert torch.equal(targets[flags[:, 1:]], ids[:, 1:][flags[:, 1:]])
    loss = loss_of(model, inputs, targets)
    assert torch.isfinite(loss)

    prompt = [j for j in range(2, block.shape[1]) if not flags[0, j] and ids[0, j] != BOS]
    response = [j for j in range(1, block.shape[1]) if flags[0, j] and ids[0, j] != EOS]
    assert prompt and response
    for j in prompt:  # another prompt token as the target of position j-1: the same loss, bitwise
        changed = block.clone()
        changed[0, j] = 3 + (int(ids[0, j]) + 1 - 3) % 120
        _, changed_targets, _ = model_batch(changed, instruction=True)
        assert torch.equal(loss_of(model, inputs, changed_targets), loss)
    for j in response[:3]:  # another response token as a target: another loss
        changed = block.clone()
        changed[0, j] = (3 + (int(ids[0, j]) + 1 - 3) % 120) | LOSS_FLAG
        _, changed_targets, _ = model_batch(changed, instruction=True)
        assert not torch.equal(loss_of(model, inputs, changed_targets), loss)
    # ...and the flag decides: counting a prompt target changes the loss.
    flagged = block.clone()
    flagged[0, prompt[0]] |= LOSS_FLAG
    _, flagged_targets, n = model_batch(flagged, instruction=True)
    assert n == count + 1 and not torch.equal(loss_of(model, inputs, flagged_targets), loss)


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_block_without_a_response_target_keeps_a_finite_loss(arch):
    block = stored([Example((("only prompt", False), ("x", True)))]) & TOKEN_MASK  # no flags
    inputs, targets, count = model_batch(block, instruction=True)
    assert count == 0 and int((targets != IGNORE_INDEX).sum()) == 1  # weighed 0 by the trainer
    assert torch.isfinite(loss_of(tiny_model(arch), inputs, targets))


@pytest.mark.parametrize("arch", FAMILIES)
def test_packed_examples_do_not_attend_to_each_other(arch):
    model = tiny_model(arch)
    block = stored(EXAMPLES)
    inputs, targets, count = model_batch(block, instruction=True)
    doc_ids = BOUNDARY.ids(inputs)
    assert doc_ids[0].unique().tolist() == [1, 2, 3]
    logits = logits_of(model, inputs, targets)  # (1, T, V)
    # A prompt token of the middle example changed: the others' logits are bitwise the same.
    middle = (doc_ids[0] == 2).nonzero().flatten()
    changed = block.clone()
    j = int(middle[3])
    changed[0, j] = 3 + (int(changed[0, j]) + 1 - 3) % 120
    changed_inputs, changed_targets, _ = model_batch(changed, instruction=True)
    assert torch.equal(BOUNDARY.ids(changed_inputs), doc_ids)
    changed_logits = logits_of(model, changed_inputs, changed_targets)
    others = doc_ids[0] != 2
    assert torch.equal(changed_logits[0, others], logits[0, others])
    assert not torch.equal(
        changed_logits[0, j:][doc_ids[0, j:] == 2], logits[0, j:][doc_ids[0, j:] == 2]
    )

    # The packed loss is the token-weighted mean of each example's loss on its own.
    packed = float(loss_of(model, inputs, targets))
    losses, counts = [], []
    for example in EXAMPLES:
        alone_inputs, alone_targets, n = model_batch(stored([example]), instruction=True)
        losses.append(float(loss_of(model, alone_inputs, alone_targets)))
        counts.append(n)
    assert sum(counts) == count
    weighted = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / count
    assert abs(packed - weighted) < 1e-5


# -------------------------------------------------------------------------------------------
# Config checks
# -------------------------------------------------------------------------------------------


def _prepared(root, fmt):
    """A stand-in prepare output: train/ and val/ with an index.json, and its prepare_stats.json."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "index.json").write_text("{}")
    stats = {"separator": "bos+eos", "bos_id": BOS, "eos_id": EOS}
    if fmt is not None:
        stats["format"] = fmt
    (root / "prepare_stats.json").write_text(json.dumps(stats))
    return root


def test_instruction_data_is_checked_against_the_config(tmp_path):
    sft, text, old = (
        _prepared(tmp_path / "sft", "instruction"),
        _prepared(tmp_path / "text", "text"),
        _prepared(tmp_path / "old", None),  # written before "format" existed: text
    )
    assert data_formats(load_config(["--data.dir", str(text)])) == ("text", "text")
    assert data_formats(load_config(["--data.dir", str(old)])) == ("text", "text")
    masked = ["--data.document_mask", "true"]
    assert data_formats(load_config(["--data.dir", str(sft), *masked])) == (
        "instruction",
        "instruction",
    )
    # Pretraining on text, validating on instruction data (its loss over the responses).
    both = ["--data.dir", str(text), "--data.val_dir", str(sft / "val"), *masked]
    assert data_formats(load_config(both)) == ("text", "instruction")
    with pytest.raises(
        ConfigError, match=r"data\.document_mask=true \(--data\.document_mask true\)"
    ):
        data_formats(load_config(["--data.dir", str(sft)]))
    redllm = ["--data.dir", str(sft), "--model.name", "redllm-tiny"]
    assert data_formats(load_config([*redllm, *masked])) == ("instruction", "instruction")
    with pytest.raises(ConfigError, match=r"data\.document_mask=true"):
        data_formats(load_config(redllm))
    mixed = f"[{{name: sft, dir: {sft}, weight: 1}}, {{name: web, dir: {text}, weight: 1}}]"
    with pytest.raises(ConfigError, match=r"data\.sources mixes pretraining text and instruction"):
        data_formats(load_config(["--data.sources", mixed, *masked]))


# -------------------------------------------------------------------------------------------
# Training runs (2 gloo processes)
# -------------------------------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "house", "light"]
    out = []
    for i in range(n):
        a, b, w = rng.randint(0, 99), rng.randint(0, 99), rng.choice(words)
        kind = i % 3
        if kind == 0:
            out.append({"input": f"What is {a} + {b}?", "target": f"{a + b}"})
        elif kind == 1:
            out.append(
                {"instruction": "Repeat the word twice.", "input": f"{w} {i}", "output": f"{w} {w}"}
            )
        else:
            out.append({"messages": [{"role": "user", "content": f"Say {w} ({i})."},
                                     {"role": "assistant", "content": f"{w}."}]})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def instruction_data(sample_data, tmp_path_factory):
    """A small instruction set prepared with the sample data's tokenizer."""
    from data.prepare import PrepareOptions, prepare_dataset

    _, tokenizer = sample_data
    root = tmp_path_factory.mktemp("sft")
    (root / "raw").mkdir()
    (root / "raw" / "sft.jsonl").write_text("\n".join(map(json.dumps, _records(600))) + "\n")
    stats = prepare_dataset(
        PrepareOptions(
            root / "raw",
            root / "tokens",
            tokenizer,
            num_workers=1,
            val_every=5,
            format="instruction",
        )
    )
    assert stats["format"] == "instruction" and stats["splits"]["val"]["tokens"] > 4 * 2 * 65
    return root / "tokens", tokenizer


# The decoder under DDP; the encoder-decoder (prompt -> encoder, response -> decoder) under FSDP2.
FAMILY_RUNS = {
    "llama": (),
    "encoder_decoder": ("--model.name", "redllm-tiny", "--strategy.name", "fsdp"),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_instruction_training_runs_and_resumes_bitwise(arch, instruction_data, tmp_path, capsys):
    from orchestrator.train import main as train_main

    tokens, tokenizer = instruction_data
    data = ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]
    family = FAMILY_RUNS[arch]
    # Refused before anything starts without document masking.
    assert train_main([*TINY, *family, *data, "--run.dir", str(tmp_path / "refused")]) == 2
    assert "data.document_mask=true" in capsys.readouterr().err

    args = (*family, "--data.document_mask", "true", "--train.max_steps", "4",
            "--eval.interval", "2", "--checkpoint.interval", "2")  # fmt: skip
    straight = tmp_path / "straight"
    train(straight, instruction_data, *args)
    records = step_records(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 10 for r in records)  # finite, around ln(512) = 6.2 at the start
    summary = json.loads((straight / "summary.json").read_text())
    assert 0 < summary["final_val_loss"] < 10

    # `orchestrator evaluate --checkpoint` reads instruction data as validation does: the loss
    # over the responses' targets, examples apart (the encoder-decoder: prompts encoded).
    from data.loader import make_dataloader
    from orchestrator.tools.evaluate import evaluate_checkpoint
    from orchestrator.tools.hf import load_model

    result = evaluate_checkpoint(straight, data=tokens, batch_size=4, max_batches=2)
    model, _ = load_model(straight)
    loader = make_dataloader(
        tokens / "val", seq_len=result["seq_len"], batch_size=4, shuffle=False, seed=0
    )
    total = counted = 0
    for _, block in zip(range(2), loader):
        inputs, targets, n = model_batch(block.long(), instruction=True)
        total += float(loss_of(model, inputs, targets)) * n
        counted += n
    assert result["tokens"] == counted > 0
    assert result["loss"] == pytest.approx(total / counted, rel=1e-6)

    # The step-2 checkpoint in a new run directory: steps 3 and 4 again, bitwise.
    resumed = tmp_path / "resumed"
    shutil.copytree(
        straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002"
    )
    proc = train(resumed, instruction_data, *args)
    assert "Resumed from" in proc.stdout and "step 2" in proc.stdout
    again = step_records(resumed)
    assert [r["step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in records[2:]]
    assert [r["batch_hashes"] for r in again] == [r["batch_hashes"] for r in records[2:]]
