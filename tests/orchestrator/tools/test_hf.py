"""Export to / import from the Hugging Face Llama format, checked against transformers itself."""

import json
import os
import stat

import pytest
import torch

from orchestrator import cli
from orchestrator.checkpoint.consolidate import load_model_state
from orchestrator.checkpoint.manifest import verify
from orchestrator.schema import ConfigError
from orchestrator.tools.hf import (
    export_checkpoint,
    import_hf,
    load_model,
    save_safetensors,
    write_tokenizer,
)
from tests.hf_helpers import (
    TEXTS,
    random_model,
    small_config,
    train_sentencepiece,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402


class Opaque:
    """An arbitrary pickled object: weights-only loading must refuse it."""


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def load_hf(path):
    return LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # grouped-query attention: 4 query heads share 2 KV heads
        dict(n_kv_heads=1, rope_base=500000.0, norm_eps=1e-6, tie_embeddings=True),
        dict(n_heads=8, n_kv_heads=8, d_model=128, ffn_hidden=256),  # multi-head, head_dim 16
        dict(z_loss=1e-4),  # a training objective only: the weights export as they are
    ],
)
def test_export_logits_match_transformers(tmp_path, sp_model, overrides):
    cfg = small_config(**overrides)
    model = random_model(cfg)
    ckpt = write_checkpoint(tmp_path / "run", model, sp_model)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    hf = load_hf(out)
    assert hf.config.num_key_value_heads == cfg.n_kv_heads
    ids = torch.randint(
        0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= 1e-4, max_diff


def test_export_directory_contents(tmp_path, sp_model):
    cfg = small_config(rope_base=20000.0, norm_eps=1e-6)
    ckpt = write_checkpoint(tmp_path / "run", random_model(cfg), sp_model)
    # A run directory resolves to its latest checkpoint.
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"),
                     "--dtype", "bfloat16"]) == 0  # fmt: skip
    out = tmp_path / "hf"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    hf_config = LlamaConfig.from_pretrained(out)
    assert hf_config.rope_parameters["rope_theta"] == 20000.0
    assert hf_config.rms_norm_eps == 1e-6 and hf_config.head_dim == cfg.head_dim
    assert hf_config.max_position_embeddings == cfg.max_seq_len
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    state = load_model_state(ckpt)
    torch.testing.assert_close(weights["model.layers.1.self_attn.k_proj.weight"],
                               state["blocks.1.attn.k_proj.weight"].bfloat16(), rtol=0, atol=0)  # fmt: skip
    # Next to a Llama config.json, AutoTokenizer still loads tokenizer.json as written.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = AutoTokenizer.from_pretrained(out)
    assert all(tok.encode(text) == [1, *sp.encode(text)] for text in TEXTS)
    # Exporting over an existing directory needs --overwrite.
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(ckpt, out)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_safetensors_files_get_the_mode_of_the_other_files(tmp_path, umask):
    """safetensors writes 0600; an export on a shared cluster must be readable like its JSON."""
    tensors = {"a": torch.zeros(4), "b": torch.ones(4)}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    previous = os.umask(umask)
    try:
        single = save_safetensors(tensors, tmp_path / "one", max_shard_bytes=1 << 20)
        sharded = save_safetensors(tensors, tmp_path / "two", max_shard_bytes=16)
    finally:
        os.umask(previous)
    assert single == ["model.safetensors"] and len(sharded) == 2
    files = [tmp_path / "one" / single[0], *(tmp_path / "two" / f for f in sharded)]
    index = tmp_path / "two" / "model.safetensors.index.json"  # written by Python, like the rest
    modes = {stat.S_IMODE(f.stat().st_mode) for f in [*files, index]}
    assert modes == {0o666 & ~umask}


def test_exported_tokenizer_encodes_like_sentencepiece(tmp_path, sp_model):
    import sentencepiece as spm

    write_tokenizer(sp_model, tmp_path, model_max_length=64)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in TEXTS:
        ours = [
            sp.bos_id(),
            *sp.encode(text),
        ]  # what the data pipeline feeds the model (before eos)
        assert tok.encode(text) == ours, text
        assert tok.decode(ours, skip_special_tokens=True) == sp.decode(ours[1:])


def test_import_then_export_is_lossless(tmp_path, sp_model):
    # A "released" model: built and saved by transformers itself, with its tokenizer.
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=416, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    released = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in released.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    released.save_pretrained(tmp_path / "released")
    write_tokenizer(sp_model, tmp_path / "released", 64)

    assert (
        cli.main(
            [
                "import",
                "--input",
                str(tmp_path / "released"),
                "--output",
                str(tmp_path / "imported"),
            ]
        )
        == 0
    )
    ckpt = tmp_path / "imported"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 0
    assert verify(ckpt) is None  # the trainer's integrity check (--checkpoint.init_from) accepts it
    state = torch.load(ckpt / "state", weights_only=True)
    assert state["progress"] == {"step": 0, "tokens_seen": 0, "initial_val_loss": None}
    model, cfg = load_model(ckpt)
    assert (cfg.model.n_kv_heads, cfg.model.ffn_hidden, cfg.model.vocab_size) == (2, 176, 416)
    assert (ckpt / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert cfg.data.tokenizer == str((ckpt / "tokenizer.model").resolve())
    ids = torch.randint(0, 416, (1, 64))
    with torch.no_grad():
        assert (model(ids) - released(ids).logits).abs().max().item() <= 1e-4

    # Export again, sharded this time: every tensor comes back bit for bit.
    out = export_checkpoint(ckpt, tmp_path / "again", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    again = {}
    for f in sorted(set(index["weight_map"].values())):
        again.update(load_file(out / f))
    original = load_file(tmp_path / "released" / "model.safetensors")
    assert again.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(again[name], t), name
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(LlamaConfig.from_pretrained(out), key) == getattr(config, key), key
    # ... and the sharded export imports again.
    import_hf(out, tmp_path / "imported2")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_hf(out, tmp_path / "imported2")


@pytest.mark.parametrize(("option", "value"), [("attn_gate", "headwise"), ("attn_gate", "elementwise"),
                                               ("sandwich_norm", True), ("qk_norm", True)])  # fmt: skip
def test_export_refuses_options_llama_cannot_express(tmp_path, sp_model, option, value):
    cfg = small_config(**{option: value})
    ckpt = write_checkpoint(tmp_path / "run", random_model(cfg), sp_model)
    with pytest.raises(ConfigError, match=f"model.{option}.*LlamaForCausalLM") as e:
        export_checkpoint(ckpt, tmp_path / "hf")
    assert "cannot be exported as a LlamaForCausalLM" in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_errors(tmp_path, sp_model, capsys):
    ckpt = write_checkpoint(
        tmp_path / "run", random_model(small_config()), tmp_path / "missing.model"
    )
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        export_checkpoint(ckpt, tmp_path / "hf")
    export_checkpoint(ckpt, tmp_path / "weights-only", with_tokenizer=False)
    assert not (tmp_path / "weights-only" / "tokenizer.json").exists()
    # A damaged checkpoint (its files no longer match the manifest) is refused.
    with (ckpt / "state").open("ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="does not match its manifest"):
        export_checkpoint(ckpt, tmp_path / "damaged", with_tokenizer=False)
    # Pickled objects other than tensors and containers are never loaded.
    torch.save({"model": {}, "opaque": Opaque()}, ckpt / "state")
    with pytest.raises(ValueError, match="refusing to load"):
        load_model_state(ckpt)
    # A `state` directory that is neither DeepSpeed's nor torch.distributed.checkpoint's is refused
    # (those two export like a single file: tests/orchestrator/parallel/test_strategies.py).
    (ckpt / "state").unlink()
    (ckpt / "state").mkdir()
    with pytest.raises(ValueError, match="neither a DeepSpeed nor a torch.distributed.checkpoint"):
        load_model_state(ckpt)
    assert (
        cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "weights-only")])
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert (
        cli.main(
            ["export", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_import_says_what_is_missing(tmp_path, sp_model):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        import_hf(src, tmp_path / "out")
    (src / "config.json").write_text(
        json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    with pytest.raises(ValueError, match="not a Llama model"):
        import_hf(src, tmp_path / "out")
    hf_cfg = dict(model_type="llama", vocab_size=416, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    (src / "config.json").write_text(
        json.dumps({**hf_cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    )
    with pytest.raises(ValueError, match="llama3"):
        import_hf(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(FileNotFoundError, match="holds no weights: expected model.safetensors"):
        import_hf(src, tmp_path / "out")
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(416, 64)}, src / "model.safetensors")
    with pytest.raises(ValueError, match="lack .* tensors.*model.layers.0"):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_model_state_accepts_consolidated_and_wrapped_names(tmp_path):
    model = random_model(small_config())
    ckpt = write_checkpoint(tmp_path / "run", model, None)
    expected = model.state_dict()
    # A bare state dict with wrapper prefixes (as a consolidated DeepSpeed / compiled model gives).
    torch.save({f"_forward_module._orig_mod.{k}": v for k, v in expected.items()}, ckpt / "state")
    state = load_model_state(ckpt)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    torch.save({"progress": {"step": 1}}, ckpt / "state")
    with pytest.raises(ValueError, match="holds no model weights"):
        load_model_state(ckpt)


def _encdec_checkpoint(tmp_path, sp_model):
    from models.build import build_model

    torch.manual_seed(0)
    model = build_model(small_config(arch="encoder_decoder", tie_embeddings=True)).eval()
    return model, write_checkpoint(tmp_path / "run", model, sp_model)


def test_load_model_builds_the_encoder_decoder(tmp_path, sp_model):
    from models.encdec import EncoderDecoder

    model, ckpt = _encdec_checkpoint(tmp_path, sp_model)
    loaded, cfg = load_model(ckpt)
    assert isinstance(loaded, EncoderDecoder) and cfg.model.arch == "encoder_decoder"
    assert loaded.lm_head.weight is loaded.embed.weight  # tied again after loading
    ids = torch.randint(0, 416, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_export_refuses_the_encoder_decoder_before_any_work(
    tmp_path, sp_model, capsys, monkeypatch
):
    from orchestrator.tools import hf

    _, ckpt = _encdec_checkpoint(tmp_path, sp_model)

    def no_reading(*args, **kwargs):
        raise AssertionError("the weights were read before the refusal")

    monkeypatch.setattr(hf, "load_model_state", no_reading)
    with pytest.raises(
        ConfigError, match="model.arch=encoder_decoder.*no standard Hugging Face"
    ) as e:
        export_checkpoint(ckpt, tmp_path / "hf")
    assert "RoPE" in str(e.value) and "orchestrator generate" in str(e.value)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    argv = ["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]
    assert cli.main(argv) == 2
    assert "cannot be exported: model.arch=encoder_decoder" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_import_picks_a_decoder_size_label():
    """A Llama whose shapes are exactly a `redllm-*` size's (the same width, heads and feed-forward
    as llama-20m, 8 layers) still imports as a decoder."""
    from models.config import SIZES
    from orchestrator.tools.hf import model_config_from_hf

    red = SIZES["redllm-20m"]
    hf_cfg = dict(model_type="llama", vocab_size=red["vocab_size"], hidden_size=red["d_model"],
                  intermediate_size=red["ffn_hidden"], num_hidden_layers=red["n_layers"],
                  num_attention_heads=red["n_heads"], num_key_value_heads=red["n_kv_heads"])  # fmt: skip
    cfg = model_config_from_hf(hf_cfg)
    assert cfg.arch == "decoder" and not cfg.name.startswith("redllm")
    assert (cfg.n_layers, cfg.tie_embeddings) == (8, False)
    hf_cfg["num_hidden_layers"] = 6  # exactly llama-20m
    assert model_config_from_hf(hf_cfg).name == "llama-20m"
