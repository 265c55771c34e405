"""optimizer.implementation: torch's AdamW fused / foreach / for-loop, chosen by the config."""

import pytest
import torch

from models.config import model_config
from models.llama import Llama
from orchestrator.config import Config, load_config
from orchestrator.schema import ConfigError
from orchestrator.training.optim import adamw_implementation, build_optimizer


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(model_config("tiny", n_layers=2, vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2,
                              ffn_hidden=128, max_seq_len=32))  # fmt: skip


def test_auto_is_fused_on_cpu_and_foreach_where_fused_cannot_run():
    params = list(tiny_model().parameters())
    assert adamw_implementation("auto", params) == {"fused": True, "foreach": False}
    meta = [torch.empty(3, device="meta", requires_grad=True)]
    assert adamw_implementation("auto", meta) == {"fused": False, "foreach": True}
    assert adamw_implementation("for-loop", params) == {"fused": False, "foreach": False}
    optimizer = build_optimizer(tiny_model(), Config())
    assert all(group["fused"] for group in optimizer.param_groups)


def test_every_implementation_takes_the_same_steps():
    """Three AdamW steps (weight decay on matrices, none on norms) agree across implementations."""
    finals = {}
    for implementation in ("for-loop", "foreach", "fused"):
        model = tiny_model()
        cfg = load_config(["--optimizer.implementation", implementation, "--optimizer.lr", "1e-2"])
        optimizer = build_optimizer(model, cfg)
        ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finals[implementation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert optimizer.state_dict()["state"], implementation
    start = dict(tiny_model().named_parameters())
    for implementation in ("foreach", "fused"):
        for name, value in finals["for-loop"].items():
            torch.testing.assert_close(finals[implementation][name], value, atol=1e-6, rtol=1e-5)
            assert not torch.equal(value, start[name])  # every parameter moved


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.implementation"):
        load_config(["--optimizer.implementation", "apex"])
