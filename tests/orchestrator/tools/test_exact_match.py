"""Exact-match accuracy of a checkpoint on instruction records (orchestrator/tools/evaluate.py
`exact_match`) and the wiring of `orchestrator demo --finetune` (training replaced by a stub)."""

from __future__ import annotations

import json
import shutil

import pytest

from orchestrator import cli
from orchestrator.tools.evaluate import exact_match
from tests.hf_helpers import random_model, small_config, train_sentencepiece, write_checkpoint


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_exact_match_on_a_random_checkpoint_is_a_fraction(tmp_path, sp_model):
    ckpt = write_checkpoint(tmp_path / "run", random_model(small_config()), sp_model)
    records = tmp_path / "qa.jsonl"
    rows = [
        {"input": "Q: What is the capital of Norland?\nA:", "target": "Brenholm"},
        {"instruction": "Name the river.", "output": "the river"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "café"}]},
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = exact_match(ckpt, records, max_new_tokens=4)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["total"] == 3
    assert result["accuracy"] == result["correct"] / 3
    assert [p["target"] for p in result["predictions"]] == ["Brenholm", "the river", "café"]
    assert result["predictions"][0]["prompt"] == rows[0]["input"]
    assert all("\n" not in p["answer"] for p in result["predictions"])
    assert exact_match(tmp_path / "run", records, limit=1)["total"] == 1  # a run dir: its latest


def test_demo_finetune_prepares_questions_and_reports_before_and_after(
    tmp_path, sp_model, monkeypatch, capsys
):
    pretrained = write_checkpoint(tmp_path / "demo", random_model(small_config()), sp_model)
    data_dir, finetune_dir = tmp_path / "sample", tmp_path / "demo-finetune"
    monkeypatch.setattr(cli, "prepare_sample", lambda out: (out / "tokens", sp_model))
    calls = []

    def fake_train(overrides):  # stands in for the 2-process finetuning: copies the checkpoint
        calls.append(overrides)
        shutil.copytree(pretrained, finetune_dir / "checkpoints" / pretrained.name)
        return 0

    monkeypatch.setattr(cli, "_train_quickstart", fake_train)
    argv = ["demo", "--finetune", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "demo")]
    assert cli.main([*argv, "--finetune-dir", str(finetune_dir), "--train.max_steps", "3"]) == 0
    (overrides,) = calls
    opts = dict(zip(overrides[::2], overrides[1::2]))
    assert opts["--checkpoint.init_from"] == str(pretrained)
    assert opts["--data.dir"] == str(data_dir / "instructions" / "tokens")
    assert opts["--data.document_mask"] == "true" and opts["--run.dir"] == str(finetune_dir)
    assert overrides[-2:] == ["--train.max_steps", "3"]  # extra overrides come last, and win
    stats = json.loads((data_dir / "instructions" / "tokens" / "prepare_stats.json").read_text())
    assert stats["format"] == "instruction"
    out = capsys.readouterr().out
    assert "pretrained: exact match" in out and "finetuned: exact match" in out
    assert "held-out questions" in out
