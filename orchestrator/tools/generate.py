"""Sampling from a checkpoint with a KV cache.

    orchestrator generate --checkpoint runs/demo --prompt "The capital of" --max-new-tokens 64 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0

The prompt is encoded as in training ([bos] + sentencepiece ids) and fed once (prefill); each
new token then costs one forward pass over a single position, attending to the cached keys
and values (`models.llama.KVCache`). `temperature 0` is greedy decoding. Generation stops at
the end-of-sequence token, after `max_new_tokens`, or at the model's context length.

Both families (`model.arch`): the encoder-decoder (models/encdec.py) encodes all of the prompt
but its last token once, at prefill, and its decoder starts from that last token, so its prompt
needs >= 2 tokens ([bos] + at least one piece); its cache (`EncoderDecoderCache`) also holds each
decoder layer's cross-attention keys/values, computed once from the encoder's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from orchestrator.devices import pick_device
from orchestrator.evaluation.generation import completion, generate
from orchestrator.tools.hf import inference_dtype, load_model


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    tokenizer: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> str:
    """Prompt + completion, decoded, from a checkpoint (or a run directory: its latest checkpoint)."""
    dev = pick_device(device)
    model, cfg = load_model(checkpoint, device=dev, dtype=inference_dtype(dtype, dev))
    tok = Tokenizer(tokenizer or cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces, more than model.vocab_size={cfg.model.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    ids = tok.encode(prompt, bos=True)
    if len(ids) + max_new_tokens > cfg.model.max_seq_len:
        print(
            f"note: prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the context of "
            f"{cfg.model.max_seq_len}; generation stops there",
            file=sys.stderr,
        )
    out = generate(
        model,
        torch.tensor([ids]),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tok.eos_id if tok.eos_id >= 0 else None,
        seed=seed,
        vocab_limit=tok.vocab_size,
    )[0].tolist()
    new = completion(out, len(ids), tok.eos_id)
    return tok.decode(ids[1:] + new)
