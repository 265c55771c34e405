"""Weighted mixtures of prepared datasets: coverage per source epoch over 2 ranks, proportions,
exact resume at random batches (0 and 2 DataLoader workers), multi-epoch, weight changes.

Ranks are simulated in one process by making litdata see a 2-process world (its
``_DistributedEnv``): every rank's loader is built and iterated under its own rank, exactly as
it would be in its own process. Sources are written with litdata's own writer, one block per
item, each block tagged with (source, block id) so that every read can be traced.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from litdata.utilities.env import _DistributedEnv

from data.loader import make_mixture_loader, source_samples

torch.set_num_threads(1)

T = 15  # seq_len; blocks are T + 1 tokens
WEIGHTS = {"slimpajama": 0.693584, "starcoder": 0.306416}  # TinyLlama's mixture
SIZES = {"slimpajama": 696, "starcoder": 304}  # blocks; chunks of 40 and 24
WORLD, BATCH = 2, 4


def _write_source(directory: Path, source: int, blocks: int, per_chunk: int) -> None:
    w = BinaryWriter(str(directory), chunk_size=per_chunk, item_loader=TokensLoader())
    for j in range(blocks):
        block = np.zeros(T + 1, dtype=np.uint16)
        block[0], block[1], block[2] = source, j // 256, j % 256
        w.add_item(j, torch.from_numpy(block))
    w.done()
    w._merge_no_wait()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, float]]:
    root = tmp_path_factory.mktemp("mixture")
    out = []
    for i, (name, per_chunk) in enumerate([("slimpajama", 40), ("starcoder", 24)], start=1):
        _write_source(root / name, i, SIZES[name], per_chunk)
        out.append((name, str(root / name), WEIGHTS[name]))
    return out


@contextlib.contextmanager
def as_rank(rank: int, world: int = WORLD):
    original = _DistributedEnv.detect
    _DistributedEnv.detect = classmethod(lambda cls: _DistributedEnv(world, rank, 1))  # type: ignore[method-assign]
    try:
        yield
    finally:
        _DistributedEnv.detect = original  # type: ignore[method-assign]


def _loader(
    sources,
    rank: int,
    num_workers: int,
    weights: dict[str, float] | None = None,
    world: int = WORLD,
):
    srcs = [(n, d, (weights or WEIGHTS)[n]) for n, d, _ in sources]
    with as_rank(rank, world):
        return make_mixture_loader(
            srcs, seq_len=T, batch_size=BATCH, shuffle=True, seed=7, num_workers=num_workers
        )


def _batches(loader, rank: int, n: int, world: int = WORLD) -> list[torch.Tensor]:
    out = []
    with as_rank(rank, world):
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(b[0]), int(b[1]) * 256 + int(b[2])) for b in batch]


def _worker_shares(directory: str, rank: int, num_workers: int, epoch: int) -> list[int]:
    """Blocks litdata assigns to each DataLoader worker of `rank` in `epoch` (its shuffle, drop_last=False)."""
    from litdata import StreamingDataset

    with as_rank(rank):
        ds = StreamingDataset(
            directory, item_loader=TokensLoader(block_size=T + 1), shuffle=True, seed=7
        )
        ds.set_drop_last(False)
        ds.get_len(max(1, num_workers), BATCH)
        _, intervals = ds.shuffler.get_chunks_and_intervals_per_workers(
            ds.distributed_env, max(1, num_workers), BATCH, epoch
        )
    workers = range(rank * max(1, num_workers), (rank + 1) * max(1, num_workers))
    return [sum(iv[2] - iv[1] for iv in intervals[w]) for w in workers]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_epoch_reads_every_block_once_in_proportion(sources, num_workers: int) -> None:
    nw = max(1, num_workers)
    # Enough batches for every worker of every rank to finish its first epoch of both sources.
    n_batches = 160
    per_source_epoch: dict[str, list[Counter]] = {
        name: [Counter(), Counter()] for name, _, _ in sources
    }
    consumed = Counter()
    for rank in range(WORLD):
        loader = _loader(sources, rank, num_workers)
        batches = _batches(loader, rank, n_batches)
        consumed.update(source_samples(loader))
        # DataLoader workers take turns batch by batch: split the rank's stream per worker.
        for w in range(nw):
            reads = [x for b in batches[w::nw] for x in _ids(b)]
            for s, (name, directory, _) in enumerate(sources, start=1):
                stream = [j for src, j in reads if src == s]
                share1 = _worker_shares(directory, rank, num_workers, 1)[w]
                share2 = _worker_shares(directory, rank, num_workers, 2)[w]
                assert len(stream) >= share1, (name, rank, w)  # epoch 1 done on this worker
                per_source_epoch[name][0].update(stream[:share1])
                epoch2 = Counter(stream[share1 : share1 + share2])
                assert all(c == 1 for c in epoch2.values())  # no block twice within epoch 2 either
                per_source_epoch[name][1].update(epoch2)
    for name, _, _ in sources:
        first = per_source_epoch[name][0]
        # Over both ranks (and all workers): every block of the source exactly once in its epoch 1.
        assert sorted(first) == list(range(SIZES[name])) and set(first.values()) == {1}, name
        assert all(c == 1 for c in per_source_epoch[name][1].values())
    total = sum(consumed.values())
    assert total == WORLD * n_batches * BATCH
    for name, weight in WEIGHTS.items():
        assert abs(consumed[name] / total - weight) < 0.02, (name, consumed)
        # Deterministic interleaving: within one sample per worker of the exact share.
        assert abs(consumed[name] - weight * total) <= WORLD * nw, (name, consumed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_at_a_random_batch_and_resume_exactly(sources, num_workers: int) -> None:
    rng = random.Random(1234 + num_workers)
    # Far enough to cross the end of a source's epoch (starcoder: ~38 batches per worker-epoch).
    n_batches = 150
    for rank in range(WORLD):
        reference = _batches(_loader(sources, rank, num_workers), rank, n_batches)
        for stop in sorted(rng.sample(range(1, n_batches), 2)) + [n_batches - 1]:
            first = _loader(sources, rank, num_workers)
            seen = _batches(first, rank, stop)
            with as_rank(rank):
                state = pickle.loads(
                    pickle.dumps(first.state_dict())
                )  # as it goes through a checkpoint
            counts_at_stop = source_samples(first)
            resumed = _loader(sources, rank, num_workers)
            with as_rank(rank):
                resumed.load_state_dict(state)
            assert source_samples(resumed) == counts_at_stop  # the consumed counts survive a resume
            rest = _batches(resumed, rank, n_batches - stop)
            assert len(seen) + len(rest) == n_batches
            for i, (got, want) in enumerate(zip(seen + rest, reference, strict=True)):
                assert torch.equal(got, want), (rank, stop, i)
            assert sum(source_samples(resumed).values()) == n_batches * BATCH


def test_weights_may_change_on_resume_and_topology_may_not(sources) -> None:
    first = _loader(sources, 0, 0)
    _batches(first, 0, 20)
    with as_rank(0):
        state = first.state_dict()
    before = source_samples(first)
    changed = _loader(sources, 0, 0, weights={"slimpajama": 0.5, "starcoder": 0.5})
    with as_rank(0):
        changed.load_state_dict(state)
    after = [x for b in _batches(changed, 0, 25) for x in _ids(b)]
    counts = Counter(src for src, _ in after)
    assert counts[1] == counts[2] == 50  # the new weights apply from the resume point on
    # Positions are kept: nothing read before the change is read again (first epoch still running).
    seen_before = {x for b in _batches(_loader(sources, 0, 0), 0, 20) for x in _ids(b)}
    assert not seen_before & set(after)
    assert source_samples(changed) == {
        "slimpajama": before["slimpajama"] + 50,
        "starcoder": before["starcoder"] + 50,
    }

    other_world = _loader(sources, 0, 0, world=4)
    with as_rank(0, 4), pytest.raises(ValueError, match=r"same world_size \(checkpoint 2, now 4\)"):
        other_world.load_state_dict(state)
    renamed = [("web", d, w) for _, d, w in sources[:1]] + sources[1:]
    with as_rank(0):
        other = make_mixture_loader(renamed, seq_len=T, batch_size=BATCH, shuffle=True, seed=7)
        with pytest.raises(ValueError, match=r"sources \(names and order\) must stay the same"):
            other.load_state_dict(state)


def test_mixture_errors(sources, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one source"):
        make_mixture_loader([], seq_len=T, batch_size=2, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="fewer than one block"):
        make_mixture_loader(sources, seq_len=10_000, batch_size=2, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="names must be unique"):
        make_mixture_loader([sources[0], sources[0]], seq_len=T, batch_size=2, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="weights must be positive"):
        make_mixture_loader(
            [(n, d, 0.0) for n, d, _ in sources], seq_len=T, batch_size=2, shuffle=True, seed=0
        )
    with pytest.raises(ValueError, match="does not exist"):
        make_mixture_loader(
            [("x", str(tmp_path / "nope"), 1.0)], seq_len=T, batch_size=2, shuffle=True, seed=0
        )
    # A source too small to give every process a block fails with a message, not a hang.
    tiny = tmp_path / "tiny"
    _write_source(tiny, 3, 1, 1)
    loader = _loader(
        [("tiny", str(tiny), 1.0)], 0, 0, weights={"tiny": 1.0}
    )  # the block goes to rank 1
    with pytest.raises(RuntimeError, match="gives this data-loader worker no block"):
        _batches(loader, 0, 1)


# ------------------------------------------------------------------------------------------------
# End to end: the trainer on a mixture (2 gloo processes), resumed from a mid-run checkpoint.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from data.prepare import PrepareOptions, prepare_dataset
    from data.sample_corpus import SET_NAMES, write_sample_corpus
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("mixture_e2e")
    write_sample_corpus(root / "raw", train_docs=400, val_docs=80, docs_per_shard=200)
    tok = train_tokenizer(root / "raw", root / "tokenizer", vocab_size=512)
    # Two sources from one corpus: prose (SlimPajama without its GitHub subset) and code.
    prepare_dataset(
        PrepareOptions(
            root / "raw", root / "prose", tok, num_workers=1, exclude_sets=["RedPajamaGithub"]
        )
    )
    prepare_dataset(
        PrepareOptions(
            root / "raw",
            root / "code",
            tok,
            num_workers=1,
            exclude_sets=[s for s in SET_NAMES if s != "RedPajamaGithub"],
        )
    )
    return root / "prose", root / "code", tok


@pytest.mark.slow
def test_trainer_mixes_sources_reports_tokens_and_resumes_exactly(mixture_data, tmp_path) -> None:
    from tests.training import TINY, run_cli, step_records

    prose, code, tok = mixture_data
    args = [
        sys.executable,
        "-m",
        "orchestrator",
        "train",
        *TINY,
        "--data.tokenizer",
        str(tok),
        "--data.sources",
        f"[{{name: prose, dir: {prose}, weight: 0.7}}, {{name: code, dir: {code}, weight: 0.3}}]",
        "--data.val_dir",
        str(code),  # validation streamed separately (here: the code source's val/)
        "--train.max_steps",
        "4",
        "--eval.interval",
        "0",
        "--checkpoint.interval",
        "2",
    ]
    straight = tmp_path / "straight"
    run_cli([*args, "--run.dir", str(straight)])
    resumed = tmp_path / "resumed"
    proc = run_cli(
        [
            *args,
            "--run.dir",
            str(resumed),
            "--checkpoint.resume",
            str(straight / "checkpoints" / "step-00000002"),
        ]
    )
    assert "Resumed from" in proc.stdout

    def records(run: Path, key: str) -> dict[int, object]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}

    a, b = step_records(straight), step_records(resumed)
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b if r["step"] > 2]
    assert [r["batch_hashes"] for r in a[2:]] == [r["batch_hashes"] for r in b if r["step"] > 2]
    # Tokens per source: summed over ranks, in proportion, and continued (not restarted) after the resume.
    tokens = records(straight, "tokens_by_source")
    assert sorted(tokens) == [2, 4]
    total = sum(tokens[4].values())
    assert total == 4 * 16 * 64  # steps x sequences per step x seq_len
    assert abs(tokens[4]["prose"] / total - 0.7) < 0.02
    assert records(resumed, "tokens_by_source")[4] == tokens[4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard")).Reload()
    assert {"data/tokens_prose", "data/tokens_code"} <= set(events.Tags()["scalars"])


def test_preflight_checks_every_dataset_of_a_mixture(mixture_data, tmp_path) -> None:
    from orchestrator.config import load_config
    from orchestrator.schema import ConfigError
    from orchestrator.training.preflight import check_inputs

    prose, code, tok = mixture_data
    base = [
        "--model.vocab_size",
        "512",
        "--data.tokenizer",
        str(tok),
        "--run.dir",
        str(tmp_path / "run"),
    ]

    def sources(second: Path) -> list[str]:
        return [
            "--data.sources",
            f"[{{name: prose, dir: {prose}, weight: 0.7}}, {{name: code, dir: {second}, weight: 0.3}}]",
        ]

    check_inputs(load_config([*base, *sources(code)]))  # fine
    with pytest.raises(
        ConfigError, match=rf"data.sources\[1\].dir={tmp_path / 'nope'} does not exist"
    ):
        check_inputs(load_config([*base, *sources(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match=r"data.sources\[1\].dir=.* has no prepared 'train' split"
    ):
        check_inputs(load_config([*base, *sources(tmp_path / "empty")]))
    with pytest.raises(
        ConfigError, match=rf"data.val_dir={tmp_path / 'empty'} has no prepared 'val' split"
    ):
        check_inputs(
            load_config([*base, *sources(code), "--data.val_dir", str(tmp_path / "empty")])
        )
    # Data prepared with another tokenizer, or ids beyond the embedding, are refused before training.
    copy = tmp_path / "copy.model"
    copy.write_bytes(tok.read_bytes())  # the same tokenizer elsewhere: accepted
    check_inputs(load_config([*base, *sources(code), "--data.tokenizer", str(copy)]))
    from data.tokenizer import train_tokenizer

    different = train_tokenizer(prose.parent / "raw", tmp_path / "different", vocab_size=400)
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\].dir=.* was prepared with the tokenizer"
    ):
        check_inputs(load_config([*base, *sources(code), "--data.tokenizer", str(different)]))
    with pytest.raises(ConfigError, match=r"unique"):
        load_config(
            [*base, "--data.sources", f"[{{name: a, dir: {prose}}}, {{name: a, dir: {code}}}]"]
        )
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight=-1.0 must be positive"):
        load_config([*base, "--data.sources", f"[{{name: a, dir: {prose}, weight: -1}}]"])
