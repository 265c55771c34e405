"""Exact-match accuracy of a checkpoint on instruction records (orchestrator/tools/evaluate.py
`exact_match`), the harness task of that rule (`--local-task-kind exact_match`) giving the same
numbers, and the wiring of `orchestrator demo --finetune` (training replaced by a stub)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from orchestrator import cli, demo
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
    monkeypatch.setattr(demo, "prepare_sample", lambda out: (out / "tokens", sp_model))
    calls = []

    def fake_train(overrides):  # stands in for the 2-process runs: finetuning copies the checkpoint
        calls.append(overrides)
        if "--checkpoint.init_from" in overrides:
            shutil.copytree(pretrained, finetune_dir / "checkpoints" / pretrained.name)
        return 0

    monkeypatch.setattr(demo, "train_quickstart", fake_train)
    argv = ["demo", "--finetune", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "demo")]
    argv += ["--pretrain-steps", "100"]  # the checkpoint's step: finetuned as it is
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

    # The encoder-decoder partner: its model in both runs, its own run dirs by default.
    calls.clear()
    shutil.rmtree(finetune_dir)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pretrained.parent.parent, tmp_path / "runs" / "demo-redllm")
    finetune_dir = tmp_path / "runs" / "demo-redllm-finetune"
    argv = ["demo", "--finetune", "--arch", "encoder_decoder", "--data-dir", str(data_dir)]
    assert cli.main(argv) == 0  # the default --pretrain-steps: pretrained further first
    pretraining, overrides = calls
    opts = dict(zip(pretraining[::2], pretraining[1::2]))
    assert opts["--run.dir"] == "runs/demo-redllm" and opts["--model.name"] == "redllm-tiny"
    assert opts["--train.max_steps"] == str(cli.FINETUNE_PRETRAIN_STEPS)
    opts = dict(zip(overrides[::2], overrides[1::2]))
    assert opts["--model.name"] == "redllm-tiny"
    assert opts["--run.dir"] == "runs/demo-redllm-finetune"
    assert opts["--eval.tasks"].endswith('heldout.jsonl"]')  # scored in the loop too
    assert opts["--checkpoint.init_from"].endswith(
        f"runs/demo-redllm/checkpoints/{pretrained.name}"
    )


# Records in every format; prompts with newlines, trailing spaces, and one longer than the window
# leaves room for (truncated as the harness truncates a generation context).
PROMPTS = [
    {"input": "Q: What is the capital of Norland?\nA:", "target": "?"},
    {"input": "the model ", "target": "?"},
    {"instruction": "Name the river.", "output": "?"},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "?"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "?"}]},
    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "the step value"},
                  {"role": "assistant", "content": "?"}]},
    {"input": "def f(x):", "target": "?"},
    {"input": " ".join(["the loss of the data"] * 20), "target": "?"},
]  # fmt: skip


def _text_only(model, sp_model, boost: float = 1.3):
    """Never the byte pieces but the newline's, nor the unknown piece, as the argmax: the harness's
    tokenizer decodes those unlike sentencepiece (see orchestrator/tools/evaluate.py); the newline
    and EOS a little more often (answers cut at them)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    newline = sp.piece_to_id("<0x0A>")
    rows = [sp.unk_id(), *(i for i in range(sp.get_piece_size()) if sp.is_byte(i) and i != newline)]
    with torch.no_grad():
        model.lm_head.weight[rows] = 0  # (V, D) rows: logit 0, below the best of the others
        model.lm_head.weight[[newline, sp.eos_id()]] *= boost
    return model


def _with_targets(records, answers, correct):
    """The records with their response set to the model's answer (surrounded by whitespace, which
    is stripped) where `correct`, to a wrong one elsewhere."""
    out = []
    for record, answer, right in zip(records, answers, correct, strict=True):
        target = f"  {answer}\t" if right else "never generated"
        record = json.loads(json.dumps(record))
        if "messages" in record:
            record["messages"][-1]["content"] = target
        else:
            record["output" if "output" in record else "target"] = target
        out.append(record)
    return out


@pytest.mark.parametrize("arch", ["llama", "encoder_decoder"])
def test_the_harness_exact_match_task_scores_as_exact_match(tmp_path, sp_model, monkeypatch, arch):
    """`orchestrator evaluate --local-task FILE --local-task-kind exact_match` (a generate_until
    task: the exported model through the harness's hf model, or the encoder-decoder's checkpoint in
    process) gives exact_match()'s accuracy, on targets that are the model's own answers for some
    records (cut at EOS and newlines, ids past the tokenizer generated by a random model unless
    suppressed)."""
    pytest.importorskip("lm_eval")
    from orchestrator.tools.evaluate import OFFLINE_ENV

    if arch == "llama":  # 416 rows over 400 pieces: padding rows the hf model must suppress
        model = random_model(small_config(), seed=0)
    else:
        model = random_model(small_config(arch="encoder_decoder"), seed=1)
    ckpt = write_checkpoint(tmp_path / "run", _text_only(model, sp_model), sp_model)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    answers = [p["answer"] for p in exact_match(ckpt, probe, max_new_tokens=6)["predictions"]]
    correct = [bool(a) and i % 3 != 1 for i, a in enumerate(answers)]  # a blank target is no record
    assert 2 <= sum(correct) < len(PROMPTS)
    records = tmp_path / "qa-task.jsonl"
    records.write_text(
        "".join(json.dumps(r) + "\n" for r in _with_targets(PROMPTS, answers, correct))
    )
    expected = exact_match(ckpt, records, max_new_tokens=6)
    assert [p["correct"] for p in expected["predictions"]] == correct
    assert [p["answer"] for p in expected["predictions"]] == answers

    for key, value in {**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "results.json"
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run"), "--local-task", str(records),
            "--local-task-kind", "exact_match", "--max-new-tokens", "6", "--batch-size", "1",
            "--include-path", str(tmp_path / "tasks"), "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads(out.read_text())["results"]["qa_task"]
    assert results["exact_match,strip"] == pytest.approx(expected["accuracy"])
    # The task reads the normalised records: the training template's prompt, the stripped target.
    normalised = (tmp_path / "tasks" / "qa_task.prompts.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in normalised] == [
        {"input": p["prompt"], "target": p["target"]} for p in expected["predictions"]
    ]
