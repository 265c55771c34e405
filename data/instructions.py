"""Instruction data (``orchestrator prepare --format instruction``): records -> prompt and response
text -> tokens with a loss flag, and the trainer's decoding of a stored block.

Record formats (JSON lines or Parquet rows, read by :mod:`data.shards`), detected per record from its
keys (``prepare --instruction-format auto``, the default; in this order) or forced:

``chat``          ``{"messages": [{"role": ..., "content": ...}, ...]}``
``alpaca``        ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional)
``input_target``  ``{"input": ..., "target": ...}``

Templates (fixed; the only choice is the format). Each example is a sequence of prompt and
response parts:

``input_target``  prompt ``{input}``, response ``{target}``.
``alpaca``        prompt ``{instruction}\\n\\n{input}\\n\\n`` (``{instruction}\\n\\n`` when the input is
                  missing, null or blank), response ``{output}``.
``chat``          every message is a line ``{role}: {content}\\n``; in an assistant message
                  (role ``assistant``) ``{role}:`` is prompt and ``{content}\\n`` the response, every
                  other message (system, user, tool, ...) is prompt. Messages after the last
                  assistant turn are dropped (they have no response to learn).

Tokens: ``[BOS] prompt response ... [EOS]``, each part encoded on its own (consecutive prompt
text is one part), so a single-turn prompt is tokenized exactly as ``encode(prompt)`` is when the
model is prompted with it; with Llama's SentencePiece convention each part starts with a space
(the dummy prefix), which is what separates ``assistant:`` from the reply. The loss counts the
*prediction* of every response token and of the final EOS: on disk such a token carries bit
:data:`LOSS_MASK_BIT` (30), i.e. its value is ``id | 2**30``; prompt tokens and the BOS are stored
as their ids. Values are int32 (litdata has no uint32; ids stay below 2**30). The prepare records
``"format": "instruction"`` and ``"loss_mask_bit": 30`` in ``prepare_stats.json`` (pretraining
data: ``"format": "text"``; absent in older files, which are text).

Bad records are never dropped silently: :class:`BadRecord` carries a ``data.shards.SKIP_REASONS``
reason -- ``unknown_format`` (no known keys, or not an object), ``missing_field`` (a field missing
or of the wrong type, a malformed message), ``empty_response`` (a blank target / output / assistant
turn), ``no_response`` (a chat without an assistant turn); the prepare adds ``too_long``
(``--max-tokens``) and ``excluded_set``.

In the trainer (:func:`split_block`), a block of ``seq_len + 1`` stored values becomes inputs
``tokens[:, :-1]`` and targets ``tokens[:, 1:]`` with ``ignore_index`` wherever the target's flag is
clear. Blocks are cut from the packed stream as for pretraining text, so a block usually starts
inside an example, and an example may continue into the next block; examples do not attend to one
another (the trainer requires ``data.document_mask``: a document starts at each BOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "LOSS_FLAG",
    "LOSS_MASK_BIT",
    "TOKEN_MASK",
    "BadRecord",
    "Example",
    "decode",
    "detect_format",
    "encode_example",
    "split_block",
    "to_example",
]

FORMATS = ("input_target", "alpaca", "chat")  # ``auto``: detected per record
LOSS_MASK_BIT = 30
LOSS_FLAG = 1 << LOSS_MASK_BIT  # set on a stored token whose prediction counts in the loss
TOKEN_MASK = LOSS_FLAG - 1  # value & TOKEN_MASK: the token id
ASSISTANT = "assistant"


class BadRecord(ValueError):
    """A record that is no usable example; ``reason`` is a ``data.shards.SKIP_REASONS`` entry."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """An example as text: ``(text, is_response)`` parts in order, consecutive prompts merged."""

    parts: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.parts)

    @property
    def prompt(self) -> str:
        """The text before the first response (what the model is prompted with)."""
        out = []
        for t, is_response in self.parts:
            if is_response:
                break
            out.append(t)
        return "".join(out)

    @property
    def responses(self) -> list[str]:
        return [t for t, is_response in self.parts if is_response]


def _build(parts: list[tuple[str, bool]]) -> Example:
    merged: list[tuple[str, bool]] = []
    for text, is_response in parts:
        if not text:
            continue
        if merged and not is_response and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, is_response))
    return Example(tuple(merged))


def detect_format(record: Any) -> str | None:
    """The format a record's keys say (None: none of them)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "input" in record and "target" in record:
        return "input_target"
    return None


def _string(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        raise BadRecord("missing_field", f"{key!r} is {what}")
    return value


def _response(text: str, key: str) -> str:
    if not text.strip():
        raise BadRecord("empty_response", f"{key!r} is blank")
    return text


def to_example(record: Any, fmt: str = "auto") -> Example:
    """The example a record holds under ``fmt`` (``auto`` or one of :data:`FORMATS`); raises
    :class:`BadRecord` with the reason when it holds none."""
    if fmt == "auto":
        detected = detect_format(record)
        if detected is None:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise BadRecord("unknown_format", f"no instruction format fits {keys}")
        fmt = detected
    elif fmt not in FORMATS:
        raise ValueError(
            f"instruction format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}"
        )
    if not isinstance(record, dict):
        raise BadRecord("unknown_format", f"a {type(record).__name__}, not an object")
    if fmt == "input_target":
        prompt = _string(record, "input")
        return _build([(prompt, False), (_response(_string(record, "target"), "target"), True)])
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", optional=True)
        output = _response(_string(record, "output"), "output")
        prompt = f"{instruction}\n\n{extra}\n\n" if extra.strip() else f"{instruction}\n\n"
        return _build([(prompt, False), (output, True)])
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("missing_field", "'messages' is not a non-empty list")
    for m in messages:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise BadRecord("missing_field", "a message is not {role: str, content: str}")
    last = max((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), default=None)
    if last is None:
        raise BadRecord("no_response", "no assistant message")
    parts: list[tuple[str, bool]] = []
    for m in messages[: last + 1]:
        if m["role"] == ASSISTANT:
            parts += [(f"{ASSISTANT}:", False), (_response(m["content"], "content") + "\n", True)]
        else:
            parts.append((f"{m['role']}: {m['content']}\n", False))
    return _build(parts)


def encode_example(
    example: Example, encode: Callable[[str], Sequence[int]], bos_id: int, eos_id: int
) -> np.ndarray:
    """``[BOS] part part ... [EOS]`` as stored: int32, response tokens and the EOS flagged."""
    pieces = [np.array([bos_id], dtype=np.int64)]
    for text, is_response in example.parts:
        ids = np.asarray(encode(text), dtype=np.int64)
        pieces.append(ids | LOSS_FLAG if is_response else ids)
    pieces.append(np.array([eos_id | LOSS_FLAG], dtype=np.int64))
    return np.concatenate(pieces).astype(np.int32)


def decode(values: Any) -> tuple[Any, Any]:
    """Stored values (a tensor or array) -> (token ids, loss mask: True where the prediction of the
    token counts in the loss). Values without the flag (pretraining text) decode to themselves."""
    return values & TOKEN_MASK, (values & LOSS_FLAG) != 0


def split_block(block: Any, ignore_index: int = -100) -> tuple[Any, Any]:
    """A (B, T+1) block of stored values (int64 tensor) -> inputs (B, T) and targets (B, T): the
    next tokens, ``ignore_index`` where their prediction does not count (prompt tokens, BOS)."""
    import torch

    tokens, mask = decode(block)
    targets = torch.where(mask[..., 1:], tokens[..., 1:], ignore_index)
    return tokens[..., :-1], targets
