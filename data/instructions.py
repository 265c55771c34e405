"""Instruction data (``orchestrator prepare --format instruction``): records -> prompt and response
text -> tokens with a loss flag, and the trainer's decoding of a stored block (:func:`split_block`).

Formats (``chat``, ``alpaca``, ``input_target``), templates, the loss bit :data:`LOSS_MASK_BIT` on
disk and the :class:`BadRecord` skip reasons: docs/data.md, "Instruction data: formats, templates,
tokens".
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
