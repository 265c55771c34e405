"""Data pipeline throughput: `prepare` beside raw sentencepiece encode, and the streaming loader.

    .venv/bin/python benchmarks/data_prep.py            # markdown table
    .venv/bin/python benchmarks/data_prep.py --json     # the same figures as JSON

In one run, on one corpus and one tokenizer:
  raw encode   SentencePieceProcessor.encode(text) over every kept document, texts already in
               memory: the tokenizer's ceiling (the peer). For N workers, N processes encode
               their share at the same time, so the peer runs under the same CPU sharing.
  prepare      data.prepare.prepare_dataset end to end (read + decompress + parse + encode +
               write litdata chunks + merge), with 1 worker and with one per core; tokens/s per
               worker = document tokens (separators excluded, as in raw encode) / best wall time /
               workers. Also per CPU-second of all processes (this one + pool workers): the same
               figure without the effect of other load on a shared machine.
  loader       StreamingDataLoader over the prepared local chunks, seq_len 2048, batch 8,
               shuffled, num_workers=0 (all work in the measuring process): one prepared dataset,
               and the two-source mixture (data.sources, weights 0.693584 / 0.306416)

Corpus (built once under --workdir, deterministic): "slimpajama" = the built-in sample corpus in
SlimPajama's layout (synthetic English-like prose, *.jsonl.zst); "starcoder" = real Python source
files from this virtualenv's site-packages as Parquet with a `content` column. The tokenizer is a
32k BPE (Llama-2 settings) trained on a sample of both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

from data.loader import make_dataloader, make_mixture_loader  # noqa: E402
from data.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from data.sample_corpus import write_sample_corpus  # noqa: E402
from data.shards import RecordFilter, ShardReader, find_shards  # noqa: E402
from data.tokenizer import train_tokenizer  # noqa: E402

SOURCES = {"slimpajama": "text", "starcoder": "content"}  # name -> text field


def build_corpus(work: Path, prose_docs: int, code_files: int, vocab: int) -> Path:
    write_sample_corpus(
        work / "slimpajama",
        seed=0,
        train_docs=prose_docs,
        val_docs=max(200, prose_docs // 50),
        docs_per_shard=2000,
    )
    code = work / "starcoder"
    if not (code / ".complete").is_file():
        shutil.rmtree(code, ignore_errors=True)
        (code / "python").mkdir(parents=True)
        site = Path(torch.__file__).resolve().parent.parent  # site-packages
        files = sorted(p for p in site.rglob("*.py") if 2_000 < p.stat().st_size < 200_000)
        step = max(1, len(files) // code_files)
        texts = []
        for f in files[::step][:code_files]:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
        per = 500
        for i in range(0, len(texts), per):
            pq.write_table(
                pa.table({"content": texts[i : i + per]}),
                code / "python" / f"train-{i // per:05d}.parquet",
                row_group_size=100,
            )
        (code / ".complete").write_text("ok\n")
    tok = work / f"tokenizer{vocab}.model"
    if not tok.is_file():
        # A training sample of both sources (as JSON lines with "text").
        sample = work / "tokenizer_sample"
        shutil.rmtree(sample, ignore_errors=True)
        sample.mkdir()
        for name, field in SOURCES.items():
            docs = []
            for shard in find_shards(work / name):
                if "validation" in shard.parts:
                    continue
                docs += [r.text for r in ShardReader(shard, filter=RecordFilter(text_field=field))]
            payload = "".join(json.dumps({"text": t}) + "\n" for t in docs[::4]).encode()
            (sample / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
        train_tokenizer(
            sample, work / f"tokenizer{vocab}", vocab_size=vocab, max_sentences=200_000, max_files=2
        )
    return tok


def texts_of(path: Path, field: str) -> list[str]:
    """Every document prepare keeps (train and validation), in memory."""
    out = []
    for shard in find_shards(path):
        if "test" in shard.relative_to(path).parts[:1]:
            continue
        out += [r.text for r in ShardReader(shard, filter=RecordFilter(text_field=field))]
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (pool workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _encode_worker(tok: str, texts: list[str], barrier: Any, results: Any) -> None:
    barrier.wait()  # all processes start encoding together
    results.put(raw_encode(Path(tok), texts))


def raw_encode_parallel(tok: Path, texts: list[str], processes: int) -> tuple[int, float, float]:
    """The peer for `processes` prepare workers: as many processes encoding their share of the texts
    at the same time (on a 2-vCPU VM the two vCPUs may share a physical core, which slows both).
    Returns (tokens, mean wall seconds per process, total CPU seconds)."""
    if processes == 1:
        return raw_encode(tok, texts)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_encode_worker, args=(str(tok), texts[i::processes], barrier, results))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    tokens = sum(g[0] for g in got)
    # Per-process rate = tokens / (processes x the slowest process's time): all must finish.
    return tokens, max(g[1] for g in got), sum(g[2] for g in got)


def raw_encode(tok: Path, texts: list[str]) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of encoding every text in this process."""
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    encode = sp.encode
    cpu, start = cpu_seconds(), time.perf_counter()
    n = 0
    for text in texts:
        n += len(encode(text))
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def loader_rate(make, seconds_min: float = 3.0) -> tuple[int, float]:
    tokens, elapsed = 0, 0.0
    loader = make()
    start = time.perf_counter()
    while elapsed < seconds_min:
        for batch in loader:
            tokens += batch.numel()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds_min and tokens:
                break
    return tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of a markdown table"
    )
    parser.add_argument("--workdir", default=".cache/bench_data", help="corpus and tokenizer cache")
    parser.add_argument("--prose-docs", type=int, default=30_000)
    parser.add_argument("--code-files", type=int, default=2_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument(
        "--workers", default=None, help="comma-separated worker counts (default: 1 and cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats of each measurement (best kept)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_corpus(work, args.prose_docs, args.code_files, args.vocab)
    cores = os.cpu_count() or 1
    worker_counts = (
        [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    )

    results: dict = {
        "device": f"{platform.processor() or platform.machine()}, {cores} cores",
        "python": platform.python_version(),
        "versions": {
            m: __import__(m).__version__
            for m in ("torch", "litdata", "sentencepiece", "zstandard", "pyarrow")
        },
        "tokenizer_vocab": args.vocab,
        "load_average_at_start": os.getloadavg(),
        "sources": {},
    }
    for name, field in SOURCES.items():
        texts = texts_of(work / name, field)
        # Interleaved repeats, best of each: the machine may be shared, and a slow repeat says
        # more about the neighbours than about the code. The peer gets the same treatment.
        raw_s: dict[int, list[float]] = {w: [] for w in worker_counts}
        raw_cpu: dict[int, list[float]] = {w: [] for w in worker_counts}
        walls: dict[int, list[float]] = {w: [] for w in worker_counts}
        cpus: dict[int, list[float]] = {w: [] for w in worker_counts}
        for _ in range(args.repeats):
            for w in worker_counts:
                raw_tokens, seconds, cpu = raw_encode_parallel(tok, texts, w)
                raw_s[w].append(seconds)
                raw_cpu[w].append(cpu)
            for w in worker_counts:
                out = work / "out" / f"{name}-w{w}"
                shutil.rmtree(out, ignore_errors=True)
                cpu, start = cpu_seconds(), time.perf_counter()
                stats = prepare_dataset(
                    PrepareOptions(work / name, out, tok, num_workers=w, text_field=field)
                )
                walls[w].append(time.perf_counter() - start)
                cpus[w].append(cpu_seconds() - cpu)  # this process + its pool workers
                doc_tokens = stats["tokens"] - 2 * stats["docs"]  # without the bos/eos separators
                assert doc_tokens == raw_tokens, (
                    doc_tokens,
                    raw_tokens,
                )  # the same text, the same tokens
        entry = {
            "docs": len(texts),
            "input_mb": round(sum(p.stat().st_size for p in find_shards(work / name)) / 1e6, 1),
            "parts": stats["parts"],
            "tokens": raw_tokens,
            "prepare": {},
        }
        for w in worker_counts:
            raw_rate = raw_tokens / min(raw_s[w]) / w  # per process, w processes at once
            raw_cpu_rate = raw_tokens / min(raw_cpu[w])
            per_worker = raw_tokens / min(walls[w]) / w
            per_cpu = raw_tokens / min(cpus[w])
            entry["prepare"][w] = {
                "raw_encode_s": [round(x, 2) for x in raw_s[w]],
                "raw_encode_tokens_per_s_per_process": raw_rate,
                "raw_encode_tokens_per_cpu_s": raw_cpu_rate,
                "wall_s": [round(x, 2) for x in walls[w]],
                "cpu_s": [round(x, 2) for x in cpus[w]],
                "tokens_per_s_per_worker": per_worker,
                "vs_raw_encode": per_worker / raw_rate,
                "tokens_per_cpu_s": per_cpu,
                "cpu_vs_raw_encode": per_cpu / raw_cpu_rate,
            }
        results["sources"][name] = entry

    w = worker_counts[-1]
    prose, code = work / "out" / f"slimpajama-w{w}", work / "out" / f"starcoder-w{w}"
    seq, batch = 2048, 8
    single = max(
        (
            loader_rate(
                lambda: make_dataloader(
                    prose / "train", seq_len=seq, batch_size=batch, shuffle=True, seed=0
                )
            )
            for _ in range(args.repeats)
        ),
        key=lambda r: r[0] / r[1],
    )
    mixture = max(
        (
            loader_rate(
                lambda: make_mixture_loader(
                    [("slimpajama", prose, 0.693584), ("starcoder", code, 0.306416)],
                    seq_len=seq,
                    batch_size=batch,
                    shuffle=True,
                    seed=0,
                )
            )
            for _ in range(args.repeats)
        ),
        key=lambda r: r[0] / r[1],
    )
    results["load_average_at_end"] = os.getloadavg()
    results["loader"] = {
        "seq_len": seq,
        "batch_size": batch,
        "num_workers": 0,
        "single_tokens_per_s": single[0] / single[1],
        "mixture_tokens_per_s": mixture[0] / mixture[1],
    }

    if args.json:
        print(json.dumps(results, indent=2))
        return
    v = results["versions"]
    print(
        f"device: {results['device']} | Python {results['python']} | torch {v['torch']} | litdata {v['litdata']} | "
        f"sentencepiece {v['sentencepiece']} | zstandard {v['zstandard']} | pyarrow {v['pyarrow']} | "
        f"tokenizer: {args.vocab}-piece BPE\n"
    )
    print(
        "| source | docs, input, parts | workers (= raw encode processes) | raw encode tokens/s per process "
        "(best) | prepare wall s (repeats) | prepare tokens/s per worker (best) | vs raw encode | "
        "per CPU-s: raw encode / prepare | vs raw encode |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in results["sources"].items():
        for w, p in e["prepare"].items():
            print(
                f"| {name} | {e['docs']:,} docs, {e['input_mb']} MB, {e['tokens']:,} tokens, {e['parts']} parts | "
                f"{w} | {p['raw_encode_tokens_per_s_per_process']:,.0f} | {', '.join(map(str, p['wall_s']))} | "
                f"{p['tokens_per_s_per_worker']:,.0f} | {100 * p['vs_raw_encode']:.0f}% | "
                f"{p['raw_encode_tokens_per_cpu_s']:,.0f} / {p['tokens_per_cpu_s']:,.0f} | "
                f"{100 * p['cpu_vs_raw_encode']:.0f}% |"
            )
    lo = results["loader"]
    print(
        f"\nloader (seq_len {lo['seq_len']}, batch {lo['batch_size']}, num_workers 0, local chunks): "
        f"one dataset {lo['single_tokens_per_s']:,.0f} tokens/s, "
        f"two-source mixture {lo['mixture_tokens_per_s']:,.0f} tokens/s (per process)"
    )
    print(
        f"load average (1, 5, 15 min) at start {results['load_average_at_start']}, "
        f"at end {results['load_average_at_end']}"
    )


if __name__ == "__main__":
    main()
