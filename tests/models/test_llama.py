import itertools

import pytest
import torch

from models.config import SIZES, ModelConfig, model_config
from models.llama import (
    Block,
    KVCache,
    Llama,
    RMSNorm,
    apply_rope,
    causal_attention,
    count_parameters,
    rope_cos_sin,
)
from orchestrator.schema import ConfigError


def test_tinyllama_parameter_count_on_meta_device():
    cfg = model_config("tinyllama-1.1b")
    with torch.device("meta"):
        model = Llama(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(model) == 1_100_048_384
    assert cfg.num_params() == 1_100_048_384
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["blocks.0.attn.k_proj.weight"] == (256, 2048)  # 4 KV heads x 64
    assert shapes["blocks.0.ffn.gate_proj.weight"] == (5632, 2048)
    assert len(model.blocks) == 22


def test_shapes_and_causality():
    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2, vocab_size=97, max_seq_len=32)
    model = Llama(cfg)
    ids = torch.randint(0, 97, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 97)
    # Changing a later token never changes earlier logits.
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % 97
    assert torch.equal(model(ids2)[:, :10], logits[:, :10])
    assert not torch.allclose(model(ids2)[:, 10:], logits[:, 10:])


def test_sdpa_matches_eager_reference():
    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2, vocab_size=64, max_seq_len=32)
    sdpa = Llama(cfg)
    eager = Llama(
        model_config("tiny", n_layers=2, vocab_size=64, max_seq_len=32, attention="eager")
    )
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (3, 32))
    torch.testing.assert_close(sdpa(ids), eager(ids), atol=1e-5, rtol=1e-5)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=8, d_model=512, n_heads=8, ffn_hidden=1376)
    model = Llama(cfg)
    q_std = model.blocks[0].attn.q_proj.weight.std().item()
    o_std = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)


def test_tied_embeddings_share_storage():
    model = Llama(model_config("tiny", tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert count_parameters(model) == model_config("tiny", tie_embeddings=True).num_params()


# --- the ladder of sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_builds_on_meta_with_exact_count(name):
    from models.build import build_model
    from models.encdec import EncoderDecoder

    cfg = model_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, EncoderDecoder if cfg.arch == "encoder_decoder" else Llama)
    assert count_parameters(model) == cfg.num_params()


def test_ladder_spans_millions_to_two_billion():
    from models.config import REDLLM_PAIRS

    counts = {name: model_config(name).num_params() for name in SIZES}
    assert counts["tiny"] < 5e6
    assert 115e6 < counts["llama-124m"] < 135e6  # GPT-2 small scale
    assert 350e6 < counts["llama-400m"] < 450e6
    assert counts["tinyllama-1.1b"] == 1_100_048_384
    assert 1.9e9 < counts["llama-2b"] < 2.2e9
    # Each family's ladder grows (the redllm-* sizes follow the decoders in SIZES).
    for arch in ("decoder", "encoder_decoder"):
        family = [counts[n] for n in SIZES if model_config(n).arch == arch]
        assert len(family) >= 8 and family == sorted(family), arch
    # Each encoder-decoder size is within 5% of its decoder partner's count.
    assert set(REDLLM_PAIRS) == {n for n in SIZES if model_config(n).arch == "encoder_decoder"}
    for red, (dec, _) in REDLLM_PAIRS.items():
        assert abs(counts[red] / counts[dec] - 1) < 0.05, (red, counts[red], dec, counts[dec])


def test_unknown_size_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        model_config("llama-7b")
    for name in SIZES:
        assert name in str(e.value)
    from orchestrator.config import load_config

    with pytest.raises(ConfigError, match="model.name='gpt2'.*llama-124m"):
        load_config(["--model.name", "gpt2"])


def test_sizes_and_options_usable_from_config():
    from orchestrator.config import load_config

    cfg = load_config(["--model.name", "llama-124m", "--model.attn_gate", "headwise", "--model.sandwich_norm", "true",
                       "--model.rope_base", "500000", "--model.norm_eps", "1e-6", "--model.qk_norm", "true",
                       "--model.z_loss", "1e-4"])  # fmt: skip
    assert (cfg.model.d_model, cfg.model.attn_gate, cfg.model.sandwich_norm) == (
        768,
        "headwise",
        True,
    )
    assert cfg.model.qk_norm is True and cfg.model.z_loss == 1e-4
    assert cfg.model.rope_base == 500000.0 and cfg.model.norm_eps == 1e-6
    with pytest.raises(ConfigError, match="model.attn_gate"):
        load_config(["--model.name", "tiny", "--model.attn_gate", "per-head"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attn_gate", "both"),
        ("rope_base", 0.0),
        ("norm_eps", -1e-5),
        ("init_std", 0.0),
        ("attention", "flash"),
        ("qk_norm", "yes"),
        ("z_loss", -1e-4),
        ("z_loss", float("nan")),
        ("z_loss", "1e-4"),
    ],
)
def test_invalid_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        model_config("tiny", **{key: value}).validate()


def test_meta_construction_then_materialize():
    cfg = model_config("tiny", n_layers=8, d_model=512, n_heads=8, ffn_hidden=1376, tie_embeddings=True,
                       attn_gate="headwise")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(cfg)
    model.materialize("cpu")
    assert model.lm_head.weight is model.embed.weight  # still tied after to_empty
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].ffn.down_proj.weight.std().item() - 0.02 / 4) < 0.001
    assert torch.equal(model.blocks[0].attn.g_proj.bias, torch.zeros(8))
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(512))
    assert model(torch.randint(0, cfg.vocab_size, (1, 8))).isfinite().all()


# --- options: exact parameter counts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "sandwich", "tie", "qk"),
    list(
        itertools.product(
            ["none", "headwise", "elementwise"], [False, True], [False, True], [False, True]
        )
    ),
)
def test_num_params_exact_for_every_option(gate, sandwich, tie, qk):
    cfg = model_config("tiny", attn_gate=gate, sandwich_norm=sandwich, tie_embeddings=tie, qk_norm=qk,
                       z_loss=1e-4 if qk else 0.0)  # fmt: skip
    with torch.device("meta"):
        model = Llama(cfg)
    assert count_parameters(model) == cfg.num_params()
    base = model_config("tiny", tie_embeddings=tie).num_params()
    d, h, e, L = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_layers
    gate_params = {"none": 0, "headwise": (d + 1) * h, "elementwise": (d + 1) * h * e}[gate]
    # QK-norm: two head_dim-wide gains per layer (queries, keys); the z-loss adds no parameter.
    assert cfg.num_params() == base + L * (
        gate_params + (2 * d if sandwich else 0) + (2 * e if qk else 0)
    )


# --- gated attention ----------------------------------------------------------------------------


def _block_pair(**options):
    """A plain block and a block with `options`, sharing every common weight."""
    torch.manual_seed(0)
    plain_cfg = model_config("tiny", n_kv_heads=2)
    plain = Block(plain_cfg).eval()
    variant = Block(model_config("tiny", n_kv_heads=2, **options)).eval()
    missing, unexpected = variant.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    x = torch.randn(2, 12, plain_cfg.d_model)
    cos, sin = rope_cos_sin(12, plain_cfg.head_dim, plain_cfg.rope_base, x.device, x.dtype)
    return plain, variant, missing, (x, cos, sin)


@pytest.mark.parametrize(("kind", "gate_dim"), [("headwise", 8), ("elementwise", 256)])
def test_gated_attention_shapes_and_identity(kind, gate_dim):
    plain, gated, missing, args = _block_pair(attn_gate=kind)
    assert sorted(missing) == ["attn.g_proj.bias", "attn.g_proj.weight"]
    g = gated.attn.g_proj
    assert tuple(g.weight.shape) == (gate_dim, 256) and tuple(g.bias.shape) == (gate_dim,)
    assert count_parameters(gated) - count_parameters(plain) == 256 * gate_dim + gate_dim
    # Gate shape: one value per head (headwise) or per channel (elementwise), per token.
    gate_out = torch.sigmoid(g(args[0]))
    assert tuple(gate_out.shape) == (2, 12, gate_dim)
    with torch.no_grad():
        y_plain = plain(*args)
        assert gated(*args).shape == y_plain.shape == (2, 12, 256)
        # A large gate bias saturates the sigmoid at exactly 1.0 in fp32: the plain block.
        g.bias.fill_(100.0)
        assert torch.equal(gated(*args), y_plain)
        # A gate of 0 silences attention: the block is x + FFN(norm(x)).
        g.bias.fill_(-100.0)
        x = args[0]
        assert torch.allclose(gated(*args), x + gated.ffn(gated.ffn_norm(x)), atol=1e-6)


def test_headwise_gate_scales_each_head():
    _, gated, _, (x, cos, sin) = _block_pair(attn_gate="headwise")
    attn = gated.attn
    with torch.no_grad():
        attn.g_proj.weight.zero_()
        attn.g_proj.bias.copy_(
            torch.tensor([100.0, -100.0] * 4)
        )  # heads 0,2,4,6 open; 1,3,5,7 shut
        h = gated.attn_norm(x)
        out = attn(h, cos, sin)
        # Reference: plain attention with the shut heads' outputs zeroed before o_proj.
        o_proj, attn.o_proj = attn.o_proj, torch.nn.Identity()
        attn.g_proj.bias.fill_(100.0)
        heads = attn(h, cos, sin).view(2, 12, 8, 32)
        attn.o_proj = o_proj
        heads[:, :, 1::2] = 0
        torch.testing.assert_close(out, o_proj(heads.reshape(2, 12, 256)), atol=1e-6, rtol=1e-5)


# --- sandwich norm ------------------------------------------------------------------------------


def test_sandwich_norm_off_is_the_plain_block():
    plain, same, missing, args = _block_pair(sandwich_norm=False, attn_gate="none")
    assert not missing and same.attn_out_norm is None and same.ffn_out_norm is None
    assert torch.equal(same(*args), plain(*args))


def test_sandwich_norm_shapes_counts_and_math():
    plain, sandwich, missing, (x, cos, sin) = _block_pair(sandwich_norm=True)
    assert sorted(missing) == ["attn_out_norm.weight", "ffn_out_norm.weight"]
    assert count_parameters(sandwich) - count_parameters(plain) == 2 * 256
    assert isinstance(sandwich.attn_out_norm, RMSNorm) and sandwich.attn_out_norm.weight.shape == (
        256,
    )
    with torch.no_grad():
        sandwich.attn_out_norm.weight.mul_(0.5)
        y = sandwich(x, cos, sin)
        assert y.shape == (2, 12, 256)
        # Each branch output is normalised (RMS = its gain) before the residual add.
        a = sandwich.attn(sandwich.attn_norm(x), cos, sin)
        normed = sandwich.attn_out_norm(a)
        ms, eps = a.pow(2).mean(-1), sandwich.attn_out_norm.eps
        torch.testing.assert_close(normed.pow(2).mean(-1).sqrt(), 0.5 * (ms / (ms + eps)).sqrt())
        h = x + normed
        expected = h + sandwich.ffn_out_norm(sandwich.ffn(sandwich.ffn_norm(h)))
        assert torch.equal(y, expected)
        assert not torch.allclose(y, plain(x, cos, sin), atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        dict(attn_gate="elementwise", sandwich_norm=True),
        dict(attn_gate="headwise"),
        dict(qk_norm=True, z_loss=1e-4),
    ],
)
def test_variants_train_and_keep_causality(options):
    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2, vocab_size=97, max_seq_len=32, **options)
    model = Llama(cfg)
    ids = torch.randint(0, 97, (2, 16))
    logits = model(ids)
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % 97
    assert torch.equal(model(ids2)[:, :10], logits[:, :10])
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_config_field_docs():
    import dataclasses

    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f.name
    assert ModelConfig().attn_gate == "none" and ModelConfig().sandwich_norm is False
    assert ModelConfig().qk_norm is False and ModelConfig().z_loss == 0.0


# --- QK-norm ------------------------------------------------------------------------------------


def test_qk_norm_off_is_the_plain_block():
    plain, same, missing, args = _block_pair(qk_norm=False)
    assert not missing and same.attn.q_norm is None and same.attn.k_norm is None
    assert torch.equal(same(*args), plain(*args))


def test_qk_norm_shapes_counts_and_math():
    """One (E,) gain for the queries and one for the keys (shared by the heads, GQA's 2 key heads
    included), inside the attention module; queries / keys normalised per head before RoPE."""
    plain, qk, missing, (x, cos, sin) = _block_pair(qk_norm=True)
    attn, E = qk.attn, qk.attn.head_dim
    assert sorted(missing) == ["attn.k_norm.weight", "attn.q_norm.weight"]
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (E,)
    assert attn.q_norm.eps == qk.attn_norm.eps == 1e-5  # model.norm_eps
    assert count_parameters(qk) - count_parameters(plain) == 2 * E
    torch.manual_seed(1)
    with torch.no_grad():
        attn.q_norm.weight.copy_(0.5 + torch.rand(E))
        attn.k_norm.weight.copy_(0.5 + torch.rand(E))
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in (("q", attn.q_norm), ("k", attn.k_norm))]  # fmt: skip
    with torch.no_grad():
        h = qk.attn_norm(x)
        out = attn(h, cos, sin)
    for hook in hooks:
        hook.remove()
    (q_in, q_out), (k_in, k_out) = seen["q"], seen["k"]
    assert q_out.shape == (2, 12, 8, E) and k_out.shape == (2, 12, 2, E)  # (B, T, heads, E)
    for inp, normed, gain in ((q_in, q_out, attn.q_norm.weight), (k_in, k_out, attn.k_norm.weight)):
        # Every head of every token: RMS over E of normed / gain is 1 (up to eps), whatever the input's.
        ms = inp.pow(2).mean(-1)
        torch.testing.assert_close(
            (normed / gain).pow(2).mean(-1).sqrt(), (ms / (ms + 1e-5)).sqrt()
        )
        assert inp.pow(2).mean(-1).sqrt().std() > 0.01  # the raw projections are not normalised
    # The whole attention: norm, then RoPE, then attention (not RoPE first: the gains do not commute).
    with torch.no_grad():
        B, T, H, K = 2, 12, 8, 2
        q = attn.q_norm(attn.q_proj(h).view(B, T, H, E)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(B, T, K, E)).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, K, E).transpose(1, 2)
        y = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, eager=True)
        expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, H * E))
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        q_late = attn.q_norm(
            apply_rope(attn.q_proj(h).view(B, T, H, E).transpose(1, 2), cos, sin).transpose(1, 2)
        )
        assert not torch.allclose(q_late.transpose(1, 2), q, atol=1e-4)  # the order matters


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_qk_norm_model_trains_and_generates_with_a_cache(attention):
    """QK-norm with grouped-query attention: gains get gradients; incremental decoding (normalised,
    rotated keys in the cache) gives the full forward's logits."""
    torch.manual_seed(0)
    cfg = model_config(
        "tiny", n_layers=2, vocab_size=97, max_seq_len=32, qk_norm=True, attention=attention
    )
    model = Llama(cfg)
    ids = torch.randint(0, 97, (2, 12))
    loss = model(ids, targets=ids)
    loss.backward()
    assert all(b.attn.q_norm.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert all(b.attn.k_norm.weight.grad.abs().sum() > 0 for b in model.blocks)
    model.eval()
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, batch_size=2)
        steps = [model(ids[:, :8], kv_cache=cache, start_pos=0)]
        steps += [model(ids[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# --- z-loss -------------------------------------------------------------------------------------


def test_z_loss_is_a_training_objective_kept_for_logging():
    """model.z_loss: the training loss is CE + the z-term, which the model keeps (detached, on the
    device) for train/z_loss; in eval mode (validation) the loss is the plain CE and no term is kept.
    z_loss = 0 keeps the loss exactly that of a model without the option."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2, vocab_size=97, max_seq_len=32, z_loss=1e-2,
                       loss_kernel="cross_entropy")  # fmt: skip
    model = Llama(cfg)
    ids, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        logits = model(ids).flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    z_by_hand = 1e-2 * logits.logsumexp(-1).pow(2).mean()
    loss = model(ids, targets=targets)
    assert isinstance(model.last_z_loss, torch.Tensor) and not model.last_z_loss.requires_grad
    torch.testing.assert_close(model.last_z_loss, z_by_hand)
    torch.testing.assert_close(loss, ce + z_by_hand)
    model.eval()
    torch.testing.assert_close(model(ids, targets=targets), ce)
    assert model.last_z_loss is None
    model.train()
    plain = Llama(
        model_config("tiny", n_layers=2, vocab_size=97, max_seq_len=32, loss_kernel="cross_entropy")
    )
    plain.load_state_dict(model.state_dict())
    model.cfg.z_loss = 0.0
    assert torch.equal(model(ids, targets=targets), plain(ids, targets=targets))
    assert model.last_z_loss is None and plain.last_z_loss is None
