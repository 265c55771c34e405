"""RedLLM generation (models/encdec.py): decoding with `EncoderDecoderCache` is decoding without it.

Without a cache every step recomputes the whole block, `model(ids, encoder_len=prompt_len - 1)`:
the encoder reads the prompt but its last token, the decoder everything after. With it, the
prompt is encoded once, each decoder layer's cross-attention keys/values are computed once, and
each step runs the decoder over one new position."""

import pytest
import torch

from models.build import generation_cache
from models.config import model_config
from models.encdec import EncoderDecoderCache


def tiny(**overrides):
    fields = dict(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=128,
                  max_seq_len=64)  # fmt: skip
    return model_config("redllm-tiny", **{**fields, **overrides})


def random_encdec(cfg, seed=0):
    from tests.hf_helpers import random_model

    return random_model(cfg, seed)


@torch.no_grad()
def greedy_cached(model, prompt, n):
    """Greedy tokens (B, n) and the logits they were picked from (B, n, V), with the cache."""
    B, T = prompt.shape
    cache = generation_cache(model.cfg, B, T + n)
    assert isinstance(cache, EncoderDecoderCache)
    first = model(prompt, kv_cache=cache, start_pos=0)  # the prompt's last position only
    assert first.shape == (B, 1, model.cfg.vocab_size)
    logits, tokens = [first[:, -1]], []
    for i in range(n):
        tokens.append(logits[-1].argmax(-1))  # (B,)
        if i < n - 1:
            logits.append(model(tokens[-1][:, None], kv_cache=cache, start_pos=T + i)[:, -1])
    return torch.stack(tokens, 1), torch.stack(logits, 1), cache


@torch.no_grad()
def greedy_uncached(model, prompt, n):
    """The same decoding, recomputing the whole block for every token."""
    P = prompt.shape[1] - 1
    ids, logits = prompt, []
    for _ in range(n):
        step = model(ids, encoder_len=P)[:, -1]  # (B, V): the decoder's last position
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids[:, P + 1 :], torch.stack(logits, 1)


@pytest.mark.parametrize("overrides", [dict(), dict(attention="eager"), dict(n_layers=2)])
def test_greedy_generation_with_the_cache_equals_generation_without_it(overrides):
    model = random_encdec(tiny(**overrides))
    prompt = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    tokens, logits, _ = greedy_cached(model, prompt, 24)
    ref_tokens, ref_logits = greedy_uncached(model, prompt, 24)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert len({tuple(t) for t in tokens.tolist()}) > 1  # the rows really differ


def test_cached_chunks_match_the_full_block():
    """Prefill, then several tokens at once, then one at a time: the decoder's logits of one
    forward pass over the whole block."""
    model = random_encdec(tiny(n_layers=2))
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    P = 12  # the encoder reads ids[:, :12]; the decoder starts with ids[:, 12]
    with torch.no_grad():
        full = model(ids, encoder_len=P)  # (2, 28, V)
        cache = generation_cache(model.cfg, 2, 40)
        chunks = [model(ids[:, : P + 1], kv_cache=cache, start_pos=0)]
        chunks.append(model(ids[:, P + 1 : P + 5], kv_cache=cache, start_pos=P + 1))
        chunks += [model(ids[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(P + 5, 40)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_encoder_and_cross_attention_keys_values_are_computed_once():
    model = random_encdec(tiny(n_layers=2))
    calls = {"encoder": 0, "k_proj": 0, "v_proj": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    model.encoder_blocks[0].register_forward_hook(count("encoder"))
    for block in model.decoder_blocks:
        block.cross_attn.k_proj.register_forward_hook(count("k_proj"))
        block.cross_attn.v_proj.register_forward_hook(count("v_proj"))
    prompt = torch.randint(3, 128, (2, 6))
    cache = generation_cache(model.cfg, 2, 32)
    with torch.no_grad():
        token = model(prompt, kv_cache=cache, start_pos=0)[:, -1].argmax(-1, keepdim=True)
    assert calls == {"encoder": 1, "k_proj": 2, "v_proj": 2}  # once per decoder layer
    assert cache.encoder_len == 5
    filled = [(k, v) for k, v in cache.cross]
    assert all(k.shape == v.shape == (2, 2, 5, 16) for k, v in filled)  # (B, K, P, E)
    # Twenty more steps on the same cache: nothing is encoded or projected again.
    with torch.no_grad():
        for i in range(20):
            token = model(token, kv_cache=cache, start_pos=6 + i)[:, -1].argmax(-1, keepdim=True)
    assert calls == {"encoder": 1, "k_proj": 2, "v_proj": 2}
    assert all(a is c and b is d for (a, b), (c, d) in zip(filled, cache.cross, strict=True))
    # Without a cache every forward pass projects the encoder's output again.
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 10)), encoder_len=5)
    assert calls == {"encoder": 2, "k_proj": 4, "v_proj": 4}


def test_generation_needs_a_prompt_of_two_tokens():
    model = random_encdec(tiny())
    cache = generation_cache(model.cfg, 1, 16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.tensor([[1]]), kv_cache=cache, start_pos=0)
    with pytest.raises(ValueError, match="starts with start_pos=0"):
        model(torch.tensor([[5]]), kv_cache=generation_cache(model.cfg, 1, 16), start_pos=3)
