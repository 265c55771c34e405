"""The data path at SlimPajama scale: loader start-up and memory against the size of the index,
streaming from an S3-compatible server (cold and warm cache) beside local reads, and resume time
against the position in the epoch.

    .venv/bin/python benchmarks/data_scale.py                      # markdown tables (~5 min, 2 vCPUs)
    .venv/bin/python benchmarks/data_scale.py --json out.json      # also the figures as JSON
    .venv/bin/python benchmarks/data_scale.py --chunks 1000,5000 --tokens 5000000 --repeats 1

SlimPajama-627B prepared at the default chunk size (64 MB of uint16 tokens, ~32M tokens a chunk)
is ~20k chunks per split; a few such corpora mixed, or a smaller chunk size, is tens of thousands.
In one run, under --workdir (a temp dir by default, removed at the end):

  start-up   synthetic splits of N chunks (--chunks): a valid litdata index.json of N entries,
             each a real ~32M-token chunk by the layout (items of 16,384 tokens, the header
             `uint32 num_items, uint32 offsets[num_items+1]`, then the tokens); the N chunk files
             are symlinks to one real chunk (random tokens), so nothing near N x 64 MB is written.
             Each figure comes from a fresh child process (this script in --worker mode): imports,
             then `make_dataloader(shuffle=True, seq_len 2048, batch 8)` + `next(iter(loader))`,
             with num_workers 0 and 2 (world size 1); peak RSS (VmHWM) and private memory (USS,
             smaps_rollup) of the main process and of each DataLoader worker (its forked children,
             read while they live); the size of `loader.state_dict()` (torch.save'd, as in a
             checkpoint); and `read_index` alone (time, RSS it adds). Per 1k chunks: the
             least-squares slope over the N measured.
  streaming  --tokens random uint16 tokens in chunks of --stream-chunk-mb, local and uploaded to
             tests/s3_server.py's S3Server (moto's server mode, a real HTTP server on loopback):
             tokens/s delivered to the measuring process (the training rank) from the local dir,
             from the URL with a fresh cache dir (cold: one epoch, every chunk downloaded once) and
             again with the same cache dir (warm: a new loader, chunks already local), num_workers
             0 and 2; each timed from iter() to the last batch, warm and local for >= --min-seconds.
             Peer in the same run: raw boto3 GETs of the same chunk objects, one after the other.
  resume     a fresh loader, `load_state_dict(state)`, `next(iter(loader))`, timed, for states
             taken after k batches of a real iteration (--positions) and states synthesized for
             late positions (--fractions of the epoch; the synthesized states are checked equal to
             the real ones at the iterated positions). On the local streaming split (real tokens:
             the resumed batch is checked bitwise against the batch the iteration gave next) and
             on the largest synthetic index, one child process each. Also litdata's elastic
             resume (state saved with num_workers 2, resumed with 0: a topology change, as after a
             change of world size) on small synthetic indexes (--elastic-chunks), in child
             processes under a time limit, extrapolated linearly to the largest --chunks.

Times are the best of --repeats (interleaved); memory is the median.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

# torch, litdata and data.loader are imported where they are used: a --worker child times its
# own imports, and its memory baseline is taken after them.

RESULT_MARK = "DATA_SCALE_RESULT "
ITEM_TOKENS = 16_384  # tokens per litdata item, as data/prepare.py writes them
TOKEN_BYTES = 2  # uint16


# -- chunks and indexes ------------------------------------------------------------------------


def _header(dim: int, item_tokens: int) -> np.ndarray:
    """litdata's chunk header for `dim` tokens in items of `item_tokens`: num_items, offsets."""
    n_items = max(1, -(-dim // item_tokens))
    header_bytes = (2 + n_items) * 4
    ends = np.minimum(np.arange(n_items + 1, dtype=np.int64) * item_tokens, dim)
    return np.concatenate([[n_items], header_bytes + ends * TOKEN_BYTES]).astype(np.uint32)


def write_chunk(path: Path, tokens: np.ndarray, item_tokens: int = ITEM_TOKENS) -> dict[str, Any]:
    """One litdata chunk of uint16 `tokens`; returns its index.json entry."""
    header = _header(len(tokens), item_tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype=np.uint16).tobytes())
    return {
        "chunk_bytes": header.nbytes + len(tokens) * TOKEN_BYTES,
        "chunk_size": int(header[0]),
        "dim": len(tokens),
        "filename": path.name,
    }


def litdata_config(work: Path) -> dict[str, Any]:
    """The index `config` litdata's own writer (the one data/prepare.py uses) gives uint16
    TokensLoader chunks, after checking that write_chunk writes the same bytes it does."""
    import torch
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    tokens = np.random.default_rng(0).integers(0, 32_000, size=3 * 1000, dtype=np.uint16)
    writer = BinaryWriter(str(probe / "litdata"), chunk_bytes=1 << 20, item_loader=TokensLoader())
    for i in range(3):
        writer.add_item(i, torch.from_numpy(tokens[i * 1000 : (i + 1) * 1000]))
    writer.done()
    real = json.loads((probe / "litdata" / "0.index.json").read_text())
    (entry,) = real["chunks"]
    ours = write_chunk(probe / entry["filename"], tokens, item_tokens=1000)
    if (
        ours != entry
        or (probe / entry["filename"]).read_bytes()
        != (probe / "litdata" / entry["filename"]).read_bytes()
    ):
        raise RuntimeError(f"write_chunk disagrees with litdata's BinaryWriter: {ours} != {entry}")
    shutil.rmtree(probe)
    return real["config"]


def write_index(d: Path, chunks: list[dict[str, Any]], config: dict[str, Any], chunk_bytes: int):
    index = {"chunks": chunks, "config": {**config, "chunk_bytes": chunk_bytes}, "updated_at": "0"}
    (d / "index.json").write_text(json.dumps(index, sort_keys=True))  # as data/prepare.py writes it


def make_synthetic_split(
    d: Path, n_chunks: int, chunk_tokens: int, config: dict, template: Path
) -> None:
    """A split of `n_chunks` chunks of `chunk_tokens` tokens, every chunk file a symlink to
    `template` (one real chunk of that size); named like prepare's (chunk-<part>-<n>.bin)."""
    d.mkdir(parents=True)
    header = _header(chunk_tokens, ITEM_TOKENS)
    entry = {
        "chunk_bytes": header.nbytes + chunk_tokens * TOKEN_BYTES,
        "chunk_size": int(header[0]),
        "dim": chunk_tokens,
    }
    chunks = []
    for i in range(n_chunks):
        name = f"chunk-{i // 64}-{i % 64}.bin"  # 64 chunks per prepare part (~4 GB of input)
        os.symlink(template, d / name)
        chunks.append({**entry, "filename": name})
    write_index(d, chunks, config, entry["chunk_bytes"])


def synthetic_template(work: Path, chunk_tokens: int) -> Path:
    """The one real chunk (random tokens) every synthetic chunk file links to, written once."""
    path = work / "synthetic" / "template.bin"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        write_chunk(path, rng.integers(0, 32_000, size=chunk_tokens, dtype=np.uint16))
    return path


def make_stream_split(d: Path, tokens: int, chunk_tokens: int, config: dict) -> int:
    """`tokens` random uint16 tokens in chunks of `chunk_tokens`; returns the number of chunks."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    chunks, start, n = [], 0, 0
    while start < tokens:
        size = min(chunk_tokens, tokens - start)
        data = rng.integers(0, 32_000, size=size, dtype=np.uint16)
        chunks.append(write_chunk(d / f"chunk-0-{n}.bin", data))
        start, n = start + size, n + 1
    write_index(d, chunks, config, chunk_tokens * TOKEN_BYTES)
    return n


# -- process memory ----------------------------------------------------------------------------


def proc_memory(pid: int | str = "self") -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS and USS (private pages) of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    try:
        uss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
        out["USS"] = uss / 1024
    except OSError:
        pass
    return out


def forked_children(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run the same command line (forked DataLoader
    workers, not helpers such as multiprocessing's resource tracker)."""
    mine = Path(f"/proc/{pid}/cmdline").read_bytes()
    kids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and (p / "cmdline").read_bytes() == mine:
                kids.append(int(p.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(kids)


# -- child processes (--worker) ----------------------------------------------------------------


def run_child(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run this script with `--worker spec` in a fresh process; its result (or why none came)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "process_s": timeout}
    wall = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK) :]), "process_s": wall}
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", "process_s": wall}


def worker_main(spec: dict[str, Any]) -> None:
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from data import loader as data_loader

    imported = time.perf_counter()
    result = {"import_s": imported - started}
    result.update(WORKER_MODES[spec["mode"]](spec, data_loader))
    print(RESULT_MARK + json.dumps(result), flush=True)


def _startup(spec: dict[str, Any], dl: Any) -> dict[str, Any]:
    import torch

    before = proc_memory()
    t0 = time.perf_counter()
    loader = dl.make_dataloader(
        spec["data"],
        spec["seq_len"],
        spec["batch"],
        shuffle=True,
        seed=0,
        num_workers=spec["num_workers"],
    )
    t1 = time.perf_counter()
    iterator = iter(loader)
    batch = next(iterator)
    t2 = time.perf_counter()
    assert batch.shape == (spec["batch"], spec["seq_len"] + 1), batch.shape
    main = proc_memory()
    workers = [proc_memory(pid) for pid in forked_children(os.getpid())]
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # what a checkpoint stores per rank
    result = {
        "make_s": t1 - t0,
        "first_batch_s": t2 - t1,
        "startup_s": t2 - t0,
        "rss_before_mib": before["VmRSS"],
        "main": main,
        "workers": workers,
        "state_dict_bytes": buffer.tell(),
        "len_dataset": len(loader.dataset),
    }
    del iterator, loader
    return result


def _index(spec: dict[str, Any], dl: Any) -> dict[str, Any]:
    before = proc_memory()
    t0 = time.perf_counter()
    index = dl.read_index(Path(spec["data"]))
    seconds = time.perf_counter() - t0
    after = proc_memory()
    assert len(index["chunks"]) == spec["chunks"]
    return {
        "read_index_s": seconds,
        "rss_added_mib": after["VmRSS"] - before["VmRSS"],
        "peak_added_mib": after["VmHWM"] - before["VmRSS"],
    }


def _batch_hash(batch: Any) -> str:
    return hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]


def synthesize_state(template: dict[str, Any], batches: int, batch: int, num_workers: int) -> dict:
    """litdata's StreamingDataLoader state after `batches` batches of one epoch (world size 1),
    from a real state of the same loader taken at another position of the same epoch."""
    samples = batches * batch
    state = copy.deepcopy(template)
    state["num_samples_yielded"] = samples
    state["latest_worker_idx"] = (batches - 1) % max(1, num_workers)
    state["dataset"]["num_samples_yielded"] = samples
    state["dataset"]["sample_in_epoch"] = samples
    return state


def _resume(spec: dict[str, Any], dl: Any) -> dict[str, Any]:
    """For each worker count in turn (one process: every resume builds a fresh loader anyway)."""
    return {"by_workers": {str(nw): _resume_one(spec, dl, nw) for nw in spec["num_workers"]}}


def _resume_one(spec: dict[str, Any], dl: Any, nw: int) -> dict[str, Any]:
    """States at each position (iterated or synthesized), then timed resumes from each."""
    seq, batch = spec["seq_len"], spec["batch"]

    def make():
        return dl.make_dataloader(spec["data"], seq, batch, shuffle=True, seed=0, num_workers=nw)

    loader = make()
    epoch_batches = len(loader.dataset) // batch
    iterated = sorted(k for k in spec["positions"] if 1 <= k < epoch_batches)
    late = sorted({max(1, int(f * epoch_batches)) for f in spec["fractions"]} - set(iterated))
    late = [k for k in late if 1 <= k < epoch_batches]
    states: dict[int, dict[str, Any]] = {}
    expected: dict[int, str] = {}
    iterate_s = 0.0
    if iterated:
        t0 = time.perf_counter()
        iterator = iter(loader)
        done = 0
        for k in iterated:
            while done < k:
                next(iterator)
                done += 1
            states[k] = copy.deepcopy(loader.state_dict())
            expected[k] = _batch_hash(next(iterator))
            done += 1
        iterate_s = time.perf_counter() - t0
        del iterator
    del loader
    template = states[iterated[0]] if iterated else None
    synth_ok = all(
        synthesize_state(template, k, batch, nw) == states[k] for k in iterated if template
    )
    for k in late:
        if template is None:
            break
        states[k] = synthesize_state(template, k, batch, nw)
    rows: dict[int, dict[str, list]] = {
        k: {"make_s": [], "resume_s": [], "match": []} for k in states
    }
    for _ in range(spec["repeats"]):
        for k in sorted(states):
            t0 = time.perf_counter()
            fresh = make()
            t1 = time.perf_counter()
            fresh.load_state_dict(copy.deepcopy(states[k]))
            iterator = iter(fresh)
            got = next(iterator)
            t2 = time.perf_counter()
            rows[k]["make_s"].append(t1 - t0)
            rows[k]["resume_s"].append(t2 - t1)
            rows[k]["match"].append(_batch_hash(got) == expected[k] if k in expected else None)
            del iterator, fresh
    return {
        "epoch_batches": epoch_batches,
        "iterate_s": iterate_s,
        "synthesized_equals_real": synth_ok if len(iterated) > 1 else None,
        "positions": {
            str(k): {**rows[k], "kind": "iterated" if k in expected else "synthesized"}
            for k in sorted(states)
        },
        "peak_mib": proc_memory()["VmHWM"],
    }


def _elastic(spec: dict[str, Any], dl: Any) -> dict[str, Any]:
    """State after 10 batches with num_workers 2, resumed by a loader with num_workers 0."""
    seq, batch = spec["seq_len"], spec["batch"]
    loader = dl.make_dataloader(spec["data"], seq, batch, shuffle=True, seed=0, num_workers=2)
    iterator = iter(loader)
    for _ in range(10):
        next(iterator)
    state = copy.deepcopy(loader.state_dict())
    del iterator, loader
    before = proc_memory()
    fresh = dl.make_dataloader(spec["data"], seq, batch, shuffle=True, seed=0, num_workers=0)
    t0 = time.perf_counter()
    fresh.load_state_dict(state)
    got = next(iter(fresh))
    seconds = time.perf_counter() - t0
    assert got.shape == (batch, seq + 1)
    return {
        "resume_s": seconds,
        "peak_added_mib": proc_memory()["VmHWM"] - before["VmRSS"],
        "samples": len(fresh.dataset),
    }


WORKER_MODES = {"startup": _startup, "index": _index, "resume": _resume, "elastic": _elastic}


# -- streaming ---------------------------------------------------------------------------------


def stream_pass(
    split: str,
    num_workers: int,
    cache: Path | None,
    seq: int,
    batch: int,
    min_seconds: float | None,
) -> dict[str, Any]:
    """Tokens delivered to this process: one epoch (min_seconds None) or epochs until >= it."""
    from data import loader as dl

    dl._REMOTE_INDEXES.clear()  # a restarted process reads the index again
    stream = dl.StreamOptions(cache_dir=str(cache) if cache else None, max_cache_size="1TB")
    t0 = time.perf_counter()
    loader = dl.make_dataloader(
        split, seq, batch, shuffle=True, seed=0, num_workers=num_workers, stream=stream
    )
    t1 = time.perf_counter()
    tokens, first, epochs, elapsed = 0, None, 0, 0.0
    while True:
        for b in loader:
            tokens += b.numel()
            if first is None:
                first = time.perf_counter() - t1
        epochs += 1
        elapsed = time.perf_counter() - t1
        if min_seconds is None or elapsed >= min_seconds:
            break
    del loader
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "epochs": epochs,
        "tokens_per_s": tokens / elapsed,
        "make_s": t1 - t0,
        "first_batch_s": first,
    }


def measure_streaming(args: argparse.Namespace, work: Path, config: dict) -> dict[str, Any]:
    chunk_tokens = max(ITEM_TOKENS, int(args.stream_chunk_mb * 1e6) // TOKEN_BYTES)
    local = work / "stream" / "train"
    n_chunks = make_stream_split(local, args.tokens, chunk_tokens, config)
    from data.loader import dataset_num_tokens, num_blocks

    out: dict[str, Any] = {
        "tokens": dataset_num_tokens(local),
        "chunks": n_chunks,
        "chunk_mb": chunk_tokens * TOKEN_BYTES / 1e6,
        "blocks_per_epoch": num_blocks(local, args.seq_len),
    }
    try:
        from tests.s3_server import S3Server

        server = S3Server.start()
    except (ImportError, RuntimeError) as e:
        out["skipped"] = f"no S3-compatible server: {e} (install moto[server]: `make setup`)"
        return out
    saved_env = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        client = server.client()
        client.create_bucket(Bucket="bench")
        files = sorted(local.iterdir())
        t0 = time.perf_counter()
        for f in files:
            client.upload_file(str(f), "bench", f"stream/train/{f.name}")
        upload_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in files)
        out["upload_mb_s"] = nbytes / upload_s / 1e6
        url = "s3://bench/stream/train"
        rows: dict[str, list[dict[str, Any]]] = {}
        chunk_names = [f.name for f in files if f.suffix == ".bin"]
        for r in range(args.repeats):
            # The peer: the same objects fetched whole with boto3, one after the other.
            t0 = time.perf_counter()
            got = sum(
                len(client.get_object(Bucket="bench", Key=f"stream/train/{n}")["Body"].read())
                for n in chunk_names
            )
            seconds = time.perf_counter() - t0
            rows.setdefault("raw GET (boto3, sequential)", []).append(
                {
                    "seconds": seconds,
                    "tokens_per_s": got / TOKEN_BYTES / seconds,
                    "mb_s": got / seconds / 1e6,
                }
            )
            for nw in args.stream_workers:
                rows.setdefault(f"local|{nw}", []).append(
                    stream_pass(str(local), nw, None, args.seq_len, args.batch, args.min_seconds)
                )
                cache = work / "cache" / f"r{r}-w{nw}"
                cold = stream_pass(url, nw, cache, args.seq_len, args.batch, None)
                cold["cached_chunks"] = len(list(cache.rglob("chunk-*.bin")))
                rows.setdefault(f"s3 cold|{nw}", []).append(cold)
                warm = stream_pass(url, nw, cache, args.seq_len, args.batch, args.min_seconds)
                warm["cached_chunks"] = len(list(cache.rglob("chunk-*.bin")))
                rows.setdefault(f"s3 warm|{nw}", []).append(warm)
                shutil.rmtree(cache, ignore_errors=True)
        out["rows"] = rows
        out["best_tokens_per_s"] = {k: max(x["tokens_per_s"] for x in v) for k, v in rows.items()}
        out["warm_goal_1m_tokens_per_s"] = {
            nw: out["best_tokens_per_s"][f"s3 warm|{nw}"] >= 1e6 for nw in args.stream_workers
        }
    finally:
        server.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


# -- chunk verification ------------------------------------------------------------------------


def measure_verify(args: argparse.Namespace, work: Path, config: dict) -> dict[str, Any]:
    """What checking chunks at their first read costs (data/integrity.py): the check of one chunk
    file (size, crc32, every token id below the vocabulary; page cache warm), and one epoch of a
    local split read with checksums recorded against the same chunks without (num_workers 0 and 2,
    so each epoch's workers check the chunks they read)."""
    from data.integrity import CHECKSUM_KEY, TokenRange, file_checksum, file_problems, token_dtype

    chunk_tokens = max(ITEM_TOKENS, int(args.stream_chunk_mb * 1e6) // TOKEN_BYTES)
    checked, plain = work / "verify" / "checked", work / "verify" / "plain"
    make_stream_split(checked, args.tokens, chunk_tokens, config)
    index = json.loads((checked / "index.json").read_text())
    plain.mkdir(parents=True)
    for c in index["chunks"]:
        os.symlink(checked / c["filename"], plain / c["filename"])
    write_index(plain, index["chunks"], config, chunk_tokens * TOKEN_BYTES)
    chunks = [{**c, CHECKSUM_KEY: file_checksum(checked / c["filename"])} for c in index["chunks"]]
    write_index(checked, chunks, config, chunk_tokens * TOKEN_BYTES)
    dtype, vocab = token_dtype(index["config"]), TokenRange(32_000)
    seconds = []
    for _ in range(args.repeats):
        for c in chunks:
            t0 = time.perf_counter()
            assert not file_problems(checked / c["filename"], c, dtype, vocab)
            seconds.append(time.perf_counter() - t0)
    nbytes = statistics.mean(c["chunk_bytes"] for c in chunks)
    per_chunk = statistics.median(seconds)
    out: dict[str, Any] = {
        "chunks": len(chunks),
        "chunk_mb": nbytes / 1e6,
        "check_ms_per_chunk": per_chunk * 1e3,
        "check_mb_s": nbytes / per_chunk / 1e6,
        "check_ms_per_64mb_chunk": 64e6 / (nbytes / per_chunk) * 1e3,
        "epochs": {},
    }
    for nw in args.stream_workers:
        for name, d in (("with checksums", checked), ("without", plain)):
            runs = [
                stream_pass(str(d), nw, None, args.seq_len, args.batch, None)
                for _ in range(args.repeats)
            ]
            out["epochs"][f"{name}|{nw}"] = min(r["seconds"] for r in runs)
        with_s, without_s = (out["epochs"][f"{k}|{nw}"] for k in ("with checksums", "without"))
        out["epochs"][f"overhead|{nw}"] = (with_s - without_s) / without_s
    return out


# -- the run -----------------------------------------------------------------------------------


def _slope_per_1k(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs, per 1000 of x."""
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0]) * 1000


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "litdata", "numpy", "boto3", "moto", "obstore"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def measure_startup(args, work: Path, config: dict, chunk_tokens: int) -> dict[str, Any]:
    template = synthetic_template(work, chunk_tokens)
    splits = {}
    for n in args.chunks:
        d = work / "synthetic" / f"chunks-{n}"
        t0 = time.perf_counter()
        make_synthetic_split(d, n, chunk_tokens, config, template)
        splits[n] = {
            "dir": str(d),
            "build_s": time.perf_counter() - t0,
            "index_mb": (d / "index.json").stat().st_size / 1e6,
        }
    runs: dict[str, list[dict[str, Any]]] = {}
    base = {"seq_len": args.seq_len, "batch": args.batch}
    for _ in range(args.repeats):
        for n in args.chunks:
            d = splits[n]["dir"]
            runs.setdefault(f"index|{n}", []).append(
                run_child({**base, "mode": "index", "data": d, "chunks": n})
            )
            for nw in args.startup_workers:
                runs.setdefault(f"startup|{n}|{nw}", []).append(
                    run_child({**base, "mode": "startup", "data": d, "num_workers": nw})
                )
    errors = {k: r["error"] for k, v in runs.items() for r in v if "error" in r}
    if errors:
        raise RuntimeError(f"start-up children failed: {errors}")

    def best(key: str, field: str) -> float:
        return min(r[field] for r in runs[key])

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    table = {}
    for n in args.chunks:
        row: dict[str, Any] = {
            **splits[n],
            "read_index_s": best(f"index|{n}", "read_index_s"),
            "read_index_rss_mib": med([r["rss_added_mib"] for r in runs[f"index|{n}"]]),
            "read_index_peak_mib": med([r["peak_added_mib"] for r in runs[f"index|{n}"]]),
        }
        for nw in args.startup_workers:
            rs = runs[f"startup|{n}|{nw}"]
            workers = [w for r in rs for w in r["workers"]]
            row[f"nw{nw}"] = {
                "import_s": min(r["import_s"] for r in rs),
                "make_s": min(r["make_s"] for r in rs),
                "first_batch_s": min(r["first_batch_s"] for r in rs),
                "startup_s": min(r["startup_s"] for r in rs),
                "process_s": min(r["process_s"] for r in rs),
                "rss_before_mib": med([r["rss_before_mib"] for r in rs]),
                "main_peak_mib": med([r["main"]["VmHWM"] for r in rs]),
                "main_uss_mib": med([r["main"].get("USS", 0.0) for r in rs]),
                "workers_found": [len(r["workers"]) for r in rs],
                "worker_peak_mib": med([w["VmHWM"] for w in workers]) if workers else None,
                "worker_uss_mib": med([w.get("USS", 0.0) for w in workers]) if workers else None,
                "state_dict_bytes": rs[0]["state_dict_bytes"],
                "samples": rs[0]["len_dataset"],
            }
        table[n] = row
    xs = list(args.chunks)
    per_1k: dict[str, Any] = {
        "read_index_s": _slope_per_1k(xs, [table[n]["read_index_s"] for n in xs]),
        "read_index_rss_mib": _slope_per_1k(xs, [table[n]["read_index_rss_mib"] for n in xs]),
    }
    for nw in args.startup_workers:
        k = f"nw{nw}"
        per_1k[k] = {
            f: _slope_per_1k(xs, [table[n][k][f] for n in xs])
            for f in ("startup_s", "main_peak_mib", "main_uss_mib", "state_dict_bytes")
        }
        if all(table[n][k]["worker_peak_mib"] is not None for n in xs):
            per_1k[k]["worker_peak_mib"] = _slope_per_1k(
                xs, [table[n][k]["worker_peak_mib"] for n in xs]
            )
            per_1k[k]["worker_uss_mib"] = _slope_per_1k(
                xs, [table[n][k]["worker_uss_mib"] for n in xs]
            )
    return {"chunk_tokens": chunk_tokens, "sizes": table, "per_1k_chunks": per_1k, "runs": runs}


def measure_resume(args, work: Path, config: dict, chunk_tokens: int, startup: dict) -> dict:
    targets = []
    stream_dir = work / "stream" / "train"
    if stream_dir.is_dir():
        targets.append(("local streaming split (real tokens)", str(stream_dir)))
    if args.chunks:
        n = max(args.chunks)
        targets.append((f"synthetic, {n:,} chunks", startup["sizes"][n]["dir"]))
    out: dict[str, Any] = {}
    for name, d in targets:
        spec = {
            "mode": "resume",
            "data": d,
            "num_workers": args.resume_workers,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "positions": args.positions,
            "fractions": args.fractions,
            "repeats": args.repeats,
        }
        res = run_child(spec)
        for nw in args.resume_workers:
            out[f"{name}|{nw}"] = res["by_workers"][str(nw)] if "by_workers" in res else res
    elastic: dict[str, Any] = {}
    if args.elastic_chunks:
        template = synthetic_template(work, chunk_tokens)
        for n in args.elastic_chunks:
            d = work / "synthetic" / f"elastic-{n}"
            if not d.is_dir():
                make_synthetic_split(d, n, chunk_tokens, config, template)
            tries = [
                run_child(
                    {
                        "mode": "elastic",
                        "data": str(d),
                        "seq_len": args.seq_len,
                        "batch": args.batch,
                    },
                    timeout=args.elastic_timeout,
                )
                for _ in range(args.repeats)
            ]
            ok = [t for t in tries if "error" not in t]
            elastic[n] = {
                "resume_s": min(t["resume_s"] for t in ok) if ok else None,
                "peak_added_mib": statistics.median(t["peak_added_mib"] for t in ok)
                if ok
                else None,
                "samples": ok[0]["samples"] if ok else None,
                "errors": [t["error"] for t in tries if "error" in t],
            }
        xs = [n for n in args.elastic_chunks if elastic[n]["resume_s"] is not None]
        per_1k = {
            "resume_s": _slope_per_1k(xs, [elastic[n]["resume_s"] for n in xs]),
            "peak_added_mib": _slope_per_1k(xs, [elastic[n]["peak_added_mib"] for n in xs]),
        }
        elastic["per_1k_chunks"] = per_1k
        if per_1k["resume_s"] is not None and args.chunks:
            n = max(args.chunks)  # linear in the epoch's samples, so in the chunks at one size
            elastic["extrapolated"] = {
                "chunks": n,
                "resume_s": per_1k["resume_s"] * n / 1000,
                "peak_added_mib": per_1k["peak_added_mib"] * n / 1000,
            }
    return {"strict": out, "elastic": elastic}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--chunks",
        type=_ints,
        default=[1000, 10000, 50000],
        help="chunk counts of the synthetic indexes (comma-separated)",
    )
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=64.0,
        help="synthetic chunk size in MB of uint16 tokens (prepare's default: 64)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=50_000_000,
        help="tokens of the streaming dataset (local and on the S3 server)",
    )
    parser.add_argument(
        "--stream-chunk-mb", type=float, default=8.0, help="chunk size of the streaming dataset, MB"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (best kept)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="warm and local streaming: epochs until at least this long",
    )
    parser.add_argument(
        "--positions",
        type=_ints,
        default=[10, 1000, 10000],
        help="resume: batches iterated before the state is taken",
    )
    parser.add_argument(
        "--fractions",
        type=_floats,
        default=[0.5, 0.99],
        help="resume: late positions (fractions of the epoch), states synthesized",
    )
    parser.add_argument(
        "--elastic-chunks",
        type=_ints,
        default=[10, 20, 40],
        help="elastic resume (num_workers 2 -> 0) on indexes of these chunk counts "
        "(cost grows with the epoch's samples; empty to skip)",
    )
    parser.add_argument(
        "--elastic-timeout",
        type=float,
        default=180.0,
        help="seconds allowed per elastic resume child",
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--startup-workers", type=_ints, default=[0, 2])
    parser.add_argument("--stream-workers", type=_ints, default=[0, 2])
    parser.add_argument("--resume-workers", type=_ints, default=[0, 2])
    parser.add_argument(
        "--skip", default="", help="parts to leave out: startup,streaming,verify,resume"
    )
    parser.add_argument("--workdir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}",
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "load_average_at_start": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
    }
    chunk_tokens = max(ITEM_TOKENS, int(args.chunk_mb * 1e6) // TOKEN_BYTES)
    try:
        config = litdata_config(work)
        startup = None
        seconds = results["part_seconds"] = {}
        if "startup" not in skip and args.chunks:
            t0 = time.perf_counter()
            startup = measure_startup(args, work, config, chunk_tokens)
            results["startup"] = startup
            seconds["startup"] = time.perf_counter() - t0
        if "streaming" not in skip:
            t0 = time.perf_counter()
            results["streaming"] = measure_streaming(args, work, config)
            seconds["streaming"] = time.perf_counter() - t0
        if "verify" not in skip:
            t0 = time.perf_counter()
            results["verify"] = measure_verify(args, work, config)
            seconds["verify"] = time.perf_counter() - t0
        if "resume" not in skip:
            t0 = time.perf_counter()
            if startup is None and args.chunks:  # resume needs the largest synthetic index
                template = synthetic_template(work, chunk_tokens)
                n = max(args.chunks)
                d = work / "synthetic" / f"chunks-{n}"
                make_synthetic_split(d, n, chunk_tokens, config, template)
                startup = {"sizes": {n: {"dir": str(d)}}}
            results["resume"] = measure_resume(args, work, config, chunk_tokens, startup or {})
            seconds["resume"] = time.perf_counter() - t0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for sub in ("synthetic", "stream", "cache", "probe", "verify"):
                shutil.rmtree(work / sub, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


# -- the report --------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(*columns: str) -> None:
    print(_row(list(columns)))
    print("|" + "---|" * len(columns))


def print_report(r: dict[str, Any]) -> None:
    v = r["versions"]
    print(
        f"device: {r['device']} | "
        + " | ".join(f"{k} {val}" for k, val in v.items())
        + f"\nload average (1, 5, 15 min) at start {tuple(round(x, 2) for x in r['load_average_at_start'])}, "
        f"at end {tuple(round(x, 2) for x in r['load_average_at_end'])}; run took {r['wall_s']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in r.get("part_seconds", {}).items())
        + ")\n"
    )
    su = r.get("startup")
    if su:
        nws = r["config"]["startup_workers"]
        print(
            f"### Loader start-up vs index size (chunks of {su['chunk_tokens']:,} tokens, "
            f"seq_len {r['config']['seq_len']}, batch {r['config']['batch']}, shuffled, world size 1; "
            f"fresh process each, best of {r['config']['repeats']})\n"
        )
        head = "| chunks | index.json MB | read_index s | read_index RSS MiB |"
        sep = "|---|---|---|---|"
        for nw in nws:
            head += (
                f" nw={nw}: make + first batch s | nw={nw}: main peak RSS MiB |"
                + (f" nw={nw}: per-worker peak RSS / USS MiB |" if nw else "")
                + f" nw={nw}: state_dict KB |"
            )
            sep += "---|---|" + ("---|" if nw else "") + "---|"
        print(head)
        print(sep)
        for n, row in su["sizes"].items():
            line = (
                f"| {int(n):,} | {row['index_mb']:.2f} | {row['read_index_s']:.3f} | "
                f"{row['read_index_rss_mib']:.1f} |"
            )
            for nw in nws:
                c = row[f"nw{nw}"]
                line += (
                    f" {c['make_s']:.3f} + {c['first_batch_s']:.3f} = {c['startup_s']:.3f} |"
                    f" {c['main_peak_mib']:.0f} |"
                )
                if nw:
                    line += f" {_f(c['worker_peak_mib'], 0)} / {_f(c['worker_uss_mib'], 0)} |"
                line += f" {c['state_dict_bytes'] / 1e3:,.1f} |"
            print(line)
        p = su["per_1k_chunks"]
        if p["read_index_s"] is not None:
            line = (
                f"| per 1k chunks | | {p['read_index_s']:+.4f} | {p['read_index_rss_mib']:+.2f} |"
            )
            for nw in nws:
                c = p[f"nw{nw}"]
                line += f" {c['startup_s']:+.4f} | {c['main_peak_mib']:+.2f} |"
                if nw:
                    line += f" {_f(c.get('worker_peak_mib'))} / {_f(c.get('worker_uss_mib'))} |"
                line += f" {c['state_dict_bytes'] / 1e3:+,.1f} |"
            print(line)
        first = next(iter(su["sizes"].values()))
        print(
            f"\nImports (torch, litdata, data.loader) before that: {first['nw0']['import_s']:.2f} s; "
            f"RSS after imports {first['nw0']['rss_before_mib']:.0f} MiB. Worker USS = its private "
            f"pages, what each worker adds (a forked worker shares the parent's pages until written)."
        )
    st = r.get("streaming")
    if st:
        print(
            f"\n### Streaming: {st['tokens']:,} tokens in {st['chunks']} chunks of "
            f"{st['chunk_mb']:.1f} MB, tokens/s delivered to the measuring process (best of "
            f"{r['config']['repeats']})\n"
        )
        if "skipped" in st:
            print(st["skipped"])
        else:
            local = {
                nw: st["best_tokens_per_s"][f"local|{nw}"] for nw in r["config"]["stream_workers"]
            }
            _head(
                "source",
                "num_workers",
                "tokens/s (best)",
                "MB/s",
                "vs local",
                "runs: s (epochs)",
                "first batch s",
                "chunks in cache after",
            )
            for key, runs in st["rows"].items():
                best = max(runs, key=lambda x: x["tokens_per_s"])
                if "|" in key:
                    src, nw = key.split("|")
                    vs = f"{100 * best['tokens_per_s'] / local[int(nw)]:.0f}%"
                    spans = ", ".join(f"{x['seconds']:.2f} ({x['epochs']})" for x in runs)
                    cached = str(best.get("cached_chunks", "")) if src != "local" else ""
                    print(
                        f"| {src} | {nw} | {best['tokens_per_s']:,.0f} | "
                        f"{best['tokens_per_s'] * TOKEN_BYTES / 1e6:,.0f} | {vs} | {spans} | "
                        f"{best['first_batch_s']:.3f} | {cached} |"
                    )
                else:
                    spans = ", ".join(f"{x['seconds']:.2f}" for x in runs)
                    print(
                        f"| {key} (peer) | - | {best['tokens_per_s']:,.0f} | {best['mb_s']:,.0f} "
                        f"| | {spans} | | |"
                    )
            goal = ", ".join(
                f"num_workers {nw}: {'holds' if ok else 'does NOT hold'}"
                for nw, ok in st["warm_goal_1m_tokens_per_s"].items()
            )
            print(
                f"\nGoal >= 1M tokens/s per process from a warm cache: {goal}. "
                f"Upload to the server: {st['upload_mb_s']:.0f} MB/s."
            )
    ve = r.get("verify")
    if ve:
        print(
            f"\n### Chunk verification at first read ({ve['chunks']} chunks of "
            f"{ve['chunk_mb']:.1f} MB)\n"
        )
        print(
            f"check of one chunk (size, crc32, ids < vocab): {ve['check_ms_per_chunk']:.1f} ms "
            f"({ve['check_mb_s']:,.0f} MB/s; {ve['check_ms_per_64mb_chunk']:.0f} ms per 64 MB chunk)\n"
        )
        _head("num_workers", "epoch with checksums s", "epoch without s", "overhead")
        for key, value in ve["epochs"].items():
            name, nw = key.split("|")
            if name == "with checksums":
                without = ve["epochs"][f"without|{nw}"]
                overhead = ve["epochs"][f"overhead|{nw}"]
                print(_row([nw, _f(value), _f(without), f"{overhead:+.1%}"]))
    rs = r.get("resume")
    if rs:
        print(
            f"\n### Resume: fresh loader + load_state_dict + next(iter(loader)) vs position "
            f"(best of {r['config']['repeats']})\n"
        )
        _head(
            "dataset",
            "num_workers",
            "position, batches",
            "% of epoch",
            "state",
            "make_dataloader s",
            "load_state_dict + first batch s",
            "resumed batch = expected",
        )
        for key, res in rs["strict"].items():
            name, nw = key.split("|")
            if "error" in res:
                print(f"| {name} | {nw} | error: {res['error'][:200]} | | | | | |")
                continue
            for k, row in res["positions"].items():
                match = row["match"]
                ok = "-" if match[0] is None else ("yes" if all(match) else "NO")
                print(
                    f"| {name} | {nw} | {int(k):,} | {100 * int(k) / res['epoch_batches']:.2f}% | "
                    f"{row['kind']} | {min(row['make_s']):.3f} | {min(row['resume_s']):.3f} | {ok} |"
                )
        notes = [
            f"{key.split('|')[0]} (nw={key.split('|')[1]}): synthesized state = real state: "
            f"{res['synthesized_equals_real']}"
            for key, res in rs["strict"].items()
            if "error" not in res and res["synthesized_equals_real"] is not None
        ]
        if notes:
            print("\n" + "; ".join(notes) + ".")
        el = rs.get("elastic")
        if el:
            print(
                "\nElastic resume (state saved with num_workers 2 after 10 batches, resumed "
                "with num_workers 0), fresh process each:\n"
            )
            _head(
                "chunks",
                "samples in the epoch",
                "load_state_dict + first batch s",
                "peak RSS added MiB",
            )
            for n, row in el.items():
                if n in ("per_1k_chunks", "extrapolated"):
                    continue
                if row["resume_s"] is None:
                    print(f"| {int(n):,} | | {'; '.join(row['errors'])[:200]} | |")
                    continue
                print(
                    _row(
                        [
                            f"{int(n):,}",
                            f"{row['samples']:,}",
                            f"{row['resume_s']:.2f}",
                            f"{row['peak_added_mib']:.0f}",
                        ]
                    )
                )
            p = el["per_1k_chunks"]
            if p["resume_s"] is not None:
                print(
                    f"| per 1k chunks (slope) | | {p['resume_s']:+,.1f} | {p['peak_added_mib']:+,.0f} |"
                )
            x = el.get("extrapolated")
            if x:
                print(
                    f"| {x['chunks']:,} (extrapolated, linear) | | {x['resume_s']:,.0f} | "
                    f"{x['peak_added_mib']:,.0f} |"
                )


if __name__ == "__main__":
    main()
