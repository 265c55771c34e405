"""`orchestrator` command line (also `python -m orchestrator`).

orchestrator tokenizer   --input RAW_DIR --output PREFIX [--vocab-size 32000]
orchestrator prepare     --input RAW_DIR --output TOKENS_DIR --tokenizer PREFIX.model [--repair]
orchestrator prepare     --verify TOKENS_DIR   (sizes, checksums, token ids of every chunk)
orchestrator train       --config configs/quickstart.yaml [--section.key value ...]
orchestrator sample-data --out .cache/sample      (built-in corpus -> tokenizer -> tokens)
orchestrator demo                                  (sample data + 2-process CPU training)
orchestrator demo --finetune                       (then finetune it on questions; exact match before/after)
orchestrator config      [--config FILE ...] [--reference]
orchestrator models      [--seq-len N]             (named sizes, parameter counts, FLOPs per token)
orchestrator export      --checkpoint CKPT_OR_RUN_DIR --output HF_DIR [--dtype bfloat16]
orchestrator consolidate CKPT_OR_RUN_DIR [--output FILE]   (any strategy's checkpoint -> one state dict)
orchestrator import      --input HF_DIR --output CKPT_DIR    (then train with --checkpoint.init_from CKPT_DIR)
orchestrator generate    --checkpoint CKPT_OR_RUN_DIR --prompt TEXT [--max-new-tokens 128]
                         [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
orchestrator evaluate    --checkpoint CKPT_OR_RUN_DIR [--data TOKENS_DIR]   (validation perplexity)
orchestrator evaluate    --hf-dir HF_DIR --tasks T1,T2 --include-path TASKS_DIR  (lm-evaluation-harness)
orchestrator plan        --gpu-hours H --device h100 [--gpus 8] | --params 1.1B | --model NAME | --flops C
orchestrator fit         RUN_DIR RUN_DIR ... | STUDY_DIR [--plot fit.png]   (loss vs N and vs C power laws)
orchestrator sweep       --config BASE.yaml --study-dir DIR --grid KEY=V1,V2 ... [--ladder S1,S2 --tokens-per-param 20]
                         [--executor local|slurm] [--parallel N] [--match-params] [--section.key value ...]
orchestrator report      STUDY_DIR [--out DIR]   (table, JSON and plots of a sweep's runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.resources import as_file, files
from pathlib import Path

import yaml

from data.integrity import verify_dataset
from data.prepare import is_prepared, prepare_dataset
from data.sample_corpus import write_sample_corpus
from data.shards import RecordFilter
from data.tokenizer import Tokenizer, install_tokenizer, train_tokenizer
from data.util import parse_count
from models.config import SIZES, model_config
from models.flops import flops_per_token
from orchestrator.checkpoint.layout import checkpoint_step, resolve_checkpoint
from orchestrator.config import Config, load_config
from orchestrator.schema import ConfigError, reference, to_dict
from orchestrator.tools.scaling import (
    COMPUTE_MODES,
    expand_studies,
    fit_families,
    plot,
    read_run,
    report,
    results_dict,
)

# Package data (read through importlib.resources: works from an installed package, no checkout).
# The demo config; configs/quickstart.yaml is a link to it (tests/orchestrator/test_cli.py checks).
QUICKSTART_CONFIG = files("orchestrator") / "resources" / "quickstart.yaml"


def _record_filter(args: argparse.Namespace) -> RecordFilter:
    return RecordFilter(
        text_field=args.text_field,
        exclude_sets=frozenset(args.exclude_set or ()),
        min_chars=args.min_chars,
    )


def cmd_tokenizer(args: argparse.Namespace) -> int:
    if args.existing:
        path = install_tokenizer(args.existing, args.output)
        print(f"Tokenizer {args.existing} checked and copied to {path}")
    else:
        if not args.input:
            print(
                "error: give --input CORPUS to train a tokenizer, or --existing MODEL to use one",
                file=sys.stderr,
            )
            return 2
        path = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            max_sentences=args.max_sentences,
            byte_fallback=not args.no_byte_fallback,
            filter=_record_filter(args),
            num_threads=args.num_threads,
        )
        print(f"Tokenizer written to {path}")
    tok = Tokenizer(path)
    padded = -(-tok.vocab_size // 64) * 64
    print(
        f"vocab_size {tok.vocab_size} (unk={tok.unk_id}, bos={tok.bos_id}, eos={tok.eos_id}); train with "
        f"--data.tokenizer {path} and --model.vocab_size >= {tok.vocab_size} (e.g. {padded}, a multiple of 64)"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`orchestrator prepare --verify DIR`: sizes, checksums and token ids of every chunk."""
    vocab = Tokenizer(args.tokenizer).vocab_size if args.tokenizer else None
    try:
        report = verify_dataset(args.verify, vocab_size=vocab, num_workers=args.num_workers)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in report["splits"].items():
        ids = (
            f"ids < {r['vocab_size']:,}"
            if r["vocab_size"]
            else "ids not checked (no vocab_size recorded; pass --tokenizer)"
        )
        sums = f"crc32 of {r['checksums']}/{r['chunks']} chunks"
        if r["checksums"] < r["chunks"]:
            sums += " (prepared before checksums were recorded: prepare again to add them)"
        state = f"DAMAGED ({len(r['damaged'])} chunks)" if r["damaged"] else "OK"
        print(
            f"{name}: {r['chunks']:,} chunks, {r['bytes']:,} bytes, {r['tokens']:,} tokens: {state} "
            f"(sizes, {sums}, {ids})"
        )
        for chunk, problems in r["damaged"]:
            print(f"  damaged {r['split'].rstrip('/')}/{chunk}: {'; '.join(problems)}")
        if r["fix"]:
            print(f"  {r['fix']}")
    print(f"Verified {args.verify}: {'OK' if report['ok'] else 'DAMAGED'}")
    return 0 if report["ok"] else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.verify:
        return cmd_verify(args)
    needed = [f"--{k}" for k in ("input", "output", "tokenizer") if not getattr(args, k)]
    if needed:
        print(
            f"error: prepare needs {', '.join(needed)} (or --verify DIR to check a prepared dataset)",
            file=sys.stderr,
        )
        return 2
    try:
        stats = prepare_dataset(
            args.input,
            args.output,
            args.tokenizer,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            chunk_bytes=args.chunk_bytes,
            val_every=args.val_every,
            text_field=args.text_field,
            exclude_sets=args.exclude_set or (),
            min_chars=args.min_chars,
            min_tokens=args.min_tokens,
            separator=args.separator,
            progress=not args.no_progress,
            work_dir=args.work_dir,
            format=args.format,
            instruction_format=args.instruction_format,
            max_tokens=args.max_tokens,
            repair=args.repair,
        )
    except PermissionError as e:  # an unwritable output: say so, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.repair:
        repaired = stats.get("repaired", [])
        print(
            f"Repaired {len(repaired)} damaged chunks"
            + (f": {', '.join(repaired)}" if repaired else "")
        )
    print_prepare_stats(stats, args.output)
    if stats.get("format") == "instruction":  # documents are examples; the loss counts responses
        for split, s in stats["splits"].items():
            print(
                f"{split}: {s['docs']:,} instruction examples, {s['loss_tokens']:,} of their "
                f"{s['tokens']:,} tokens in the loss (responses and EOS)"
            )
    return 0


def print_prepare_stats(stats: dict, output: str | Path) -> None:
    if stats.get("finished") is False:
        print(
            f"Prepare unfinished ({stats['parts_done']}/{stats['parts']} parts done); run it again to finish"
        )
        return
    for split, s in stats.get("splits", stats).items():
        if isinstance(s, dict) and "docs" in s:
            skipped = {k: v for k, v in s.get("skipped", {}).items() if v}
            skipped_total = sum(skipped.values())
            print(
                f"{split}: {s['docs']:,} documents, {s['tokens']:,} tokens, {skipped_total:,} records skipped"
                + (f" {skipped}" if skipped_total else "")
            )
    for reason, where in stats.get("skip_locations", {}).items():
        print(f"  {reason}: {', '.join(where[:5])}{' ...' if len(where) > 5 else ''}")
    print(f"Prepared data in {output} (details per file in {output}/prepare_stats.json)")


def prepare_sample(out: Path) -> tuple[Path, Path]:
    """The built-in sample corpus, its tokenizer and token chunks under `out` (idempotent)."""
    raw, tokenizer, tokens = out / "raw", out / "tokenizer.model", out / "tokens"
    if is_prepared(tokens) and tokenizer.is_file():
        print(f"Sample data already prepared in {out}")
        return tokens, tokenizer
    start = time.perf_counter()
    write_sample_corpus(raw)
    if not tokenizer.is_file():
        train_tokenizer(raw / "train", out / "tokenizer", vocab_size=1024)
    stats = prepare_dataset(raw, tokens, tokenizer, num_workers=1)
    print_prepare_stats(stats, tokens)
    print(f"Sample data ready in {time.perf_counter() - start:.1f}s")
    return tokens, tokenizer


def cmd_sample_data(args: argparse.Namespace) -> int:
    prepare_sample(Path(args.out))
    return 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    # imported on use: loads torch/lightning (seconds)
    from orchestrator.train import main as train_main

    return train_main(rest)


def _train_quickstart(overrides: list[str]) -> int:
    """`orchestrator train --config <the quickstart config> OVERRIDES` in a child process."""
    with as_file(QUICKSTART_CONFIG) as config:  # a real file even from a zipped install
        command = [sys.executable, "-m", "orchestrator", "train", "--config", str(config)]
        command += overrides
        print("Running:", " ".join(command), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(command, env=env)


# The demo's model per family (overrides of the quickstart config) and its default run dirs: the
# quickstart decoder, or its RedLLM partner (a size with the decoder's width, heads and about its
# parameter count; models/config.py REDLLM_PAIRS).
DEMO_MODELS = {
    "llama": ([], "runs/demo"),
    "encoder_decoder": (["--model.name", "redllm-tiny"], "runs/demo-redllm"),
}


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    model, default_dir = DEMO_MODELS[args.arch]
    args.run_dir = args.run_dir or default_dir
    args.finetune_dir = args.finetune_dir or f"{args.run_dir}-finetune"
    tokens, tokenizer = prepare_sample(Path(args.data_dir))
    if args.finetune:
        return finetune_demo(args, tokens, tokenizer, model, rest)
    data = ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]
    return _train_quickstart([*data, *model, "--run.dir", args.run_dir, *rest])


# The finetune demo's schedule (overrides of the quickstart config): short (the held-out loss is
# lowest within ~20-60 steps; longer memorises the train questions: 150 steps at lr 1e-3 held out
# 4%, 60 steps at 3e-4 12%), lr 10x below pretraining's 3e-3, blocks of 64 tokens (an example is
# ~20), response-only loss on instruction data.
FINETUNE_OVERRIDES = [
    "--data.document_mask", "true",
    "--train.max_steps", "60", "--train.seq_len", "64",
    "--optimizer.lr", "3.0e-4", "--optimizer.min_lr", "3.0e-5",
    "--schedule.warmup_steps", "5", "--schedule.decay", "cosine",
    "--eval.interval", "20", "--eval.max_batches", "4",
    "--checkpoint.interval", "60", "--checkpoint.keep_last", "1",
]  # fmt: skip


DEMO_ANSWER_TOKENS = 8  # generated per held-out question (the answers are 1-4 tokens)
# The finetune demo's pretraining: `make demo`'s 300 steps leave a model that ranks few of the
# corpus's facts first (measured: 3/24 capitals), so finetuning can teach it the answer format
# but not the answers; at 900 steps it knows most (22/24 capitals) and answers them.
FINETUNE_PRETRAIN_STEPS = 900


def finetune_demo(
    args: argparse.Namespace, tokens: Path, tokenizer: Path, model: list[str], rest: list[str]
) -> int:
    """`orchestrator demo --finetune`: the pretrained demo model (pretrained first when its run dir
    has no checkpoint; `model`: the family's overrides) finetuned on the built-in question set
    (data/sample_instructions.py), with exact-match accuracy on the held-out questions before and
    after. The encoder-decoder reads each question with its encoder and answers with its decoder."""
    from data.sample_instructions import write_sample_instructions
    from orchestrator.tools.evaluate import exact_match  # torch (seconds)

    start = time.perf_counter()
    try:
        done = checkpoint_step(resolve_checkpoint(args.run_dir))
    except FileNotFoundError:
        done = 0
    if done < args.pretrain_steps:  # a new run, or the demo run resumed with more steps
        print(
            f"Pretraining the demo model in {args.run_dir} to step {args.pretrain_steps} first "
            f"(now at step {done}; --pretrain-steps {done} finetunes it as it is)",
            flush=True,
        )
        data = ["--data.dir", str(tokens), "--data.tokenizer", str(tokenizer)]
        steps = ["--train.max_steps", str(args.pretrain_steps)]
        code = _train_quickstart([*data, *model, "--run.dir", args.run_dir, *steps])
        if code != 0:
            return code
    pretrained = resolve_checkpoint(args.run_dir)
    root = Path(args.data_dir) / "instructions"
    _, heldout = write_sample_instructions(root / "raw")
    instr_tokens = root / "tokens"
    stats = prepare_dataset(
        root / "raw", instr_tokens, tokenizer, num_workers=1, format="instruction"
    )
    print_prepare_stats(stats, instr_tokens)

    def accuracy(checkpoint: Path, label: str) -> dict:
        result = exact_match(
            checkpoint, heldout, tokenizer=tokenizer, max_new_tokens=DEMO_ANSWER_TOKENS
        )
        print(
            f"{label}: exact match {result['correct']}/{result['total']} = "
            f"{result['accuracy']:.1%} on held-out questions ({checkpoint})",
            flush=True,
        )
        return result

    before = accuracy(pretrained, "pretrained")
    code = _train_quickstart(
        [
            "--data.dir", str(instr_tokens), "--data.tokenizer", str(tokenizer),
            "--run.dir", args.finetune_dir, "--checkpoint.init_from", str(pretrained),
            # the held-out questions scored in the loop too (eval/heldout/exact_match)
            "--eval.tasks", json.dumps([str(Path(heldout).resolve())]),
            "--eval.max_new_tokens", str(DEMO_ANSWER_TOKENS),
            *model, *FINETUNE_OVERRIDES, *rest,
        ]
    )  # fmt: skip
    if code != 0:
        return code
    after = accuracy(resolve_checkpoint(args.finetune_dir), "finetuned")
    print("Held-out questions (first 8): target | pretrained | finetuned")
    for b, a in list(zip(before["predictions"], after["predictions"]))[:8]:
        question = b["prompt"].removeprefix("Q: ").split("\n", 1)[0]
        print(f"  {question}  {b['target']!r} | {b['answer']!r} | {a['answer']!r}")
    print(
        f"Exact match on {after['total']} held-out questions: {before['accuracy']:.1%} before, "
        f"{after['accuracy']:.1%} after finetuning ({time.perf_counter() - start:.0f}s)"
    )
    return 0


def cmd_config(args: argparse.Namespace, rest: list[str]) -> int:
    if args.reference:
        table = reference_table()
        if args.write:
            replace_marked_block(Path(args.write), table)
            print(f"Config reference written into {args.write}")
        else:
            print(table, end="")
        return 0
    print(yaml.safe_dump(to_dict(load_config(rest)), sort_keys=False), end="")
    return 0


REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"


def reference_table() -> str:
    """Markdown table of every config key (the README's reference is this, verbatim)."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, tp, default, help in reference(Config):
        lines.append(f"| `{key}` | {tp.replace('|', '/')} | `{default}` | {help} |")
    return "\n".join(lines) + "\n"


def replace_marked_block(path: Path, body: str) -> None:
    text = path.read_text()
    if REFERENCE_START not in text or REFERENCE_END not in text:
        raise ValueError(f"{path} has no {REFERENCE_START} ... {REFERENCE_END} block to fill")
    head, rest = text.split(REFERENCE_START, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    path.write_text(f"{head}{REFERENCE_START}\n{body}{REFERENCE_END}{tail}")


def cmd_models(args: argparse.Namespace) -> int:
    from models.config import paired_size

    seq = args.seq_len
    print(
        f"{'name':<18} {'arch':<7} {'params':>15} {'non-embed':>15} {'layers':>6} {'d_model':>7} {'heads':>5} "
        f"{'kv':>3} {'ffn':>6} {'ctx':>5} {'train GFLOP/tok':>15}  pairs with"
    )
    for name in SIZES:
        c = model_config(name)
        encdec = c.arch == "encoder_decoder"
        layers = f"{c.n_layers}+{c.n_layers}" if encdec else str(c.n_layers)  # encoder + decoder
        gflops = flops_per_token(c, seq or c.max_seq_len)["training"] / 1e9  # the family's count
        print(
            f"{name:<18} {'enc-dec' if encdec else 'decoder':<7} {c.num_params():>15,} "
            f"{c.num_non_embedding_params():>15,} {layers:>6} {c.d_model:>7} {c.n_heads:>5} {c.n_kv_heads:>3} "
            f"{c.ffn_hidden:>6} {c.max_seq_len:>5} {gflops:>15.3f}  {paired_size(name) or '-'}"
        )
    print(
        "\nPairs: each redllm-* size (encoder-decoder, RedLLM: models/encdec.py) has the width, heads and ffn of "
        "its decoder partner, tied embeddings, and the layers per stack (encoder+decoder) that bring its "
        "parameter count closest to the partner's (models/config.py, REDLLM_PAIRS)."
    )
    print(
        f"Use a size with --model.name NAME (or model.name in a config). Training FLOPs per token = 3 x forward "
        f"(matmuls + attention over {'--seq-len ' + str(seq) if seq else 'ctx'} tokens; an enc-dec's averaged "
        f"over the block, half of it encoded unless model.encoder_len says otherwise; see models/flops.py)."
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.tools.hf import export_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        out = export_checkpoint(
            ckpt, args.output, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer, dtype=args.dtype,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        )  # fmt: skip
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Exported {ckpt} to {out}")
    print(
        f"Load it with: LlamaForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})"
    )
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.checkpoint.consolidate import consolidate

    consolidate(resolve_checkpoint(args.checkpoint), args.output)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    # imported on use: loads torch/lightning (seconds)
    from orchestrator.tools.hf import import_hf

    try:
        ckpt = import_hf(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Imported {args.input} as checkpoint {ckpt} (model weights only, step 0)")
    print(
        f"Continue pretraining from it: orchestrator train --config {ckpt / 'config.yaml'} --config YOUR_RUN.yaml "
        f"--checkpoint.init_from {ckpt}"
    )
    if (ckpt / "tokenizer.model").is_file():
        print(
            f"Prepare data with its tokenizer: orchestrator prepare --tokenizer {ckpt / 'tokenizer.model'} ..."
        )
    else:
        print(
            "note: the input has no tokenizer.model; prepare data with the sentencepiece model this model uses"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.tools.generate import generate_text

    text = generate_text(
        args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype,
    )  # fmt: skip
    print(text)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    # imported on use: loads torch (seconds)
    from orchestrator.devices import pick_device
    from orchestrator.tools import evaluate as ev

    if args.write_sample_tasks:
        names = ev.write_sample_tasks(args.write_sample_tasks)
        print(
            f"Local harness tasks {', '.join(names)} written to {args.write_sample_tasks}; run them with "
            f"`orchestrator evaluate --hf-dir HF_DIR --tasks {','.join(names)} "
            f"--include-path {args.write_sample_tasks}`"
        )
        if not (args.tasks or args.checkpoint or args.hf_dir):
            return 0
    harness = bool(args.tasks or args.local_task)
    if args.hf_dir and not harness:
        print(
            "error: --hf-dir is for harness tasks: add --tasks NAME (with --include-path) or --local-task FILE",
            file=sys.stderr,
        )
        return 2
    if not harness:
        if not args.checkpoint:
            print(
                "error: give --checkpoint CKPT_OR_RUN_DIR (validation perplexity), or --hf-dir / --checkpoint with "
                "--tasks (lm-evaluation-harness)",
                file=sys.stderr,
            )
            return 2
        result = ev.evaluate_checkpoint(
            args.checkpoint,
            data=args.data,
            split=args.split,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            max_batches=args.max_batches,
            device=args.device,
            dtype=args.dtype,
        )
        print(
            f"{result['checkpoint']} (step {result['step']}) on {result['data']}: loss {result['loss']:.4f} | "
            f"perplexity {result['perplexity']:.3f} | {result['bits_per_token']:.4f} bits/token | "
            f"{result['tokens']:,} tokens in {result['sequences']:,} sequences of {result['seq_len']} "
            f"({result['seconds']:.1f}s)"
        )
    else:
        ev.go_offline()  # before anything imports the hub / datasets libraries
        tasks = [t for t in (args.tasks or "").split(",") if t]
        include = args.include_path
        if args.local_task:
            include = include or tempfile.mkdtemp(prefix="orchestrator-tasks-")
            for path in args.local_task:
                name = Path(path).stem.replace("-", "_").replace(".", "_")
                ev.write_local_task(
                    include, name, path, args.local_task_kind, max_new_tokens=args.max_new_tokens
                )
                tasks.append(name)
        if args.hf_dir:
            hf_dir = Path(args.hf_dir)
        elif args.checkpoint:
            hf_dir = ev.export_for_harness(args.checkpoint)
        else:
            print(
                "error: harness tasks need --hf-dir (an `orchestrator export` output) or --checkpoint",
                file=sys.stderr,
            )
            return 2
        results = ev.run_lm_eval(
            hf_dir,
            tasks,
            include_path=include,
            device=str(pick_device(args.device)),
            batch_size=args.batch_size,
            limit=args.limit,
            dtype="float32" if args.dtype == "auto" else args.dtype,
            model_args=args.model_args,
        )
        print(ev.format_harness_results(results))
        result = {"model": str(hf_dir), "tasks": tasks, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"Results written to {args.json}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # imported on use: loads torch (orchestrator.devices; seconds)
    from orchestrator.tools.plan import DEFAULT_RESULTS, format_plan, make_plan

    plan = make_plan(
        gpu_hours=args.gpu_hours,
        device=args.device,
        params=args.params,
        model=args.model,
        flops=parse_count(args.flops) if args.flops else None,
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        micro_batches=args.micro_batches,
        mfu=args.mfu,
        tokens_per_sec=args.tokens_per_sec,
        tokens_per_param=args.tokens_per_param,
        results=args.results or DEFAULT_RESULTS,
    )
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    runs = [
        read_run(path, metric=args.metric, non_embedding=args.non_embedding, compute=args.compute)
        for path in expand_studies(args.runs)  # a sweep's study dir: its runs that trained
    ]
    families = fit_families(runs)  # one fit per model.arch
    print(report(families, args.compute))
    print(f"Plot: {plot(families, args.plot, args.compute)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results_dict(families, args.compute), indent=2))
        print(f"Fit written to {args.json}")
    return 0


def cmd_sweep(args: argparse.Namespace, rest: list[str]) -> int:
    # imported on use: the sweep's checks load the data stack (seconds)
    from orchestrator.tools.sweep import sweep

    executor_parallel = args.parallel
    if executor_parallel is None:  # local: one at a time; slurm: no limit on running tasks
        executor_parallel = 1 if args.executor == "local" else 0
    return sweep(
        args.study_dir,
        configs=args.config or [],
        overrides=rest,
        grid=args.grid or [],
        ladder=args.ladder,
        tokens_per_param=args.tokens_per_param,
        executor=args.executor,
        parallel=executor_parallel,
        slurm_args=args.slurm_args,
        match_params=args.match_params,
        ffn_multiple=args.ffn_multiple,
        dry_run=args.dry_run,
        wait=args.wait,
    )


def cmd_report(args: argparse.Namespace) -> int:
    # imported on use: matplotlib (and scipy for a ladder's fit)
    from orchestrator.tools.report import write_report

    out = Path(args.out) if args.out else Path(args.study_dir) / "report"
    result = write_report(args.study_dir, out)
    print((out / "report.md").read_text(), end="")
    print(
        f"Report: {out / 'report.md'}, {out / 'report.json'}; plots: "
        + ", ".join(str(out / p["file"]) for p in result["plots"].values())
        + "".join(
            f", {out / f}"
            for f in dict.fromkeys(s["file"] for s in result["scaling"] if "file" in s)
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Pretrain 1B-scale Llama models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_record_filter(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--text-field",
            default="text",
            help="JSON key / Parquet column holding the document (SlimPajama: text, StarCoder: content)",
        )
        p.add_argument(
            "--exclude-set",
            action="append",
            metavar="NAME",
            help="drop documents whose meta.redpajama_set_name is NAME (repeatable), e.g. RedPajamaGithub",
        )
        p.add_argument(
            "--min-chars", type=int, default=0, help="drop documents shorter than this (characters)"
        )

    p = sub.add_parser(
        "tokenizer",
        help="train a sentencepiece BPE tokenizer on a corpus sample, or check and use "
        "an existing one (e.g. Llama 2's tokenizer.model)",
    )
    p.add_argument(
        "--input", help="corpus: a folder (or file) of *.jsonl, *.jsonl.zst, *.jsonl.gz, *.parquet"
    )
    p.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
    p.add_argument(
        "--existing", metavar="MODEL", help="use this sentencepiece .model instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument(
        "--max-sentences",
        type=int,
        default=500_000,
        help="training sample size (document segments), spread over up to 64 files",
    )
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unknown characters to unk instead of UTF-8 byte pieces",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="sentencepiece trainer threads (default: all cores)",
    )
    add_record_filter(p)
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser(
        "prepare", help="tokenize a corpus into litdata token chunks (train/ and val/)"
    )
    p.add_argument(
        "--input",
        help="raw corpus: SlimPajama layout (train/, validation/) or a folder/file of *.jsonl, *.jsonl.zst, "
        "*.jsonl.gz, *.parquet (validation then held out by content hash, see --val-every)",
    )
    p.add_argument("--output", help="output directory or object-store URL (s3://...)")
    p.add_argument(
        "--tokenizer",
        help="sentencepiece .model file (--verify: ids checked against its vocabulary)",
    )
    p.add_argument(
        "--verify",
        metavar="DIR",
        default=None,
        help="check a prepared dataset (prepare output, split or s3:// URL) instead: every chunk's "
        "size, checksum and token ids (within the tokenizer's vocabulary); exit 1 if damaged",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="on a finished output: tokenize again the parts whose chunks are damaged (same "
        "--input, --tokenizer and settings) and put their chunks back",
    )
    p.add_argument(
        "--format",
        default="text",
        choices=["text", "instruction"],
        help="text: pretraining documents (default); instruction: finetuning examples "
        "({input, target}, {instruction, input, output} or {messages}) stored with a "
        "response-only loss mask (data/instructions.py)",
    )
    p.add_argument(
        "--instruction-format",
        default="auto",
        choices=["auto", "input_target", "alpaca", "chat"],
        help="--format instruction: the records' format (default: detected per record from its keys)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="--format instruction: skip (as too_long) examples of more tokens, BOS and EOS "
        "included (e.g. train.seq_len + 1; default 0: no limit)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=max(1, (os.cpu_count() or 1)),
        help="processes (default: cores)",
    )
    p.add_argument(
        "--separator",
        default="bos+eos",
        choices=["bos+eos", "eos", "bos"],
        help="tokens around each document (default: [BOS] text [EOS], as Llama)",
    )
    p.add_argument(
        "--min-tokens", type=int, default=0, help="drop documents with fewer tokens than this"
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=100,
        help="without a validation/ folder: hold out 1 in N documents (by content hash)",
    )
    p.add_argument("--chunk-bytes", default="64MB", help="litdata chunk size")
    p.add_argument(
        "--work-dir",
        default=None,
        help="staging folder (default: OUTPUT/.prepare_work; for URLs "
        "~/.cache/orchestrator/prepare/...)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--overwrite", action="store_true", help="redo a completed output directory")
    add_record_filter(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser(
        "sample-data", help="build the built-in sample corpus, tokenizer and token chunks"
    )
    p.add_argument("--out", default=".cache/sample")
    p.set_defaults(fn=cmd_sample_data)

    p = sub.add_parser(
        "train",
        help="pretrain (args: --config FILE and --section.key value overrides)",
        add_help=False,
    )
    p.set_defaults(fn=cmd_train, takes_rest=True)

    p = sub.add_parser(
        "demo", help="sample data + 2-process CPU pretraining of the quickstart model"
    )
    p.add_argument("--data-dir", default=".cache/sample")
    p.add_argument(
        "--arch",
        choices=sorted(DEMO_MODELS),
        default="llama",
        help="the demo model's family: the quickstart decoder (llama) or its RedLLM partner "
        "(encoder_decoder, redllm-tiny)",
    )
    p.add_argument("--run-dir", default=None, help="run dir (default runs/demo, runs/demo-redllm)")
    p.add_argument(
        "--finetune",
        action="store_true",
        help="finetune the pretrained demo model (--run-dir) on the built-in question set and print "
        "exact-match accuracy on held-out questions before and after",
    )
    p.add_argument(
        "--finetune-dir", default=None, help="with --finetune: run dir (default <run dir>-finetune)"
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=FINETUNE_PRETRAIN_STEPS,
        help="with --finetune: first pretrain the demo model (--run-dir) to this many steps, "
        "resuming it when it has fewer (the demo's 300 leave it knowing few facts to answer "
        f"with; default {FINETUNE_PRETRAIN_STEPS})",
    )
    p.set_defaults(fn=cmd_demo, takes_rest=True)

    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("--reference", action="store_true", help="markdown table of every key")
    p.add_argument(
        "--write",
        metavar="FILE",
        help="with --reference: fill the marked block of FILE (README.md)",
    )
    p.set_defaults(fn=cmd_config, takes_rest=True)

    p = sub.add_parser(
        "models", help="list the named model sizes with parameter counts and FLOPs per token"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for FLOPs (default: each size's ctx)",
    )
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser(
        "export", help="training checkpoint -> Hugging Face LlamaForCausalLM directory"
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir (or run dir: its latest checkpoint)"
    )
    p.add_argument(
        "--output", required=True, help="directory to write (config.json, safetensors, tokenizer)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model (default: data.tokenizer of the run)",
    )
    p.add_argument(
        "--no-tokenizer", action="store_true", help="export the weights and configs only"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (auto: as stored in the checkpoint)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="split safetensors files above this size"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "consolidate",
        help="checkpoint of any strategy (DDP file, FSDP shards, DeepSpeed ZeRO) -> "
        "one full state dict file",
    )
    p.add_argument("checkpoint", help="checkpoint dir (or run dir: its latest checkpoint)")
    p.add_argument(
        "--output",
        default=None,
        help="file to write (default CKPT_DIR/consolidated.pt); torch.load(FILE, weights_only=True)['model']",
    )
    p.set_defaults(fn=cmd_consolidate)

    p = sub.add_parser(
        "import", help="Hugging Face Llama directory -> checkpoint to continue pretraining from"
    )
    p.add_argument(
        "--input", required=True, help="HF model directory (config.json, *.safetensors or *.bin)"
    )
    p.add_argument(
        "--output", required=True, help="checkpoint directory to write (state, config.yaml, ...)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype in the checkpoint (float32: master weights for training)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing imported checkpoint"
    )
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir (or run dir: its latest checkpoint)"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument(
        "--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model (default: data.tokenizer of the run)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser(
        "evaluate",
        help="validation perplexity of a checkpoint; lm-evaluation-harness tasks (local data)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint dir (or run dir: its latest checkpoint)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="prepared dataset (prepare output or split dir); default: the run's validation split",
    )
    p.add_argument("--split", default="val", help="split of --data to read (default val)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-batches", type=int, default=0, help="stop after this many batches (0 = whole split)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--hf-dir",
        default=None,
        help="harness: an `orchestrator export` output (else --checkpoint is "
        "exported to a temporary directory)",
    )
    p.add_argument("--tasks", default=None, help="harness: comma-separated task names")
    p.add_argument(
        "--include-path", default=None, help="harness: directory of task YAML files (local tasks)"
    )
    p.add_argument(
        "--local-task",
        action="append",
        default=None,
        metavar="FILE.jsonl",
        help="harness: make a task of this local JSON-lines file (named after it; may repeat)",
    )
    p.add_argument(
        "--local-task-kind",
        default="perplexity",
        choices=["perplexity", "multiple_choice", "exact_match"],
        help="perplexity: lines {text}; multiple_choice: lines {context, choices, label}; "
        "exact_match: instruction records ({input, target}, alpaca, chat), greedy answers",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="exact_match: most tokens generated per answer (the answer ends at EOS or a newline)",
    )
    p.add_argument(
        "--limit", type=float, default=None, help="harness: documents per task (or a fraction)"
    )
    p.add_argument(
        "--model-args",
        default="",
        help="harness: more key=value,... for its hf model, e.g. "
        "add_bos_token=False for perplexity tasks (README: Evaluate)",
    )
    p.add_argument(
        "--write-sample-tasks",
        metavar="DIR",
        default=None,
        help="write two tiny local harness tasks about the sample corpus into DIR",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser(
        "plan",
        help="compute-optimal model size and tokens (C = 6ND, 20 tokens/parameter) and wall time",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--gpu-hours", type=float, default=None, help="compute budget in GPU-hours (with --device)"
    )
    what.add_argument("--params", default=None, help="target model size, e.g. 1.1B, 400M")
    what.add_argument("--model", default=None, help="a named size (see `orchestrator models`)")
    what.add_argument("--flops", default=None, help="compute budget in FLOPs, e.g. 1.2e20")
    p.add_argument(
        "--device",
        default=None,
        help="h100, h100-pcie, h200, a100 (peak bf16 FLOP/s for budgets and MFU)",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (wall time)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node (default 8): the strategy comparison's node boundary",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches per GPU and step (gradient accumulation) in the strategy comparison",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation to assume (default: measured for the device in the "
        "--results table, else 0.40)",
    )
    p.add_argument(
        "--tokens-per-sec", type=float, default=None, help="measured training tokens/s per GPU"
    )
    p.add_argument(
        "--tokens-per-param", type=float, default=20.0, help="tokens per parameter at the optimum"
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="measured-throughput table to read (markdown, as benchmarks/RESULTS.md; default: the one "
        "shipped with the package, orchestrator/resources/throughput.md)",
    )
    p.add_argument("--json", default=None, help="also write the plan to this JSON file")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser(
        "fit",
        help="fit loss vs parameters and vs compute as power laws over finished runs, one fit per "
        "model family (model.arch); PNG plot",
    )
    p.add_argument("runs", nargs="+", help="run dirs (config.yaml + metrics.jsonl or tensorboard/)")
    p.add_argument(
        "--metric",
        default="val_loss",
        choices=["val_loss", "loss"],
        help="validation loss (default) or training loss",
    )
    p.add_argument(
        "--non-embedding", action="store_true", help="N without embedding and output head (Kaplan)"
    )
    p.add_argument(
        "--compute",
        default="flops",
        choices=COMPUTE_MODES,
        help="training compute C: `flops` (default) = models/flops.py's training FLOPs per token at "
        "the run's seq_len x tokens seen, the same axis for decoders and encoder-decoders; `6nd` = 6 N D",
    )
    p.add_argument(
        "--plot", default="scaling_fit.png", help="PNG to write (every family on one figure)"
    )
    p.add_argument(
        "--json", default=None, help="also write the fits (per family) to this JSON file"
    )
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser(
        "sweep",
        help="a study as one command: a grid (and/or a ladder of sizes) of training runs, run "
        "locally or as a Slurm job array; rerun to resume (args: --section.key value overrides for every run)",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config", action="append", metavar="FILE", help="base config of every run (may repeat)"
    )
    p.add_argument(
        "--study-dir", required=True, help="the study: study.json and one run dir per run"
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a config key and its values (repeatable: the runs are the cartesian product)",
    )
    p.add_argument(
        "--ladder",
        default=None,
        metavar="SIZE1,SIZE2,...",
        help="named model sizes (`orchestrator models`): model.name per run, train.max_steps from "
        "--tokens-per-param",
    )
    p.add_argument(
        "--tokens-per-param",
        type=float,
        default=None,
        help="ladder: tokens = this x parameters (Chinchilla: 20)",
    )
    p.add_argument(
        "--match-params",
        action="store_true",
        help="narrow model.ffn_hidden of each run whose model differs from the baseline (the first "
        "value of every grid key) to the baseline's parameter count (within 0.5%%)",
    )
    p.add_argument(
        "--ffn-multiple",
        type=int,
        default=1,
        help="--match-params: ffn_hidden is a multiple of this",
    )
    p.add_argument("--executor", default="local", choices=["local", "slurm"])
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="local: runs at once (each on its own GPUs; default 1); slurm: array tasks at once "
        "(default: no limit)",
    )
    p.add_argument(
        "--slurm-args",
        default="",
        help='slurm: extra sbatch flags, after the defaults; write it with "=": '
        '--slurm-args="--partition=gpu --time=4:00:00"',
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="slurm: wait until every task has ended, then record the outcomes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every run and write study.json; start nothing",
    )
    p.set_defaults(fn=cmd_sweep, takes_rest=True)

    p = sub.add_parser(
        "report",
        help="a sweep's results: Markdown table, JSON, loss curves, loss vs learning rate, ladder fit",
    )
    p.add_argument("study_dir", help="a study directory of `orchestrator sweep`")
    p.add_argument("--out", default=None, help="directory to write (default STUDY_DIR/report)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_rest", False):
            return args.fn(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
