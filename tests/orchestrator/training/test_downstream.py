"""Downstream tasks during training (eval.tasks, orchestrator/training/downstream.py): real 2-process
runs whose in-loop accuracies at the last step are exactly what `orchestrator evaluate --checkpoint
<that checkpoint> --local-task FILE --local-task-kind multiple_choice` (lm-evaluation-harness)
reports, and whose exact match is exactly `exact_match` on that checkpoint (orchestrator/tools/
evaluate.py: what `--local-task-kind exact_match` scores), for both families; logged to
metrics.jsonl and TensorBoard; bad task files refused before anything starts."""

import json

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.tools.evaluate import exact_match, write_sample_tasks
from tests.training import TINY, data_args, train

pytestmark = pytest.mark.slow

# Odd example counts and choice counts: the two ranks have different numbers of forward passes
# to run, so the padding that keeps them in lockstep (DDP buffers, FSDP2 all-gathers) is exercised.
MINE = [
    {"context": "The capital of Norvania is ", "choices": ["far", "near", "here"], "label": 0},
    {"context": "Once upon a time", "choices": ["there was", "a", "the end", "x"], "label": 2},
    {"context": "def add(a, b):", "choices": ["return a + b", "pass"], "label": 0},
    {"context": "17 + 25 =", "choices": ["42", "43"], "label": 1},
    {"context": "", "choices": ["The capital", "A dog"], "label": 0},
]


# Exact match: instruction records of every format, an odd count (the ranks generate for 3 and 2
# examples: the second rank pads with a copy); their targets are set from the starting model.
QUESTIONS = [
    {"input": "The capital of Norvania is", "target": "?"},
    {"instruction": "Name a river.", "output": "?"},
    {"instruction": "Add the numbers.", "input": "17 + 25", "output": "?"},
    {"messages": [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "?"}]},
    {"input": "def add(a, b):\n", "target": "?"},
]  # fmt: skip
NEW_TOKENS = 5  # eval.max_new_tokens and exact_match's max_new_tokens


def _tasks(tmp_path, with_empty_context=True):
    tasks_dir = tmp_path / "tasks"
    write_sample_tasks(tasks_dir)
    mine = tmp_path / "my-task.jsonl"
    docs = MINE if with_empty_context else MINE[:-1]
    mine.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return [tasks_dir / "sample_capitals.jsonl", mine]


def _starting_point(sample_data, tmp_path, *model_args):
    """A random model's checkpoint (the run starts from it: checkpoint.init_from) and an
    exact-match task whose targets are that model's own answers for some questions, so that the
    in-loop score at step 0 is known and not 0: (checkpoint, task file, that score)."""
    from orchestrator.config import load_config
    from tests.hf_helpers import random_model, write_checkpoint

    cfg = load_config([*TINY, *data_args(sample_data), *model_args])
    init = write_checkpoint(tmp_path / "init", random_model(cfg.model, seed=3), sample_data[1])
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    answers = [
        p["answer"] for p in exact_match(init, probe, max_new_tokens=NEW_TOKENS)["predictions"]
    ]
    right = [bool(a) and i != 1 for i, a in enumerate(answers)]  # one never right
    assert sum(right) >= 2, answers
    questions = tmp_path / "questions.jsonl"
    with questions.open("w") as f:
        for question, answer, ok in zip(QUESTIONS, answers, right, strict=True):
            question = json.loads(json.dumps(question))
            target = f" {answer} " if ok else "never generated"  # stripped before comparing
            if "messages" in question:
                question["messages"][-1]["content"] = target
            else:
                question["output" if "output" in question else "target"] = target
            f.write(json.dumps(question) + "\n")
    return init, questions, sum(right) / len(QUESTIONS)


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evaluate(run_dir, task_file, tmp_path, monkeypatch, limit=None):
    """What `orchestrator evaluate --checkpoint RUN --local-task FILE` reports: {metric: value}."""
    from orchestrator.tools.evaluate import OFFLINE_ENV

    for key, value in {**OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)  # what the command sets before the hub libraries load
    out = tmp_path / f"{task_file.stem}.json"
    argv = ["evaluate", "--checkpoint", str(run_dir), "--local-task", str(task_file),
            "--local-task-kind", "multiple_choice", "--device", "cpu", "--json", str(out)]  # fmt: skip
    if limit:
        argv += ["--limit", str(limit)]
    assert cli_main(argv) == 0
    (results,) = json.loads(out.read_text())["results"].values()
    return {k.split(",")[0]: v for k, v in results.items() if "," in k and "_stderr" not in k}


def _check_run(
    run_dir,
    proc,
    task_files,
    tmp_path,
    monkeypatch,
    steps,
    limit=None,
    questions=None,
    at_init=None,
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evals = [r for r in _records(run_dir) if "eval" in r]
    assert [r["step"] for r in evals] == steps
    final = evals[-1]["eval"]
    names = ["sample_capitals", "my_task"]
    assert set(final) == {f"{n}/{m}" for n in names for m in ("acc", "acc_norm")} | {
        "questions/exact_match"
    }
    # The same numbers as `orchestrator evaluate` on the final checkpoint, exactly.
    for name, task_file in zip(names, task_files, strict=True):
        expected = _evaluate(run_dir, task_file, tmp_path, monkeypatch, limit)
        assert expected.keys() == {"acc", "acc_norm"}
        assert {m: final[f"{name}/{m}"] for m in expected} == expected, name
    # Exact match: exact_match's on the final checkpoint, and at step 0 on the starting weights.
    expected = exact_match(run_dir, questions, limit=limit or 0, max_new_tokens=NEW_TOKENS)
    assert final["questions/exact_match"] == expected["accuracy"]
    assert evals[0]["eval"]["questions/exact_match"] == at_init
    # TensorBoard: eval/<task>/<metric> at every validation, equal to the records.
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for key in final:
        logged = [(e.step, e.value) for e in acc.Scalars(f"eval/{key}")]
        assert [(s, pytest.approx(r["eval"][key])) for s, r in zip(steps, evals)] == logged
    # The progress line beside the validation loss.
    assert f"| eval sample_capitals/acc {final['sample_capitals/acc']:.4f} |" in proc.stdout
    return final


def test_in_loop_tasks_equal_orchestrator_evaluate(sample_data, tmp_path, monkeypatch):
    """The decoder, DDP: at eval.at_start (step 0), every eval.interval and the last step."""
    pytest.importorskip("lm_eval")
    task_files = _tasks(tmp_path)
    init, questions, at_init = _starting_point(sample_data, tmp_path)
    run_dir = tmp_path / "run"
    proc = train(
        run_dir, sample_data, "--train.max_steps", "2", "--eval.interval", "2",
        "--checkpoint.init_from", str(init), "--eval.max_new_tokens", str(NEW_TOKENS),
        "--eval.tasks", "[" + ", ".join(str(p) for p in [*task_files, questions]) + "]",
    )  # fmt: skip
    final = _check_run(run_dir, proc, task_files, tmp_path, monkeypatch, steps=[0, 2],
                       questions=questions, at_init=at_init)  # fmt: skip
    assert all(0 <= v <= 1 for v in final.values())
    # The record beside the validation loss of the same step.
    records = _records(run_dir)
    i = next(i for i, r in enumerate(records) if "eval" in r and r["step"] == 2)
    assert records[i - 1]["step"] == 2 and "val_loss" in records[i - 1]
    assert records[i]["tokens_seen"] == 2 * 16 * 64


def test_in_loop_tasks_of_an_encoder_decoder_under_fsdp(sample_data, tmp_path, monkeypatch):
    """The encoder-decoder (scored by `orchestrator evaluate` in process: no HF export), FSDP2
    (uneven forward counts per rank; generation steps that run the decoder alone after the
    multiple-choice passes that run both stacks), eval.task_limit as evaluate's --limit."""
    pytest.importorskip("lm_eval")
    task_files = _tasks(tmp_path, with_empty_context=False)  # its encoder needs a context
    encdec = ["--model.arch", "encoder_decoder", "--model.tie_embeddings", "true"]
    init, questions, at_init = _starting_point(sample_data, tmp_path, *encdec)
    run_dir = tmp_path / "run"
    proc = train(
        run_dir, sample_data, "--train.max_steps", "2", "--eval.interval", "2", *encdec,
        "--strategy.name", "fsdp", "--eval.task_limit", "7", "--checkpoint.init_from", str(init),
        "--eval.max_new_tokens", str(NEW_TOKENS),
        "--eval.tasks", "[" + ", ".join(str(p) for p in [*task_files, questions]) + "]",
    )  # fmt: skip
    _check_run(run_dir, proc, task_files, tmp_path, monkeypatch, steps=[0, 2], limit=7,
               questions=questions, at_init=at_init)  # fmt: skip


def test_tokenisation_is_the_harness(sample_data):
    """encode_pair splits (context, continuation) as lm-eval's TemplateLM does."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import TemplateLM

    from data.tokenizer import Tokenizer
    from orchestrator.training.downstream import encode_pair

    tok = Tokenizer(sample_data[1])

    class Harness(TemplateLM):  # the harness's own loglikelihood(), with our tokenizer adding BOS
        eot_token_id = tok.eos_id
        prefix_token_id = tok.bos_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tok.encode(string, bos=add_special_tokens is not False)

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(context, continuation) for _, context, continuation in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    class Request:
        def __init__(self, *args):
            self.args = args

    pairs = [("The capital of Norvania is", " Krost"), ("The capital of Norvania is  ", "far"),
             ("", "The capital"), ("x", " y z"), ("def add(a, b):\n", "    return a + b")]  # fmt: skip
    expected = Harness().loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)
    assert [encode_pair(tok, *p) for p in pairs] == [tuple(e) for e in expected]


def test_bad_task_files_are_config_errors_before_anything_starts(sample_data, tmp_path, capsys):
    from orchestrator.train import main as train_main

    def refused(task_files, *extra):
        run_dir = tmp_path / "run"
        argv = [*TINY, *data_args(sample_data), "--run.dir", str(run_dir),
                "--eval.tasks", "[" + ", ".join(map(str, task_files)) + "]", *extra]  # fmt: skip
        assert train_main(argv) == 2
        assert not (run_dir / "metrics.jsonl").exists()  # nothing started
        err = capsys.readouterr().err
        assert "eval.tasks" in err
        return err

    missing = tmp_path / "missing.jsonl"
    assert str(missing) in refused([missing])
    perplexity = tmp_path / "docs.jsonl"
    perplexity.write_text(json.dumps({"text": "a document"}) + "\n")
    assert "perplexity document" in refused([perplexity])
    # Neither kind: named with the file and the line its kind is read from.
    neither = tmp_path / "neither.jsonl"
    neither.write_text("\n" + json.dumps({"question": "?", "answer": "!"}) + "\n")
    err = refused([neither])
    assert f"{neither}, line 2: ['answer', 'question'] is neither kind of task" in err
    # An exact-match file (its kind from the first record) with a bad record further down.
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"input": "x"}) + "\n")
    assert f"{questions}, line 2: no instruction record (unknown_format" in refused([questions])
    questions.write_text(
        json.dumps(QUESTIONS[1]) + "\n" + json.dumps({**QUESTIONS[1], "output": " "})
    )
    assert f"{questions}, line 2: no instruction record (empty_response" in refused([questions])
    # Generated tokens that leave no room for a prompt in the window.
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n")
    assert "eval.max_new_tokens <= 62" in refused([questions], "--eval.max_new_tokens", "63")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MINE[0]) + "\n" + json.dumps({**MINE[0], "label": 3}) + "\n")
    assert f"{bad}, line 2: label 3" in refused([bad])
    # Only the first eval.task_limit examples are read (and checked).
    from orchestrator.config import load_config
    from orchestrator.training.downstream import check_tasks

    check_tasks(load_config([*TINY, *data_args(sample_data), "--eval.tasks", f"[{bad}]",
                             "--eval.task_limit", "1"]))  # fmt: skip
    # An empty context leaves the encoder-decoder's encoder nothing to read.
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(MINE[-1]) + "\n")
    encdec = ["--model.arch", "encoder_decoder", "--model.tie_embeddings", "true"]
    assert "non-empty context" in refused([empty], *encdec)
    questions.write_text(json.dumps({"input": "", "target": "x"}) + "\n")  # [BOS] alone
    assert f"{questions}, example 1: an empty prompt" in refused([questions], *encdec)
    # Two files of the same name would be the same task.
    (tmp_path / "a").mkdir()
    assert "rename one" in refused([bad, tmp_path / "a" / "bad.jsonl"])
