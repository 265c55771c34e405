"""The training data of a run: the loader (one prepared dataset or a weighted mixture), its size
in blocks, the endless stream of micro-batches across epochs, and what the prepare records about
it (document boundaries for data.document_mask; text or instruction data)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data.documents import DocumentBoundary, read_boundary, read_prepare_stats
from data.instructions import TOKEN_MASK, split_block
from data.loader import (
    StreamOptions,
    make_dataloader,
    make_mixture_loader,
    num_blocks,
    resolve_split,
)
from data.storage import StorageError, join
from models.config import ModelConfig
from models.encdec import packed_layout, response_split
from models.kernels import IGNORE_INDEX
from models.llama import document_layout
from orchestrator.config import Config
from orchestrator.schema import ConfigError


def stream_options(cfg: Config) -> StreamOptions:
    """How the run streams data keys given as object-store URLs (cache, its bound, endpoint)."""
    return StreamOptions(
        cache_dir=cfg.data.cache_dir,
        max_cache_size=cfg.data.max_cache_size,
        storage_options=cfg.storage.options(),
    )


def train_split(cfg: Config) -> str:
    """data.dir's train split (a local path or a URL)."""
    return join(cfg.data.dir, "train")


def build_train_loader(cfg: Config) -> Any:
    """A stateful loader (its position is checkpointed) over data.dir/train or data.sources."""
    common = dict(
        seq_len=cfg.seq_len,
        batch_size=cfg.train.micro_batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        stream=stream_options(cfg),
        vocab_size=cfg.model.vocab_size,  # a chunk with a bigger id: an error naming it, no step
    )
    if cfg.data.sources:  # weighted mixture of prepared datasets
        return make_mixture_loader([(s.name, s.dir, s.weight) for s in cfg.data.sources], **common)
    return make_dataloader(train_split(cfg), **common)


def train_blocks(cfg: Config) -> int:
    """Blocks of seq_len+1 tokens in one epoch of the training data (all sources)."""
    stream = stream_options(cfg)
    if cfg.data.sources:
        return sum(
            num_blocks(resolve_split(s.dir, stream=stream), cfg.seq_len, stream)
            for s in cfg.data.sources
        )
    return num_blocks(train_split(cfg), cfg.seq_len, stream)


def _prepared_splits(cfg: Config) -> tuple[list[tuple[str, str, Any]], tuple[str, str, Any]]:
    """(config key, value, split) of each training split (data.dir's or every source's) and of the
    validation split."""
    stream = stream_options(cfg)
    if cfg.data.sources:
        train = [
            (f"data.sources[{i}].dir", s.dir, resolve_split(s.dir, stream=stream))
            for i, s in enumerate(cfg.data.sources)
        ]
    else:
        train = [("data.dir", cfg.data.dir, train_split(cfg))]
    val_key = "data.val_dir" if cfg.data.val_dir else "data.dir"
    val = (val_key, cfg.data.val_split(), resolve_split(cfg.data.val_split(), "val", stream))
    return train, val


def document_boundaries(cfg: Config) -> tuple[DocumentBoundary, DocumentBoundary]:
    """data.document_mask: where documents start in the training data (every source must agree:
    a mixed batch does not say which source each block came from) and in the validation split,
    from the prepare_stats.json each prepare wrote beside them. A ConfigError when one is missing."""
    train, val = _prepared_splits(cfg)

    def read(key: str, value: str, split) -> DocumentBoundary:
        try:
            boundary = read_boundary(split, cfg.storage.options())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"data.document_mask=true: cannot read {key}={value}'s prepare record: {e}"
            ) from None
        if boundary is None:
            raise ConfigError(
                f"data.document_mask=true needs the prepare_stats.json that `orchestrator prepare` writes "
                f"beside {split} ({key}={value}) to know where documents start; prepare the data with "
                "`orchestrator prepare`, or set data.document_mask=false"
            )
        return boundary

    found = [(key, read(key, value, split)) for key, value, split in train]
    if len({b for _, b in found}) > 1:
        raise ConfigError(
            "data.document_mask=true needs one document separator for all data.sources, got "
            + "; ".join(
                f"{key}: {b.separator} (bos {b.bos_id}, eos {b.eos_id})" for key, b in found
            )
        )
    return found[0][1], read(*val)


def data_formats(cfg: Config) -> tuple[str, str]:
    """The format of the training data and of the validation split: "text" (pretraining documents)
    or "instruction" (`orchestrator prepare --format instruction`: blocks carry loss flags, see
    data/instructions.py), as their prepare_stats.json records it (no record or no "format": text).
    Read once at set-up, checked at preflight. ConfigErrors: data.sources mixing the two (a mixed
    batch does not say which source each block came from, so all are decoded one way), and
    instruction data without data.document_mask=true or with the encoder-decoder."""
    try:
        train, val = _prepared_splits(cfg)
    except (OSError, ValueError, StorageError) as e:
        raise ConfigError(f"cannot read the prepared data: {e}") from None

    def read(key: str, value: str, split) -> str:
        try:
            stats = read_prepare_stats(split, cfg.storage.options())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {key}={value}'s prepare record: {e}") from None
        fmt = (stats or {}).get("format", "text")
        if fmt not in ("text", "instruction"):
            raise ConfigError(
                f"{key}={value} records an unknown data format {fmt!r} in its prepare_stats.json "
                "(this version reads text and instruction data): prepare it again"
            )
        return fmt

    found = [(key, value, read(key, value, split)) for key, value, split in train]
    if len({fmt for *_, fmt in found}) > 1:
        raise ConfigError(
            "data.sources mixes pretraining text and instruction data ("
            + ", ".join(f"{key}={value}: {fmt}" for key, value, fmt in found)
            + "): their blocks are read differently (instruction data carries the response-only "
            "loss flags), so one run trains on one kind; prepare every source with the same "
            "`orchestrator prepare --format`"
        )
    val_format = read(*val)
    for (key, value, fmt), what in ((found[0], "training"), ((*val[:2], val_format), "validation")):
        if fmt != "instruction":
            continue
        where = f"{key}={value} (the {what} data) is instruction data"
        if not cfg.data.document_mask:
            raise ConfigError(
                f"{where}, whose packed examples must not attend to each other: set "
                "data.document_mask=true (--data.document_mask true)"
            )
    return found[0][2], val_format


def model_batch(block: torch.Tensor, instruction: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Instruction data: a (B, T+1) block as loaded (int64 on the host, loss flags included) ->
    inputs (B, T), targets (B, T) (IGNORE_INDEX wherever the prediction does not count: prompt
    tokens, BOS) and how many targets count. With none, one target is let in so that the mean loss
    stays finite (the caller weighs the micro-batch's loss by the count: 0). Text: the block's
    inputs and targets, every one counting."""
    if not instruction:
        return block[:, :-1], block[:, 1:], block[:, 1:].numel()
    inputs, targets = split_block(block, IGNORE_INDEX)
    count = int((targets != IGNORE_INDEX).sum())
    if count == 0:
        targets[0, 0] = block[0, 1] & TOKEN_MASK
    return inputs, targets, count


def packing_arguments(
    model: ModelConfig,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    documents: DocumentBoundary | None,
    instruction: bool,
    device: torch.device | str,
) -> dict[str, Any]:
    """The forward pass's packing arguments for a batch's (B, T) host inputs and targets, found on
    the host (training and validation alike) and sent to `device`: `doc_ids` with
    data.document_mask (the document of each input position); for the encoder-decoder with either,
    `decoder_mask` (on instruction data from each example's first counted target on: the decoder
    reads those positions and the encoder the ones before, so each example's prompt is encoded and
    its response decoded, models/encdec.py `response_split`; on text the prefix-LM split); and
    their `layout` (document starts, row lengths), so that the forward reads nothing back."""
    out: dict[str, Any] = {}
    if documents is not None:
        out["doc_ids"] = documents.ids(inputs)
    if model.arch == "encoder_decoder" and (instruction or documents is not None):
        if instruction:
            out["decoder_mask"] = response_split(targets != IGNORE_INDEX, out.get("doc_ids"))
        else:
            B, T = inputs.shape
            out["decoder_mask"] = (torch.arange(T) >= model.encoder_tokens(T)).expand(B, T)
        out["layout"] = packed_layout(out["decoder_mask"], out.get("doc_ids"))
    elif "doc_ids" in out:
        out["layout"] = document_layout(out["doc_ids"])
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in out.items()
    }


# litdata's elastic resume (a new world size, data.num_workers or micro-batch size) lays out the
# rest of the epoch as one Python (chunk, item) tuple per block, in every rank and every data
# worker: ~160 bytes a block, measured by benchmarks/data_scale.py (RESULTS.md, 2026-12-01).
ELASTIC_RESUME_BYTES_PER_BLOCK = 160
ELASTIC_RESUME_WARN_BYTES = 4 * 2**30


def elastic_resume_warning(
    cfg: Config, saved: dict, saved_world: int | None, world_size: int, blocks: int
) -> str | None:
    """A warning when resuming a single dataset with another world size, data.num_workers or
    micro-batch size would make litdata hold a per-block plan of the epoch larger than
    ELASTIC_RESUME_WARN_BYTES in each process (None otherwise, and for mixtures, which refuse
    such a change)."""
    if cfg.data.sources:
        return None
    was = {
        "world size": saved_world,
        "data.num_workers": (saved.get("data") or {}).get("num_workers"),
        "train.micro_batch_size": (saved.get("train") or {}).get("micro_batch_size"),
    }
    now = {
        "world size": world_size,
        "data.num_workers": cfg.data.num_workers,
        "train.micro_batch_size": cfg.train.micro_batch_size,
    }
    changed = [f"{k} {was[k]} -> {now[k]}" for k in now if was[k] is not None and was[k] != now[k]]
    per_process = blocks * ELASTIC_RESUME_BYTES_PER_BLOCK
    if not changed or per_process < ELASTIC_RESUME_WARN_BYTES:
        return None
    processes = 1 + cfg.data.num_workers
    return (
        f"resuming with {', '.join(changed)}: litdata's elastic resume lays out the rest of the "
        f"epoch's {blocks:,} blocks one by one, about {per_process / 2**30:.1f} GiB in each of the "
        f"{processes} process(es) per rank (rank + data workers) while the loader starts. Keep the "
        "checkpoint's world size, data.num_workers and train.micro_batch_size to resume without it"
    )


def endless(loader) -> Iterator[tuple[bool, torch.Tensor]]:
    """(first batch of a new epoch?, batch) across epochs; the loader's state records the position.

    Reading a batch leaves torch's global (CPU) random stream as it found it: torch's DataLoader draws
    its workers' base seed from that stream at the start of each pass, which would otherwise put
    a run resumed from a checkpoint (a new pass begins there, the saved stream restored) one draw off
    the run it continues, and its model.dropout masks with it."""
    finished_epoch = False
    while True:
        yielded = False
        # torch's own DataLoader draws at iter(), litdata's at the first batch: both hidden.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):  # CPU stream saved and restored
                batch = next(batches, None)
            if batch is None:
                break
            yield finished_epoch, batch
            yielded, finished_epoch = True, False
        if not yielded:
            raise ValueError(
                "the training split yields no batch: it is smaller than one micro-batch per process"
            )
        finished_epoch = True
