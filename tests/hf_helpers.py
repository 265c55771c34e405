"""Test helpers: a tiny sentencepiece tokenizer and training-style checkpoints, built in seconds."""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from models.build import build_model
from models.config import ModelConfig
from models.llama import LanguageModel, Llama

TEXTS = [
    "Hello world",
    "The capital of Norvania is Brelst. 17 + 25 = 42.",
    "the model  trains   on 12345 tokens.\n\n    def f(x):\n        return x  # -> 1",
    " leading space and trailing ",
    "  two leading spaces",
    "unicode: naïve café über, 日本語 and an emoji 🚀",
    "tabs\tand\nnewlines\n\n",
    "",
]

_WORDS = [
    "the",
    "model",
    "train",
    "token",
    "Llama",
    "pretraining",
    "data",
    "loss",
    "step",
    "value",
    "capital",
    "of",
    "is",
    "river",
    "über",
    "naïve",
    "café",
    "return",
    "def",
]


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A sentencepiece BPE model with Llama-2's settings (as data/tokenizer.py trains them)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = []
    for i in range(400):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 15)))
        line += f" {rng.randint(0, 99999)} = {rng.randint(0, 99)} + {rng.randint(0, 9)}."
        if i % 5 == 0:
            line += "\n    def f(x):\n        return x  # -> 1"
        lines.append(line)
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, max_sentencepiece_length=16, character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def small_config(**overrides) -> ModelConfig:
    """A 2-layer GQA model (4 query heads, 2 KV heads) over a 400-piece tokenizer's vocabulary."""
    from models.config import model_config

    fields = dict(
        vocab_size=416,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=176,
        max_seq_len=64,
    )
    fields.update(overrides)
    return model_config("tiny", **fields)


def random_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    """Either family (model.arch), initialised as for training, with norm gains (and any gate bias)
    made non-trivial."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(root: Path, model: Llama, tokenizer: Path | None, step: int = 100) -> Path:
    """A checkpoint laid out as the trainer writes it: single-file `state`, config.yaml, manifest.json."""
    from orchestrator.checkpoint.manifest import config_hash, write_manifest
    from orchestrator.checkpoint.rng import capture_rng
    from orchestrator.config import Config, save_config

    ckpt = root / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    cfg = Config(model=model.cfg)
    cfg.run.dir = str(root)
    if tokenizer is not None:
        cfg.data.tokenizer = str(tokenizer)
    state = {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": step},
        "train_loader": {},
        "progress": {"step": step, "tokens_seen": step * 1024, "initial_val_loss": 6.0},
        "rng": [capture_rng()],
    }
    torch.save(state, ckpt / "state")
    save_config(cfg, ckpt / "config.yaml")
    info = {
        "step": step,
        "tokens_seen": step * 1024,
        "config_hash": config_hash(cfg),
        "world_size": 1,
    }
    write_manifest(ckpt, {**info, "strategy": "ddp", "time": 0.0})
    return ckpt
