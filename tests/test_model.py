import torch

from models.config import model_config
from models.llama import Llama, count_parameters


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
    eager = Llama(model_config("tiny", n_layers=2, vocab_size=64, max_seq_len=32, attention="eager"))
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
