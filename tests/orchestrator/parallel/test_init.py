"""Sharded strategies build without holding the whole model, with bitwise the initial weights of an
unsharded build (orchestrator/parallel/init.py).

FSDP2 builds on the meta device and materialises each rank's shards in `fabric.setup`; ZeRO-3
partitions each module as it is built (`deepspeed.zero.Init`). Either way every parameter, and the
random stream after initialisation, equals `build_model` under DDP for the same seed. Run as a
script by Fabric's launcher, one process per rank (gloo, 2 CPU processes).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from orchestrator.parallel.init import FullTensorInit  # noqa: E402

MODEL = [
    "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_hidden", "172", "--model.vocab_size", "512",
    "--model.max_seq_len", "64",
]  # fmt: skip
STRATEGIES = {
    "fsdp": ["--strategy.name", "fsdp"],
    "zero3": ["--strategy.name", "deepspeed", "--strategy.zero_stage", "3"],
}
ARCHS = {  # the decoder; the encoder-decoder has tied embeddings
    "decoder": ["--model.name", "tiny"],
    "encoder_decoder": ["--model.name", "redllm-tiny"],
}


def test_a_meta_build_draws_what_a_real_build_draws():
    """The constructor's throwaway init still advances the generator (one full tensor at a time),
    so the weights drawn at materialisation are the real build's; without the mode they are not."""
    from models.build import build_model
    from orchestrator.config import load_config
    from orchestrator.parallel.init import materialize_sharded

    cfg = load_config([*ARCHS["decoder"], *MODEL]).model
    torch.manual_seed(3)
    real = build_model(cfg).state_dict()
    after_real = torch.get_rng_state()
    for mode in (FullTensorInit("cpu"), None):
        torch.manual_seed(3)
        with torch.device("meta"), mode or torch.device("meta"):
            model = build_model(cfg)
        assert all(p.is_meta for p in model.parameters())
        materialize_sharded(model, torch.device("cpu"))
        same = all(torch.equal(v, real[k]) for k, v in model.state_dict().items())
        assert same == (mode is not None)
        assert torch.equal(torch.get_rng_state(), after_real) == (mode is not None)


def rank_checks(strategy: str, arch: str, precision: str = "32-true") -> dict:
    """On every rank: build under the strategy, set up, gather the weights."""
    from models.build import build_model
    from orchestrator.config import load_config
    from orchestrator.parallel.launch import build_fabric

    # Checkpointed and compiled as training is (`parallelize`): neither may change a weight.
    cfg = load_config(
        [*ARCHS[arch], *MODEL, *STRATEGIES[strategy], "--strategy.accelerator", "cpu",
         "--strategy.devices", "2", "--strategy.precision", precision,
         "--strategy.activation_checkpointing", "full", "--model.compile", "true"]
    )  # fmt: skip
    fabric = build_fabric(cfg)
    fabric.launch()
    torch.manual_seed(11)
    reference = build_model(cfg.model)  # an unsharded build (DDP's), same seed
    reference_rng = torch.get_rng_state()
    torch.manual_seed(11)
    with fabric.init_module():
        model = build_model(cfg.model)
    total = sum(p.numel() for p in reference.parameters())
    # What this rank holds before setup: nothing (meta) or its partitions (ZeRO-3).
    held = sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (0 if p.is_meta else p.numel())
        for p in model.parameters()
    )
    steps, model = parallelize_in_order(fabric, model, cfg)
    rng_same = torch.equal(torch.get_rng_state(), reference_rng)
    module = fabric.strategy._deepspeed_engine.module if strategy == "zero3" else model.module
    if strategy == "zero3":
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    else:
        weights = {n: p.full_tensor() for n, p in module.named_parameters()}
    gathering = fsdp_gathering(module) if strategy == "fsdp" else {}
    # ZeRO-3 under bf16 keeps bf16 weights (as it did when it converted a full fp32 build).
    dtype = next(iter(weights.values())).dtype
    expected = {n: p.detach().to(dtype) for n, p in reference.named_parameters()}
    return {
        **gathering,
        "steps": steps,
        "held_fraction": held / total,
        "rng_same": rng_same,
        "names_same": sorted(weights) == sorted(expected),
        "unequal": [n for n in expected if not torch.equal(weights[n], expected[n])],
    }


def parallelize_in_order(fabric, model: torch.nn.Module, cfg) -> tuple[list[str], object]:
    """`parallelize` (what train.setup calls) with its three steps recorded as they run, and each
    block's state after: checkpointed, compiled and sharded (FSDP2 unit / ZeRO-3 partitions)."""
    from torch.distributed.fsdp import FSDPModule

    from orchestrator.parallel import parallelize as p
    from orchestrator.parallel.activation_checkpointing import transformer_blocks

    steps = []

    def recorded(name, fn):
        def run(*args, **kwargs):
            steps.append(name)
            return fn(*args, **kwargs)

        return run

    real = (p.apply_activation_checkpointing, p.compile_blocks, fabric.setup)
    p.apply_activation_checkpointing = recorded("checkpointing", real[0])
    p.compile_blocks = recorded("compile", real[1])
    fabric.setup = recorded("shard", real[2])
    try:
        wrapped, _ = p.parallelize(fabric, model, cfg)
    finally:
        p.apply_activation_checkpointing, p.compile_blocks, fabric.setup = real
    for block in transformer_blocks(model):
        sharded = isinstance(block, FSDPModule) or all(
            hasattr(q, "ds_id") for q in block.parameters()
        )
        state = (block._activation_checkpointing, block._compiled_call_impl is not None, sharded)
        steps.append("block " + ("ok" if state == (True, True, True) else str(state)))
    return steps, wrapped


def fsdp_gathering(module: torch.nn.Module) -> dict:
    """In-loop generation under FSDP2 (`gathered`): every unit stays gathered from its first
    forward on (no all-gather per generated token), reshards after, and generates the same."""
    from torch.distributed.tensor import DTensor

    from orchestrator.evaluation.generation import greedy
    from orchestrator.parallel.compile import eager
    from orchestrator.parallel.fsdp import gathered

    module.eval()
    with eager():  # as in training: generation never compiles
        plain = greedy(module, [1, 5, 7], 4)
        with gathered(module):
            kept = greedy(module, [1, 5, 7], 4)
            held = not any(isinstance(p, DTensor) for p in module.parameters())
    return {
        "gathered_same": kept == plain,
        "gathered_held": held,
        "resharded_after": all(isinstance(p, DTensor) for p in module.parameters()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sharded_builds_hold_their_share_and_equal_an_unsharded_build(strategy, tmp_path):
    from tests.orchestrator.parallel.test_strategies import run

    run([sys.executable, str(Path(__file__).resolve()), strategy, str(tmp_path)])
    for name in [*ARCHS, "decoder-bf16"] if strategy == "zero3" else ARCHS:
        for rank in (0, 1):
            out = json.loads((tmp_path / f"{name}.{rank}.json").read_text())
            print(strategy, name, rank, out)
            assert out["names_same"] and out["unequal"] == [], (name, rank, out)
            assert out["rng_same"], (name, rank)
            assert out["held_fraction"] <= 0.51, (name, rank, out)  # never the whole model
            # Checkpointing, then compilation, then sharding; every block got all three.
            assert out["steps"][:3] == ["checkpointing", "compile", "shard"], out["steps"]
            assert set(out["steps"][3:]) == {"block ok"}, out["steps"]
            if strategy == "fsdp":  # generation inside training (orchestrator/parallel/fsdp.py)
                assert out["gathered_same"] and out["gathered_held"] and out["resharded_after"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy, out_dir = sys.argv[1], Path(sys.argv[2])
    runs = {arch: (arch, "32-true") for arch in ARCHS}
    if strategy == "zero3":
        runs["decoder-bf16"] = ("decoder", "bf16-mixed")
    for name, (arch, precision) in runs.items():
        result = rank_checks(strategy, arch, precision)
        rank = torch.distributed.get_rank()
        (out_dir / f"{name}.{rank}.json").write_text(json.dumps(result))
