"""Generation with a KV cache, the piece evaluation and training share: sampling, greedy
decoding and cutting a completion at EOS (`orchestrator generate`, exact match, in-loop samples)."""

from __future__ import annotations

import torch

from models.build import generation_cache
from models.llama import LanguageModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next token ids (B,). temperature <= 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    model: LanguageModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """input_ids: (B, T) prompts of equal length -> (B, T + n) with n <= max_new_tokens new tokens.

    A sequence that has produced `eos_id` keeps receiving it until all have (or the budget ends).
    `vocab_limit`: never produce ids >= this (the rows a padded embedding has beyond the tokenizer).
    The KV cache holds keys/values in the dtype attention computes in (bf16 under autocast or FSDP2
    bf16 mixed precision, whatever the parameters' dtype): see `models.llama.KVCache`.
    Either family (`models.build.generation_cache` picks the cache); the encoder-decoder's prefill
    returns only the logits of the prompt's last token, (B, 1, V), which is all that is read.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if model.cfg.arch == "encoder_decoder" and T < 2:
        raise ValueError(
            f"the encoder-decoder needs a prompt of at least 2 tokens, got {T}: its encoder reads all "
            "of the prompt but the last token, which starts the decoder, so BOS alone (an empty "
            "prompt) leaves it nothing to encode: give a non-empty prompt after BOS"
        )
    max_len = model.cfg.max_seq_len
    if T > max_len:
        raise ValueError(
            f"the prompt has {T} tokens; the model's context is model.max_seq_len={max_len}"
        )
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    steps = min(max_new_tokens, max_len - T)
    cache = generation_cache(model.cfg, B, max_len=T + steps)  # buffers in the compute dtype
    was_training = model.training
    model.eval()
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(input_ids, kv_cache=cache, start_pos=0)[:, -1]  # (B, V), prefill (either family)
    for i in range(steps):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if bool(done.all()) or i == steps - 1:
            break
        logits = model(token[:, None], kv_cache=cache, start_pos=T + i)[:, -1]  # (B, V)
    model.train(was_training)
    return torch.cat(out, dim=1)


def greedy(
    model: LanguageModel,
    ids: list[int],
    max_new_tokens: int,
    vocab_limit: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """One prompt's greedy generation: the prompt's ids and the new ones. Without `eos_id` it runs
    every step of the budget (no early stop: ranks of a sharded model stay in lockstep; cut the
    answer with `completion`); with it, it stops once EOS is produced."""
    out = generate(
        model,
        torch.tensor([ids]),
        max_new_tokens,
        temperature=0.0,
        eos_id=eos_id,
        vocab_limit=vocab_limit,
    )
    return out[0].tolist()


def completion(out: list[int], prompt_len: int, eos_id: int | None) -> list[int]:
    """The generated ids of one sequence `out` (prompt + new tokens), cut before the first EOS
    (eos_id None or < 0: the tokenizer has none, nothing is cut)."""
    new = out[prompt_len:]
    if eos_id is not None and eos_id >= 0 and eos_id in new:
        new = new[: new.index(eos_id)]
    return new
