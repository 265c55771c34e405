"""Scoring shared by `orchestrator evaluate` and the in-loop tasks (training/downstream.py):
continuation log-probabilities, and exact match's prompts, records and answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.instructions import FORMATS, BadRecord, to_example
from data.tokenizer import Tokenizer
from models.llama import LanguageModel
from orchestrator.evaluation.generation import completion

ANSWER_STOP = "\n"  # an exact-match answer ends at the first newline (the harness task's `until`)


def continuation_logprobs(
    model: LanguageModel, context: list[int], continuation: list[int]
) -> tuple[torch.Tensor, bool]:
    """(log p of each continuation token given the context and the continuation before it: (C,)
    fp32 on the model's device, whether greedy decoding would produce the continuation).

    Decoder: the logits of model(ids[:-1]) over ids = context + continuation, at the last
    len(continuation) positions. Encoder-decoder (prefix LM): the same block with
    encoder_len = len(context) - 1: the encoder reads the context but its last token, the decoder
    reads [last context token] + continuation[:-1], and its logits are exactly the continuation's.
    A context longer than the model's window loses its first tokens (as the harness's `hf` model
    truncates); the encoder-decoder keeps at least two (one to encode, one to start the decoder).
    """
    if not continuation:
        raise ValueError("an empty continuation has no tokens to score")
    encdec = model.cfg.arch == "encoder_decoder"
    window = model.cfg.max_seq_len + 1  # block length + the last target
    ids = (context + continuation)[-window:]
    n_context = len(ids) - len(continuation)
    if n_context < (2 if encdec else 1):
        raise ValueError(
            f"a context of {len(context)} tokens with a continuation of {len(continuation)} in a "
            f"window of {model.cfg.max_seq_len} leaves {max(n_context, 0)} context tokens: "
            + (
                "the encoder-decoder needs >= 2 (its encoder reads all but the last, which starts "
                "the decoder): give a non-empty context after BOS, or a shorter continuation"
                if encdec
                else "the continuation must fit the window after at least one context token"
            )
        )
    device = next(model.parameters()).device
    inputs = torch.tensor([ids[:-1]], device=device)  # (1, L-1)
    kwargs = {"encoder_len": n_context - 1} if encdec else {}
    logits = model(inputs, **kwargs)[0, -len(continuation) :]  # (C, V)
    targets = torch.tensor(continuation, device=device)  # (C,)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    greedy = bool((logits.argmax(dim=-1) == targets).all())
    return logp[torch.arange(len(continuation), device=device), targets], greedy


def read_instruction_records(
    path: str | Path, limit: int = 0, instruction_format: str = "auto"
) -> list[tuple[str, str]]:
    """(prompt, stripped first response) of each record of a JSON-lines file of instruction
    records (data/instructions.py; `instruction_format` auto: detected per record), its first
    `limit` (0: all); ValueError naming the file, the line and the formats otherwise."""
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if limit and len(out) == limit:
            break
        try:
            example = to_example(json.loads(line), instruction_format)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}, is not JSON: {e}") from None
        except BadRecord as e:
            raise ValueError(
                f"{path}, line {number}: no instruction record ({e.reason}: {e}); exact match reads "
                f"the formats of data/instructions.py ({', '.join(FORMATS)}): "
                '{"input": ..., "target": ...}, {"instruction": ..., "output": ...} or '
                '{"messages": [{"role": ..., "content": ...}, ...]}'
            ) from None
        out.append((example.prompt, example.responses[0].strip()))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def generation_prompt(
    tok: Tokenizer, prompt: str, max_seq_len: int, max_new_tokens: int
) -> list[int]:
    """[BOS] + encode(prompt), as in training, without the first tokens that would leave fewer than
    `max_new_tokens` positions in a window of `max_seq_len` (the harness's `hf` model truncates a
    generation context so), keeping at least 2 (the encoder-decoder reads all but the last)."""
    return tok.encode(prompt, bos=True)[-max(max_seq_len - max_new_tokens, 2) :]


def exact_match_answer(tok: Tokenizer, out: list[int], prompt_len: int) -> str:
    """The answer in `out` (prompt + generated ids): the generated text before EOS and before the
    first newline, stripped of surrounding whitespace. Tokens after EOS or the newline never
    count, so a generation may run a fixed number of steps (as in the training loop) or stop at
    EOS (as `exact_match` does) and give the same answer."""
    eos = tok.eos_id if tok.eos_id >= 0 else None
    return tok.decode(completion(out, prompt_len, eos)).split(ANSWER_STOP, 1)[0].strip()
