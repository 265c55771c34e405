"""The encoder-decoder (RedLLM, models/encdec.py): what each attention may see, continuous RoPE
positions, tied embeddings, and the prefix-LM loss."""

import pytest
import torch
import torch.nn.functional as F

import models.encdec as encdec
from models.build import build_model
from models.config import model_config
from models.encdec import EncoderDecoder
from models.llama import count_parameters
from orchestrator.schema import ConfigError

V = 97


def small(**overrides):
    fields = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=V)
    return model_config("redllm-tiny", max_seq_len=64, **{**fields, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EncoderDecoder(small()).eval()


def test_encoder_is_bidirectional_and_decoder_causal(model):
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 32))  # encoder 0..15, decoder 16..31
    logits = model(ids, encoder_len=16)  # (B, 16, V): decoder positions only
    assert logits.shape == (2, 16, V)
    # The encoder's output: a change at position 10 moves every encoder position, earlier ones too.
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    memory, memory2 = model.encode(ids[:, :16]), model.encode(changed[:, :16])
    assert all(not torch.allclose(memory[:, t], memory2[:, t]) for t in range(16))
    # ... and so every decoder position (cross-attention sees the whole encoder).
    out = model(changed, encoder_len=16)
    assert all(not torch.allclose(out[:, t], logits[:, t]) for t in range(16))
    # A change of decoder token 20 (decoder index 4) leaves decoder positions before it bitwise equal.
    changed = ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % V
    out = model(changed, encoder_len=16)
    assert torch.equal(out[:, :4], logits[:, :4])
    assert all(not torch.allclose(out[:, t], logits[:, t]) for t in range(4, 16))


def test_rope_positions_are_continuous(model, monkeypatch):
    """Encoder at positions 0..P-1, decoder at P..T-1 (self- and cross-attention queries), the
    cross-attention keys at the encoder's positions; generation continues the same numbering."""
    calls = []
    real = encdec.rope_cos_sin

    def spy(seq_len, head_dim, base, device, dtype, offset=0, positions=None):
        assert positions is None  # per-token positions: packed examples only
        calls.append((offset, seq_len))
        return real(seq_len, head_dim, base, device, dtype, offset=offset)

    monkeypatch.setattr(encdec, "rope_cos_sin", spy)
    ids = torch.randint(0, V, (1, 24))
    model(ids, encoder_len=10)
    assert calls == [(0, 10), (10, 14), (0, 10)]  # encoder, decoder, the memory's keys
    calls.clear()
    cache = encdec.EncoderDecoderCache(model.cfg, 1, max_len=16)
    model(
        ids[:, :10], kv_cache=cache, start_pos=0
    )  # prompt: 9 encoded, the 10th starts the decoder
    model(ids[:, 10:11], kv_cache=cache, start_pos=10)
    assert calls == [(0, 9), (9, 1), (0, 9), (10, 1)]  # the second step reuses the cached keys


def test_continuous_positions_make_the_split_a_relabelling_of_relative_distances():
    """With RoPE everywhere, shifting the whole sequence's positions changes nothing: attention
    sees only distances, which continuous positions keep equal to token distances."""
    torch.manual_seed(2)
    m = EncoderDecoder(small(attention="eager")).eval()
    ids = torch.randint(0, V, (2, 20))
    reference = m(ids, encoder_len=8)
    shifted = encdec.rope_cos_sin

    def offset_by_5(seq_len, head_dim, base, device, dtype, offset=0, positions=None):
        assert positions is None  # per-token positions: packed examples only
        return shifted(seq_len, head_dim, base, device, dtype, offset=offset + 5)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encdec, "rope_cos_sin", offset_by_5)
        torch.testing.assert_close(m(ids, encoder_len=8), reference, atol=2e-5, rtol=1e-4)


def test_embeddings_are_tied_and_counted_once():
    cfg = small()
    m = build_model(cfg)
    assert isinstance(m, EncoderDecoder)
    assert m.lm_head.weight is m.embed.weight
    assert count_parameters(m) == cfg.num_params()
    untied = small(tie_embeddings=False)
    assert untied.num_params() - cfg.num_params() == V * 64
    assert count_parameters(build_model(untied)) == untied.num_params()
    with torch.device("meta"):
        big = build_model(model_config("redllm-1.1b"))
    assert count_parameters(big) == model_config("redllm-1.1b").num_params()
    assert big.lm_head.weight is big.embed.weight


def test_prefix_lm_loss_is_the_decoder_tokens_cross_entropy(model):
    torch.manual_seed(3)
    block = torch.randint(0, V, (3, 33))
    inputs, targets = block[:, :-1], block[:, 1:]
    loss = model(inputs, targets=targets)  # default split: half of 32
    memory = model.encode(inputs[:, :16])
    logits = model.decode(inputs[:, 16:], memory, 16)  # (B, 16, V)
    expected = F.cross_entropy(logits.reshape(-1, V).float(), targets[:, 16:].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # The loss ignores the encoder half's targets.
    other = targets.clone()
    other[:, :16] = (other[:, :16] + 1) % V
    assert torch.equal(model(inputs, targets=other), loss)


def test_sdpa_matches_the_eager_reference():
    torch.manual_seed(4)
    sdpa = EncoderDecoder(small())
    eager = EncoderDecoder(small(attention="eager"))
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, V, (2, 30))
    torch.testing.assert_close(sdpa(ids), eager(ids), atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient():
    m = EncoderDecoder(small())
    block = torch.randint(0, V, (2, 17))
    m(block[:, :-1], targets=block[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_config_errors_name_the_key():
    from orchestrator.config import load_config

    with pytest.raises(
        ConfigError, match="model.encoder_len=8 applies to model.arch=encoder_decoder"
    ):
        model_config("tiny", encoder_len=8).validate()
    with pytest.raises(ConfigError, match="model.arch='seq2seq' is not one of decoder"):
        model_config("tiny", arch="seq2seq").validate()
    with pytest.raises(ConfigError, match="model.attn_gate is implemented for model.arch=decoder"):
        small(attn_gate="headwise").validate()
    with pytest.raises(ConfigError, match="leaves no decoder tokens .*train.seq_len"):
        load_config(
            ["--model.name", "redllm-tiny", "--model.encoder_len", "128", "--train.seq_len", "128"]
        )
    cfg = load_config(["--model.name", "redllm-tiny", "--model.encoder_len", "100"])
    assert cfg.model.arch == "encoder_decoder" and cfg.model.encoder_len == 100


def loss_and_grads(model, block):
    loss = model(block[:, :-1], targets=block[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["full", "selective", "compile"])
def test_checkpointed_and_compiled_blocks_match_plain(how):
    """Activation checkpointing and torch.compile reach both stacks' blocks (the units FSDP2
    shards) and change no number beyond float rounding (compile) or none at all (recomputation)."""
    from orchestrator.parallel.activation_checkpointing import (
        apply_activation_checkpointing,
        transformer_blocks,
    )
    from orchestrator.parallel.compile import compile_blocks

    torch.manual_seed(5)
    cfg = small(n_layers=1)
    plain, other = EncoderDecoder(cfg), EncoderDecoder(cfg)
    other.load_state_dict(plain.state_dict())
    blocks = transformer_blocks(other)
    assert blocks == [*other.encoder_blocks, *other.decoder_blocks]
    if how == "compile":
        compile_blocks(other)
    else:
        apply_activation_checkpointing(other, how)
    assert list(other.state_dict()) == list(plain.state_dict())
    block = torch.randint(0, V, (2, 17))
    loss_p, grads_p = loss_and_grads(plain, block)
    loss_o, grads_o = loss_and_grads(other, block)
    if how == "compile":
        assert abs(loss_p.item() - loss_o.item()) < 1e-5
        for name in grads_p:
            torch.testing.assert_close(grads_o[name], grads_p[name], atol=1e-6, rtol=1e-4)
    else:
        assert torch.equal(loss_p, loss_o)
        assert all(torch.equal(grads_o[n], grads_p[n]) for n in grads_p)
