"""`orchestrator evaluate`: validation perplexity of a checkpoint, and lm-evaluation-harness on an
exported model with local tasks (no download), checked against our own model's log-likelihoods."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.cli import main as cli_main
from orchestrator.tools.evaluate import evaluate_checkpoint, write_local_task, write_sample_tasks

pytestmark = pytest.mark.slow


def test_validation_perplexity_of_a_checkpoint(monitored_run, sample_data, capsys, tmp_path):
    run_dir, _ = monitored_run
    tokens, _ = sample_data
    result = evaluate_checkpoint(run_dir, data=tokens, batch_size=4)
    assert result["step"] == 6 and result["tokens_seen"] == 6 * 1024
    assert result["checkpoint"].endswith("step-00000006") and result["data"] == str(tokens / "val")
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # The whole split, in order: every token of every full (seq_len + 1)-token block.
    assert result["tokens"] == result["sequences"] * 64
    # The same model on (part of) the same split as the run's own last validation.
    final_val = [
        json.loads(x)
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in x
    ][-1]
    assert result["loss"] == pytest.approx(final_val["val_loss"], abs=0.1)
    # Against a direct computation on the first batches.
    from data.loader import make_dataloader
    from orchestrator.tools.hf import load_model

    model, _ = load_model(run_dir)
    batch = next(
        iter(make_dataloader(tokens / "val", seq_len=64, batch_size=4, shuffle=False, seed=0))
    )
    with torch.no_grad():
        direct = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert evaluate_checkpoint(run_dir, batch_size=4, max_batches=1)["loss"] == pytest.approx(
        direct, rel=1e-5
    )

    out = tmp_path / "eval.json"
    assert (
        cli_main(
            ["evaluate", "--checkpoint", str(run_dir), "--max-batches", "3", "--json", str(out)]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert "(step 6)" in line and "perplexity" in line and "bits/token" in line
    assert json.loads(out.read_text())["sequences"] == 3 * 8


@functools.cache
def _model_and_tokenizer(run_dir, tokenizer_path):
    from data.tokenizer import Tokenizer
    from orchestrator.tools.hf import load_model

    return load_model(run_dir)[0], Tokenizer(tokenizer_path)


def _our_loglikelihoods(run_dir, tokenizer_path, pairs, extra_bos=False):
    """sum log p(continuation | context) under our model, tokenized as the harness does (context
    and continuation encoded together and split after the context's tokens; BOS first).
    `extra_bos`: a second BOS in front, itself scored (the harness's rolling windows, see evaluate.py)."""
    model, tok = _model_and_tokenizer(run_dir, tokenizer_path)
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            whole = [tok.bos_id] * extra_bos + tok.encode(context + continuation, bos=True)
            n_context = len(tok.encode(context, bos=True)) if context else 1
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]  # (T-1, V)
            targets = ids[0, 1:]
            out.append(float(logp[torch.arange(len(targets)), targets][n_context - 1 :].sum()))
    return out


def _bits_per_byte(loglikelihoods, docs):
    return -sum(loglikelihoods) / sum(len(d.encode()) for d in docs) / math.log(2)


DOCS = ["The capital of Norvania is far away.", "17 + 25 = 42", "def add(a, b):\n    return a + b"]


def test_lm_evaluation_harness_on_an_exported_model_with_local_tasks(
    monitored_run, sample_data, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("lm_eval")
    from orchestrator.tools.hf import export_checkpoint

    run_dir, _ = monitored_run
    _, tokenizer = sample_data
    hf_dir = export_checkpoint(run_dir, tmp_path / "hf")  # what `orchestrator export` writes
    tasks_dir = tmp_path / "tasks"
    assert write_sample_tasks(tasks_dir) == ["sample_capitals", "sample_heldout"]
    # A user's own local file as a perplexity task (short documents: one window each).
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    from orchestrator.tools.evaluate import OFFLINE_ENV, run_lm_eval

    for key, value in {**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)  # what the command sets before the hub libraries load
    out = tmp_path / "results.json"
    assert (
        cli_main(
            [
                "evaluate",
                "--hf-dir",
                str(hf_dir),
                "--tasks",
                "sample_capitals,sample_heldout",
                "--include-path",
                str(tasks_dir),
                "--local-task",
                str(mine),
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"sample_capitals", "sample_heldout", "mine"}
    assert "sample_capitals          acc" in printed
    assert math.isfinite(results["sample_heldout"]["word_perplexity,none"])

    # The harness's numbers are our model's. Multiple choice: the same argmax over the choices.
    items = [json.loads(x) for x in (tasks_dir / "sample_capitals.jsonl").read_text().splitlines()]
    correct = 0
    for item in items:
        scores = _our_loglikelihoods(
            run_dir, tokenizer, [(item["context"], " " + c) for c in item["choices"]]
        )
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    assert results["sample_capitals"]["acc,none"] == pytest.approx(correct / len(items))
    # Rolling perplexity with the defaults: after a doubled BOS (lm-eval 0.4.13; see evaluate.py)...
    doubled = _bits_per_byte(
        _our_loglikelihoods(run_dir, tokenizer, [("", d) for d in DOCS], extra_bos=True), DOCS
    )
    assert results["mine"]["bits_per_byte,none"] == pytest.approx(doubled, rel=1e-4)
    # ...and with add_bos_token=False exactly [BOS] + document, as our own perplexity counts it.
    exact = run_lm_eval(hf_dir, ["mine"], include_path=tasks_dir, model_args="add_bos_token=False")
    ours = _bits_per_byte(_our_loglikelihoods(run_dir, tokenizer, [("", d) for d in DOCS]), DOCS)
    assert exact["mine"]["bits_per_byte,none"] == pytest.approx(ours, rel=1e-4)


def test_local_task_files_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="perplexity task needs"):
        write_local_task(tmp_path / "t", "bad", bad, "perplexity")
    with pytest.raises(ValueError, match="multiple-choice task needs"):
        write_local_task(tmp_path / "t", "bad", bad, "multiple_choice")
    with pytest.raises(
        ValueError, match=r"bad.jsonl, line 1: no instruction record \(unknown_format"
    ):
        write_local_task(tmp_path / "t", "bad", bad, "exact_match")
    with pytest.raises(FileNotFoundError):
        write_local_task(tmp_path / "t", "x", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="use perplexity, multiple_choice or exact_match"):
        write_local_task(tmp_path / "t", "bad", bad, "generation")


def test_an_exact_match_task_is_a_generate_until_task(tmp_path):
    """The YAML `--local-task-kind exact_match` writes, and the normalised records it reads."""
    import yaml

    records = tmp_path / "qa.jsonl"
    rows = [{"input": "Q: 2 + 2?\nA:", "target": " 4\n"}, {"instruction": "Say [1, 2].", "output": "[1, 2]"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello "}]}]  # fmt: skip
    records.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = yaml.safe_load(
        write_local_task(tmp_path / "t", "qa", records, "exact_match", 7).read_text()
    )
    assert task["output_type"] == "generate_until" and task["target_delimiter"] == ""
    assert task["doc_to_text"] == "input" and task["doc_to_target"] == "target"
    assert task["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 7}
    strip = [{"function": "remove_whitespace"}, {"function": "take_first"}]  # str.strip, then one
    assert task["filter_list"] == [{"name": "strip", "filter": strip}]
    assert [m["metric"] for m in task["metric_list"]] == ["exact_match"]
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert data == str((tmp_path / "t" / "qa.prompts.jsonl").resolve())
    assert [json.loads(x) for x in Path(data).read_text().splitlines()] == [
        {"input": "Q: 2 + 2?\nA:", "target": "4"},
        {"input": "Say [1, 2].\n\n", "target": "[1, 2]"},
        {"input": "user: hi\nassistant:", "target": "hello"},
    ]


# --------------------------------------------------------------------------------------------
# The encoder-decoder (RedLLM): no Hugging Face export, scored in this process
# --------------------------------------------------------------------------------------------


def _random_encdec(vocab_size: int, seed: int = 0):
    from tests.hf_helpers import random_model, small_config

    cfg = small_config(arch="encoder_decoder", tie_embeddings=True, vocab_size=vocab_size)
    return random_model(cfg, seed)


@torch.no_grad()
def _by_hand(model, context, continuation):
    """log p(continuation tokens) with the model's own encode / decode: the encoder reads the
    context but its last token, the decoder that token and the continuation but its last."""
    ids = torch.tensor([context + continuation])
    P = len(context) - 1
    logits = model.decode(ids[:, P:-1], model.encode(ids[:, :P]), P)[0]  # (C, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[torch.arange(len(continuation)), torch.tensor(continuation)]


def test_continuation_logprobs_of_both_families():
    from orchestrator.evaluation.scoring import continuation_logprobs
    from tests.hf_helpers import random_model, small_config

    model = _random_encdec(416)
    g = torch.Generator().manual_seed(0)
    for n_context, n_continuation in ((2, 1), (5, 3), (17, 9)):
        context = [1, *torch.randint(3, 416, (n_context - 1,), generator=g).tolist()]
        continuation = torch.randint(3, 416, (n_continuation,), generator=g).tolist()
        logp, greedy = continuation_logprobs(model, context, continuation)
        torch.testing.assert_close(
            logp, _by_hand(model, context, continuation), rtol=1e-6, atol=1e-6
        )
        assert not greedy  # random tokens from a random model
    # is_greedy: the model's own greedy continuation is greedy.
    from orchestrator.evaluation.generation import generate

    out = generate(model, torch.tensor([context]), 4, temperature=0)[0].tolist()
    assert continuation_logprobs(model, context, out[len(context) :])[1]
    # A context of BOS alone leaves the encoder nothing; a too-long context loses its first tokens.
    with pytest.raises(ValueError, match="needs >= 2"):
        continuation_logprobs(model, [1], [5, 6])
    long = [1, *range(3, 80)]
    logp, _ = continuation_logprobs(model, long, [5, 6])
    torch.testing.assert_close(logp, _by_hand(model, long[-63:], [5, 6]))
    # The decoder: the logits of model(ids[:-1]), unchanged.
    llama = random_model(small_config())
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = torch.log_softmax(llama(ids[:, :-1])[0, -len(continuation) :], dim=-1)
    expected = logits[torch.arange(len(continuation)), torch.tensor(continuation)]
    torch.testing.assert_close(continuation_logprobs(llama, context, continuation)[0], expected)


def test_validation_perplexity_of_an_encoder_decoder(sample_data, tmp_path):
    """Scored as its validation scores it: the mean loss over the decoder's predictions."""
    from data.loader import make_dataloader
    from tests.hf_helpers import write_checkpoint

    tokens, tokenizer = sample_data
    model = _random_encdec(512)
    ckpt = write_checkpoint(tmp_path / "run", model, tokenizer)
    result = evaluate_checkpoint(ckpt, data=tokens, batch_size=4, seq_len=32, max_batches=2)
    assert (
        result["sequences"] == 8 and result["tokens"] == 8 * 16
    )  # the decoder's half of each block
    loader = make_dataloader(tokens / "val", seq_len=32, batch_size=4, shuffle=False, seed=0)
    batches = [b for _, b in zip(range(2), loader)]
    with torch.no_grad():
        direct = sum(float(model(b[:, :-1], targets=b[:, 1:])) for b in batches) / 2
    assert result["loss"] == pytest.approx(direct, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)


def test_harness_tasks_on_an_encoder_decoder_checkpoint(tmp_path, monkeypatch, capsys):
    """`orchestrator evaluate --checkpoint --tasks` on a checkpoint that cannot be exported: the
    harness's multiple-choice accuracy is the argmax of our encode/decode log-likelihoods."""
    pytest.importorskip("lm_eval")
    from data.tokenizer import Tokenizer
    from orchestrator.tools.evaluate import OFFLINE_ENV, checkpoint_lm, export_for_harness
    from tests.hf_helpers import train_sentencepiece, write_checkpoint

    sp_model = train_sentencepiece(tmp_path / "tok" / "tokenizer.model")
    model = _random_encdec(416, seed=1)
    ckpt = write_checkpoint(tmp_path / "run", model, sp_model)
    assert export_for_harness(tmp_path / "run") == ckpt  # nothing exported
    tasks_dir = tmp_path / "tasks"
    write_sample_tasks(tasks_dir)
    for key, value in {**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "results.json"
    argv = ["evaluate", "--checkpoint", str(tmp_path / "run"), "--tasks", "sample_capitals",
            "--include-path", str(tasks_dir), "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert "sample_capitals          acc" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]

    tok = Tokenizer(sp_model)
    items = [json.loads(x) for x in (tasks_dir / "sample_capitals.jsonl").read_text().splitlines()]
    correct = 0
    for item in items:  # tokenized as the harness does: together, split after the context's tokens
        n_context = len(tok.encode(item["context"], bos=True))
        scores = []
        for choice in item["choices"]:
            whole = tok.encode(item["context"] + " " + choice, bos=True)
            scores.append(float(_by_hand(model, whole[:n_context], whole[n_context:]).sum()))
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    assert results["sample_capitals"]["acc,none"] == pytest.approx(correct / len(items))

    # Generation tasks (exact match): greedy, the continuation decoded alone (as the hf model
    # decodes it), cut at the stop sequences.
    from types import SimpleNamespace

    from orchestrator.evaluation.generation import generate

    lm = checkpoint_lm(ckpt)
    request = SimpleNamespace(args=("The capital of", {"until": ["\n"], "max_gen_toks": 6}))
    ids = tok.encode("The capital of", bos=True)
    new = generate(model, torch.tensor([ids]), 6, temperature=0, eos_id=2, vocab_limit=400)
    new = new[0, len(ids) :].tolist()
    new = new[: new.index(2)] if 2 in new else new
    expected = tok.decode(new).split("\n")[0]
    assert lm.generate_until([request]) == [expected]
    # A prompt longer than the window leaves room for: its first tokens dropped, as the hf model does.
    long = " ".join(["The capital of"] * 40)
    request = SimpleNamespace(args=(long, {"until": ["\n"], "max_gen_toks": 6}))
    ids = tok.encode(long, bos=True)[-(64 - 6) :]
    new = generate(model, torch.tensor([ids]), 6, temperature=0, eos_id=2, vocab_limit=400)
    new = new[0, len(ids) :].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert lm.generate_until([request]) == [tok.decode(new).split("\n")[0]]
    # Rolling perplexity needs an empty encoder: refused, naming the alternative.
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    argv = ["evaluate", "--checkpoint", str(ckpt), "--local-task", str(mine), "--device", "cpu"]
    assert cli_main(argv) == 2
    assert "orchestrator evaluate --checkpoint" in capsys.readouterr().err
