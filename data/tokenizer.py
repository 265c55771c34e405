"""SentencePiece BPE tokenizer in Llama-2's convention: training and a thin wrapper.

Trainer settings mirror Llama-2's ``tokenizer.model`` (``model_type=bpe``, ``unk=0, bos=1,
eos=2, pad=-1``, ``byte_fallback``, ``split_digits``, ``allow_whitespace_only_pieces``,
``normalization_rule_name=identity``, ``add_dummy_prefix=True``,
``remove_extra_whitespaces=False``), so ``decode(encode(text)) == text`` for any text
(byte fallback covers characters outside the vocabulary).

One deliberate difference in how data is fed: we train on whole documents (cut into
segments of at most ``max_sentence_length`` bytes at line boundaries) rather than on single
lines. Line-by-line training gives every line a dummy-prefix ``▁`` that never occurs after a
newline at encode time, which wastes vocabulary on code and lists; documents keep the
newlines, so pieces such as ``):\\n`` and ``▁▁▁▁`` are learned where they really occur.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from data.shards import RecordFilter, SkipStats, find_shards, iter_documents

__all__ = [
    "SEPARATORS",
    "Tokenizer",
    "install_tokenizer",
    "train_tokenizer",
    "resolve_training_dir",
]

# How documents are delimited in the token stream (``prepare --separator``).
SEPARATORS = ("bos+eos", "eos", "bos")

# Llama-2's value; longer documents are cut into several training segments.
MAX_SENTENCE_BYTES = 4192


def resolve_training_dir(input_dir: Path) -> Path:
    """The tokenizer learns from the train split only: ``input_dir/train`` if it exists."""
    train = input_dir / "train"
    return train if train.is_dir() else input_dir


def _segments(text: str, max_bytes: int) -> Iterator[str]:
    """Cut a document into pieces of at most ``max_bytes`` UTF-8 bytes, at line boundaries.

    SentencePiece silently drops training sentences longer than ``max_sentence_length``; cutting
    keeps long documents (the bulk of SlimPajama's text) in the training sample.
    """
    if len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:
            # A single over-long line (minified code, tables): hard cut by characters. A UTF-8
            # character is at most 4 bytes, so max_bytes // 4 characters always fit.
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _sample_files(shards: list[Path], max_files: int) -> list[Path]:
    """At most ``max_files`` files spread evenly over the sorted list (first and last included)."""
    if len(shards) <= max_files:
        return shards
    step = (len(shards) - 1) / (max_files - 1)
    return [shards[round(i * step)] for i in range(max_files)]


def train_tokenizer(
    input_dir: str | Path,
    output_prefix: str | Path,
    vocab_size: int = 1024,
    max_sentences: int = 100_000,
    seed: int = 0,
    num_threads: int | None = None,
    byte_fallback: bool = True,
    filter: RecordFilter | None = None,
    max_files: int = 64,
) -> Path:
    """Train a SentencePiece BPE model on a sample of the documents under ``input_dir``.

    ``input_dir`` is a corpus file or a folder of them (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``,
    ``.parquet``); if it has a ``train/`` subfolder (SlimPajama layout) only that split is used,
    so validation text never leaks into the vocabulary. The sample is at most ``max_sentences``
    training segments taken from at most ``max_files`` files spread evenly over the sorted file
    list (an equal share from each, from its start), so a corpus of many sources is represented
    by all of them. ``filter`` selects the text field and drops excluded subsets / short
    documents, as in ``prepare``. The result, ``<output_prefix>.model``, is deterministic for a
    given input, settings and ``seed``. Llama-2 conventions: unk=0, bos=1, eos=2, no pad, and
    256 byte-fallback pieces (``byte_fallback=False`` maps unknown characters to unk instead).
    """
    in_dir = Path(input_dir)
    all_shards = find_shards(resolve_training_dir(in_dir) if in_dir.is_dir() else in_dir)
    min_vocab = (259 if byte_fallback else 3) + 1
    if vocab_size < min_vocab:
        # 256 byte-fallback pieces + unk/bos/eos must fit, plus at least one learned piece.
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {'byte_fallback needs' if byte_fallback else 'need'} "
            f">= {min_vocab}."
        )
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}.")
    if max_files < 2:
        raise ValueError(f"max_files must be >= 2, got {max_files}.")
    shards = _sample_files(all_shards, max_files)
    per_file = -(-max_sentences // len(shards))

    stats = SkipStats()

    def sentences() -> Iterator[str]:
        count = 0
        for shard in shards:
            taken = 0
            for doc in iter_documents(shard, stats, filter):
                for seg in _segments(doc, MAX_SENTENCE_BYTES):
                    yield seg
                    count += 1
                    taken += 1
                    if count >= max_sentences:
                        return
                if taken >= per_file:
                    break

    out_model = Path(f"{output_prefix}.model")
    out_model.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # Global RNG of the SentencePiece library; fixed so repeated trainings give identical bytes.
    spm.set_random_generator_seed(seed)
    try:
        _train(sentences(), model, vocab_size, num_threads, byte_fallback)
    except RuntimeError as e:
        if stats.docs == 0:
            raise ValueError(
                f"No usable documents under {in_dir} to train a tokenizer on "
                f"(skipped records: {stats.to_dict()['skipped']})."
            ) from e
        # Typically the vocabulary is too large for a small corpus, or too small for the
        # corpus' distinct characters + 256 byte pieces; SentencePiece's message gives the
        # bound, we add which input and setting it is about.
        raise ValueError(
            f"SentencePiece training on {in_dir} (vocab_size={vocab_size}) failed: {e}"
        ) from e
    # Write-then-rename: an interrupted run never leaves a truncated .model behind.
    tmp = out_model.with_name(out_model.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_model)
    return out_model


def install_tokenizer(source: str | Path, output_prefix: str | Path) -> Path:
    """Use an existing SentencePiece model (e.g. Llama 2's ``tokenizer.model``): check that it
    loads and has BOS and EOS, and copy it to ``<output_prefix>.model``."""
    src = Path(source)
    tok = Tokenizer(src)  # raises for a missing or invalid file
    missing = [name for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id)) if i < 0]
    if missing:
        raise ValueError(
            f"{src} has no {' / '.join(missing)} token; prepare separates documents with bos/eos. "
            f"Use a Llama-style model (unk=0, bos=1, eos=2)."
        )
    out_model = Path(f"{output_prefix}.model")
    out_model.parent.mkdir(parents=True, exist_ok=True)
    if out_model.resolve() != src.resolve():
        tmp = out_model.with_name(out_model.name + ".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, out_model)
    return out_model


def _train(
    sentences: Iterator[str],
    model: io.BytesIO,
    vocab_size: int,
    num_threads: int | None,
    byte_fallback: bool = True,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama-2 conventions (see module docstring).
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=byte_fallback,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        # Rare characters fall back to bytes anyway; 0.99995 keeps the vocabulary for real
        # pieces on multilingual data, as Llama-2 does.
        character_coverage=0.99995,
        max_sentence_length=MAX_SENTENCE_BYTES,
        # We already chose the sample (first max_sentences segments): no extra sampling or
        # shuffling inside SentencePiece, which keeps training deterministic.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,  # SentencePiece logs every step to stderr otherwise
    )


class Tokenizer:
    """A loaded SentencePiece model with Llama-style BOS/EOS handling."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Tokenizer model {self.path} not found. Train one with `orchestrator tokenizer` "
                f"(or point the config at an existing SentencePiece .model file)."
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"{self.path} is not a valid SentencePiece model ({e}). Re-create it with "
                f"`orchestrator tokenizer`."
            ) from e

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())  # -1: Llama has no pad token

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def separator_ids(self, separator: str) -> tuple[list[int], list[int]]:
        """(ids before, ids after) each document for a ``prepare --separator`` value."""
        if separator not in SEPARATORS:
            raise ValueError(
                f"separator must be one of {', '.join(SEPARATORS)}, got {separator!r}."
            )
        before = [self.bos_id] if separator.startswith("bos") else []
        after = [self.eos_id] if separator.endswith("eos") else []
        if any(i < 0 for i in before + after):
            raise ValueError(
                f"{self.path} has no {'bos' if self.bos_id < 0 else 'eos'} token for separator "
                f"{separator!r}; pick another --separator or a Llama-style tokenizer."
            )
        return before, after

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Accept tensors / numpy arrays too (tolist); SentencePiece wants plain ints.
        seq = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return str(self._sp.decode([int(i) for i in seq]))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
