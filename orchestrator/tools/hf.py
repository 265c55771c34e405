"""Hugging Face interoperability: training checkpoints <-> `LlamaForCausalLM` directories.

    orchestrator export --checkpoint runs/x/checkpoints/step-00001000 --output hf/x
    orchestrator import --input TinyLlama-1.1B --output runs/tinyllama-continued

Needs no `transformers` (only safetensors, sentencepiece and torch), and owns no part of the
checkpoint format (that is `orchestrator/checkpoint/`). What is written, what is refused (the
encoder-decoder, and why): docs/checkpoints.md, "Hugging Face export and import".
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2

from data.util import parse_size
from models.build import build_model
from models.config import SIZES, ModelConfig, model_config
from models.llama import LanguageModel, Llama
from orchestrator.checkpoint.consolidate import load_model_state  # any strategy's, one process
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    load_saved_config,
    partial_dir,
    resolve_checkpoint,
)
from orchestrator.checkpoint.manifest import check_matches_manifest
from orchestrator.config import Config
from orchestrator.schema import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses


def inference_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype of the tools that run a checkpoint: `auto` is bf16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# Our checkpoints (their format: orchestrator/checkpoint/)
# --------------------------------------------------------------------------------------------


def load_model(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LanguageModel, Config]:
    """(model, Config) from a checkpoint: the family model.arch names (Llama or the encoder-decoder),
    built on the meta device so weights exist only once."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    check_matches_manifest(ckpt_dir, checksums=False)  # sizes only: fast
    cfg = load_saved_config(ckpt_dir)
    state = load_model_state(ckpt_dir)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared matrix in one of its two places
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, cfg


# --------------------------------------------------------------------------------------------
# Names and configs
# --------------------------------------------------------------------------------------------

_BLOCK_NAMES = {  # ours (under blocks.{i}.) -> theirs (under model.layers.{i}.)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> LlamaForCausalLM's, for every tensor the HF checkpoint holds."""
    names = dict(_TOP_NAMES)
    if cfg.tie_embeddings:  # the checkpoint holds the shared matrix once, as the embedding
        del names["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming each option that LlamaForCausalLM cannot express."""
    if cfg.arch == "encoder_decoder":
        raise ConfigError(
            "this model cannot be exported: model.arch=encoder_decoder (RedLLM) matches no standard "
            "Hugging Face class (T5 uses relative-position biases, BART learned absolute positions; "
            "none rotates cross-attention's queries and keys with RoPE at continuous encoder/decoder "
            "positions). Its checkpoints stay in this project's format: `orchestrator generate` and "
            "`orchestrator evaluate --checkpoint` read them directly."
        )
    problems = []
    if cfg.attn_gate != "none":
        problems.append(
            f"model.attn_gate={cfg.attn_gate!r} (gated attention multiplies each head's output by a learned "
            "sigmoid gate; LlamaForCausalLM has no gate projection)"
        )
    if cfg.sandwich_norm:
        problems.append(
            "model.sandwich_norm=true (LlamaForCausalLM has no norm on the attention / FFN outputs before the "
            "residual add)"
        )
    if cfg.qk_norm:
        problems.append(
            "model.qk_norm=true (QK-norm normalises each head's queries and keys with learned gains before "
            "RoPE; LlamaForCausalLM has no q_norm / k_norm)"
        )
    if problems:
        raise ConfigError(
            "this model cannot be exported as a LlamaForCausalLM: "
            + "; ".join(problems)
            + ". Only models "
            "trained with these options off can be exported to the Hugging Face Llama format."
        )


def hf_config(
    cfg: ModelConfig, dtype: torch.dtype, bos_id: int | None = 1, eos_id: int | None = 2
) -> dict[str, Any]:
    """config.json for LlamaForCausalLM; readable by transformers 4.x (rope_theta) and 5.x (rope_parameters)."""
    check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config_from_hf(hf: dict[str, Any], source: str | Path = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama config.json; refuses what our model cannot express."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in architectures:
        raise ValueError(
            f"{source} describes a {model_type or 'model of unknown type'} "
            f"({', '.join(architectures) or 'no architectures'}), not a Llama model: expected model_type 'llama' "
            "/ architectures ['LlamaForCausalLM']"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: it is not a complete Llama config")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (ours is SwiGLU with silu)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (our projections have no bias)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (our feed-forward has no bias)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (we support plain RoPE with a base)")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        problems.append(
            f"head_dim={head_dim} with {n_heads} heads != hidden_size={hf['hidden_size']}"
        )
    if problems:
        raise ValueError(f"{source}: this Llama variant cannot be imported: " + "; ".join(problems))
    rope_base = (
        (rope.get("rope_theta") if isinstance(rope, dict) else None)
        or hf.get("rope_theta")
        or 10000.0
    )
    fields = dict(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_base=float(rope_base),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg = model_config(_closest_size(fields), **fields)
    cfg.validate()
    return cfg


def _closest_size(fields: dict) -> str:
    """The decoder size with exactly these shapes, else the one nearest in parameter count (a label
    only: every shape field is set explicitly). Decoder sizes only: a `redllm-*` preset would also
    bring model.arch=encoder_decoder, and an imported Llama is a decoder."""
    decoders = [n for n, preset in SIZES.items() if preset.get("arch", "decoder") == "decoder"]
    shape_keys = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")
    for name in decoders:
        if all(SIZES[name][k] == fields[k] for k in shape_keys):
            return name
    target = ModelConfig(name="", **fields).num_params()
    return min(decoders, key=lambda n: abs(model_config(n).num_params() - target))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _sp_proto(path: Path):
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{path} is not a sentencepiece model ({e})") from e
    return proto


def tokenizer_json(sp_model: str | Path) -> dict[str, Any]:
    """A `tokenizers` tokenizer.json that encodes exactly as the sentencepiece BPE model does.

    Llama-2's layout: normaliser = (sentencepiece's character map, if any) + prepend "▁" (the dummy
    prefix) + spaces -> "▁"; BPE over the whole string with merges ranked by piece score, byte
    fallback for characters outside the vocabulary; BOS added by the post-processor.
    """
    proto = _sp_proto(Path(sp_model))
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:  # sentencepiece_model.proto: UNIGRAM=1, BPE=2
        raise ValueError(f"{sp_model} is not a BPE sentencepiece model (Llama tokenizers are BPE)")
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # sentencepiece piece types
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type in (NORMAL, USER_DEFINED)}
    merges = []  # (rank key, left, right): sentencepiece applies the highest-scoring merge first
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append(((-pieces[i].score, i, vocab[left], vocab[right]), left, right))
    merges.sort(key=lambda m: m[0])
    if any(" " in left or " " in right for _, left, right in merges):
        merge_list: list = [[left, right] for _, left, right in merges]
    else:  # the "a b" form every version of `tokenizers` reads
        merge_list = [f"{left} {right}" for _, left, right in merges]

    normalizers: list[dict] = []
    if norm.precompiled_charsmap:
        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if norm.remove_extra_whitespaces:
        normalizers += [
            {"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})

    special = [(i, p.piece) for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL)]
    flags = {
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    added_tokens = [{"id": i, "content": piece, **flags} for i, piece in special]
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    post_processor = None
    if spec.bos_id >= 0:
        bos = pieces[spec.bos_id].piece
        post_processor = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [spec.bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[spec.unk_id].piece if spec.unk_id >= 0 else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": bool(
                spec.byte_fallback
            ),  # no "ignore_merges": older `tokenizers` reject the key
            "vocab": vocab,
            "merges": merge_list,
        },
    }


def write_tokenizer(
    sp_model: str | Path, out_dir: str | Path, model_max_length: int
) -> dict[str, int | None]:
    """Write the tokenizer files of a Hugging Face model directory; returns {"bos_id", "eos_id", "vocab_size"}.

    `tokenizer_class` is PreTrainedTokenizerFast, which loads tokenizer.json as written (the
    Llama-2 normaliser above). transformers 5's LlamaTokenizer would rebuild it with a Metaspace
    pre-tokenizer that adds no dummy prefix to text starting with a space, so its ids would differ
    from sentencepiece (and from the ids the model was trained on) for such text.
    """
    sp_model, out_dir = Path(sp_model), Path(out_dir)
    proto = _sp_proto(sp_model)
    spec = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece if i >= 0 else None  # noqa: E731
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    (out_dir / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(sp_model), ensure_ascii=False, indent=2)
    )
    specials = {
        "bos_token": piece(spec.bos_id),
        "eos_token": piece(spec.eos_id),
        "unk_token": piece(spec.unk_id),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    flags = {
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    added = {  # unknown (2) and control (3) pieces
        str(i): {"content": p.piece, **flags}
        for i, p in enumerate(proto.pieces)
        if p.type in (2, 3)
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "pad_token": None,
        "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "added_tokens_decoder": added,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return {
        "bos_id": spec.bos_id if spec.bos_id >= 0 else None,
        "eos_id": spec.eos_id if spec.eos_id >= 0 else None,
        "vocab_size": len(proto.pieces),
    }


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _save_readable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the mode the export's other files get (0666 less the umask,
    0644 usually): save_file creates its file 0600, which other users of a cluster cannot read."""
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save_readable(shards[0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards, strict=True):
        _save_readable(shard, out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def to_hf_state_dict(
    state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Our state dict -> LlamaForCausalLM's (contiguous, unshared tensors, optionally cast)."""
    check_exportable(cfg)
    names = hf_names(cfg)
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} model tensors, e.g. {', '.join(missing[:3])}"
        )
    unexpected = [
        k for k in state if k not in names and not (cfg.tie_embeddings and k == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(
            f"the checkpoint holds tensors a Llama model does not have: {', '.join(unexpected[:5])}"
        )
    out = {}
    for ours, theirs in names.items():
        t = state[ours].detach().to("cpu")
        out[theirs] = t.to(dtype if dtype is not None else t.dtype).contiguous().clone()
    return out


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    tokenizer: str | Path | None = None,
    with_tokenizer: bool = True,
    dtype: str = "auto",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory from a training checkpoint; returns it.

    `verify`: check every file's SHA-256 against the checkpoint's manifest first.
    """
    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_saved_config(ckpt)
    check_exportable(cfg.model)  # before reading gigabytes of weights
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty: choose a new --output or pass --overwrite"
        )
    sp_model = None
    if with_tokenizer:
        sp_model = Path(tokenizer or cfg.data.tokenizer)
        if not sp_model.is_file():
            where = "--tokenizer" if tokenizer else f"data.tokenizer in {ckpt / CONFIG_NAME}"
            raise FileNotFoundError(
                f"tokenizer {sp_model} ({where}) not found: pass --tokenizer PATH.model (the sentencepiece model "
                "the data was prepared with), or --no-tokenizer to export the weights only"
            )
        _sp_proto(sp_model)  # fail early on a bad file
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")

    if verify:
        check_matches_manifest(ckpt, checksums=True)
    state = load_model_state(ckpt)
    target = None if dtype == "auto" else DTYPES[dtype]
    tensors = to_hf_state_dict(state, cfg.model, target)
    out_dtype = next(iter(tensors.values())).dtype

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bos_id, eos_id = 1, 2
    if sp_model is not None:
        tok = write_tokenizer(sp_model, tmp, cfg.model.max_seq_len)
        if tok["vocab_size"] > cfg.model.vocab_size:
            shutil.rmtree(tmp)
            raise ValueError(
                f"tokenizer {sp_model} has {tok['vocab_size']} pieces but the model only "
                f"model.vocab_size={cfg.model.vocab_size} embeddings: is it the tokenizer the model was trained with?"
            )
        bos_id, eos_id = tok["bos_id"], tok["eos_id"]
    save_safetensors(tensors, tmp, parse_size(max_shard_size))
    config = hf_config(cfg.model, out_dtype, bos_id, eos_id)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "max_length": cfg.model.max_seq_len,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF model directory (safetensors or PyTorch .bin, single or sharded)."""
    layouts = (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    )
    for index_name, single in layouts:
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (hf_dir / single).is_file():
            files = [single]
        else:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            path = hf_dir / f
            if not path.is_file():
                raise FileNotFoundError(f"{index} names {f}, which is missing from {hf_dir}")
            if f.endswith(".safetensors"):
                tensors.update(load_file(path))
            else:
                try:
                    tensors.update(
                        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                    )
                except RuntimeError:  # a pre-zipfile pickle cannot be memory-mapped
                    tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(
        f"{hf_dir} holds no weights: expected model.safetensors, model.safetensors.index.json (sharded), "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours. Rotary `inv_freq` buffers are dropped; a tied model's
    duplicate lm_head is ignored."""
    names = hf_names(cfg)
    missing = [theirs for theirs in names.values() if theirs not in hf_state]
    if missing:
        raise ValueError(
            f"the weights lack {len(missing)} tensors of a {cfg.n_layers}-layer Llama, e.g. {', '.join(missing[:3])}"
        )
    known = set(names.values()) | {"lm_head.weight"}
    unexpected = [k for k in hf_state if k not in known and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(
            f"the weights hold tensors a Llama model does not have: {', '.join(unexpected[:5])}"
        )
    state = {}
    for ours, theirs in names.items():
        t = hf_state[theirs]
        state[ours] = t.to(dtype) if dtype is not None else t
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    # Shapes are checked against the model we would build (on the meta device: no memory).
    with torch.device("meta"):
        expected = Llama(cfg).state_dict()
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{names.get(k, k)} has shape {tuple(t.shape)}, config.json implies {tuple(expected[k].shape)}"
            )
    return state


def import_hf(
    hf_dir: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """A Hugging Face Llama directory -> checkpoint directory `output` (start a run with
    `--checkpoint.init_from output`); returns it."""
    # imported on use: the checkpointer loads lightning (seconds)
    from orchestrator.checkpoint.checkpointer import write_weights_checkpoint

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(
            f"{hf_dir} is not a directory (give the folder holding config.json and the weights)"
        )
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} is not a Hugging Face model directory: config.json is missing "
            "(expected config.json, model.safetensors or pytorch_model.bin, and tokenizer.model)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty: choose a new --output or pass --overwrite"
        )
    model_cfg = model_config_from_hf(json.loads(config_path.read_text()), config_path)
    state = from_hf_state_dict(load_hf_weights(hf_dir), model_cfg, DTYPES[dtype])

    cfg = Config(model=model_cfg)
    partial = partial_dir(out)  # the tokenizer goes in first; the checkpointer publishes the rest
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer_src = hf_dir / "tokenizer.model"
    if tokenizer_src.is_file():
        shutil.copyfile(tokenizer_src, partial / "tokenizer.model")
        cfg.data.tokenizer = str((out / "tokenizer.model").resolve())
    info = {"strategy": "import", "imported_from": str(hf_dir.resolve())}
    return write_weights_checkpoint(out, state, cfg, info)
