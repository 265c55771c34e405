"""The model a config describes: `model.arch` picks the family."""

from __future__ import annotations

from models.config import ModelConfig
from models.encdec import EncoderDecoder, EncoderDecoderCache
from models.llama import KVCache, LanguageModel, Llama


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Llama for `decoder`, EncoderDecoder (RedLLM) for `encoder_decoder`."""
    return EncoderDecoder(cfg) if cfg.arch == "encoder_decoder" else Llama(cfg)


def generation_cache(
    cfg: ModelConfig, batch_size: int, max_len: int
) -> KVCache | EncoderDecoderCache:
    """The KV cache the family's forward pass takes for incremental decoding."""
    cache = EncoderDecoderCache if cfg.arch == "encoder_decoder" else KVCache
    return cache(cfg, batch_size, max_len=max_len)
