"""KV-cache generation: cache correctness, sampling controls, greedy parity with transformers, and
the encoder-decoder (RedLLM) through the same generate() and `orchestrator generate`."""

import pytest
import torch

from models.llama import KVCache
from orchestrator import cli
from orchestrator.evaluation.generation import generate, sample_next
from orchestrator.tools.hf import export_checkpoint
from tests.hf_helpers import random_model, small_config, train_sentencepiece, write_checkpoint


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(attention="eager"),
        dict(attn_gate="elementwise", sandwich_norm=True),
        dict(attn_gate="headwise"),
    ],
)
def test_kv_cache_matches_full_forward(overrides):
    cfg = small_config(**overrides)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)  # (2, 40, V), the training path
        cache = KVCache(cfg, batch_size=2)
        chunks = [model(ids[:, :16], kv_cache=cache, start_pos=0)]  # prefill
        chunks.append(
            model(ids[:, 16:20], kv_cache=cache, start_pos=16)
        )  # several new tokens at once
        chunks += [
            model(ids[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(20, 40)
        ]  # one by one
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_uses_cache_consistently():
    cfg = small_config()
    model = random_model(cfg)
    prompt = torch.randint(3, cfg.vocab_size, (1, 7))
    out = generate(model, prompt, max_new_tokens=20, temperature=0)
    ids = prompt
    with torch.no_grad():  # no cache: recompute the whole prefix for every token
        for _ in range(20):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    # The context length caps generation.
    assert generate(model, prompt, max_new_tokens=1000, temperature=0).shape[1] == cfg.max_seq_len


def test_greedy_matches_transformers_generate(tmp_path, sp_model):
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm

    cfg = small_config()
    model = random_model(cfg, seed=3)
    out = export_checkpoint(write_checkpoint(tmp_path / "run", model, sp_model), tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "The capital of Norvania is"
    ids = tok(prompt, return_tensors="pt").input_ids
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert ids[0].tolist() == [1, *sp.encode(prompt)]
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                         pad_token_id=2)  # fmt: skip
    ours = generate(model, ids, max_new_tokens=30, temperature=0, eos_id=2)
    n = theirs.shape[1]  # transformers stops at eos; ours pads with eos after it
    assert torch.equal(ours[:, :n], theirs), (ours, theirs)
    assert (ours[:, n:] == 2).all()


def test_sampling_controls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, temperature=2.0, top_k=5)
        assert all(s[i] in top5[i] for i in range(4))
    # top_p keeps the smallest set of tokens whose probability reaches p.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {sample_next(probs.log(), top_p=0.75).item() for _ in range(200)}
    assert seen == {0, 1}
    model = random_model(small_config())
    prompt = torch.randint(3, 416, (1, 5))
    a = generate(model, prompt, 16, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(model, prompt, 16, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = generate(model, prompt, 16, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_cli(tmp_path, sp_model, capsys):
    write_checkpoint(tmp_path / "run", random_model(small_config()), sp_model)
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "The model", "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "1", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("The model") and len(first) > len("The model\n")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def _spy_caches(monkeypatch) -> list:
    """The KV caches generate() builds, each with the (key, value) dtypes its updates were given."""
    from models import build

    made = []

    class Spy(build.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.given = set()
            made.append(self)

        def update(self, layer, k, v, start_pos):
            self.given.add((k.dtype, v.dtype))
            return super().update(layer, k, v, start_pos)

    monkeypatch.setattr(build, "KVCache", Spy)  # what models.build.generation_cache builds
    return made


def test_kv_cache_is_in_the_compute_dtype_under_autocast(monkeypatch):
    """An fp32 model generating under bf16 autocast keeps its cache in the dtypes of the keys and
    values attention computes with (values: bf16 from the autocast projection), not in the
    parameters' fp32; outside autocast, fp32."""
    made = _spy_caches(monkeypatch)
    cfg = small_config()
    model = random_model(cfg)
    prompt = torch.randint(3, cfg.vocab_size, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], prompt)
    assert next(model.parameters()).dtype == torch.float32
    cache = made[-1]
    assert len(cache.given) == 1 and {v for _, v in cache.given} == {torch.bfloat16}
    assert {(k.dtype, v.dtype) for k, v in zip(cache.keys, cache.values)} == cache.given
    assert cache.keys[0].shape == (2, cfg.n_kv_heads, 13, cfg.head_dim)
    generate(model, prompt, max_new_tokens=2, temperature=0)
    assert {t.dtype for t in made[-1].keys + made[-1].values} == {torch.float32}


def test_generation_under_fsdp2_bf16_mixed_precision(monkeypatch, tmp_path):
    """FSDP2 with bf16 compute (fp32 sharded parameters, bf16 gathered ones): sampling as the monitor
    does it used to fail (fp32 cache beside bf16 queries, which SDPA rejects) and turn itself off.
    One process, gloo, on the CPU."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already in this process")
    from torch.distributed.device_mesh import init_device_mesh

    from orchestrator.parallel.fsdp import parallelize_fsdp

    made = _spy_caches(monkeypatch)
    cfg = small_config()
    model = random_model(cfg)
    prompt = torch.randint(3, cfg.vocab_size, (1, 7))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        parallelize_fsdp(model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16)
        assert next(model.parameters()).dtype == torch.float32  # the sharded master weights
        out = generate(model, prompt, max_new_tokens=5, temperature=0)
    finally:
        dist.destroy_process_group()
    assert out.shape == (1, 12) and torch.equal(out[:, :7], prompt)
    assert {t.dtype for t in made[-1].keys + made[-1].values} == {torch.bfloat16}


def random_encdec(seed: int = 0, **overrides):
    """A tiny RedLLM over the test tokenizer's vocabulary, norm gains made non-trivial."""
    cfg = small_config(**{"arch": "encoder_decoder", "tie_embeddings": True, **overrides})
    return random_model(cfg, seed)


def test_encoder_decoder_greedy_generation_uses_cache_consistently():
    model = random_encdec()
    prompt = torch.randint(3, model.cfg.vocab_size, (3, 7))
    out = generate(model, prompt, max_new_tokens=20, temperature=0)
    ids = prompt
    with torch.no_grad():  # no cache: encode the prompt but its last token, decode the rest
        for _ in range(20):
            step = model(ids, encoder_len=prompt.shape[1] - 1)[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert generate(model, prompt, max_new_tokens=1000, temperature=0).shape[1] == 64
    # The encoder needs a token: BOS alone (an empty prompt) is refused, saying so.
    with pytest.raises(ValueError, match="at least 2 tokens.*empty prompt"):
        generate(model, prompt[:, :1], max_new_tokens=4)


def test_generate_cli_on_an_encoder_decoder_checkpoint(tmp_path, sp_model, capsys):
    write_checkpoint(tmp_path / "run", random_encdec(), sp_model)
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "The model", "--max-new-tokens", "12",
            "--temperature", "0.9", "--top-k", "40", "--seed", "1", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("The model") and len(first) > len("The model\n")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    argv[argv.index("The model")] = ""
    assert cli.main(argv) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_monitor_samples_from_an_encoder_decoder(sp_model):
    """The trainer's sample generations (greedy, no early stop) call generate() on the model."""
    from data.tokenizer import Tokenizer
    from orchestrator.training.monitor import generate_samples

    model = random_encdec()
    texts = generate_samples(model, Tokenizer(sp_model), ["The capital of", "def add(a, b):"], 8)
    assert [t.startswith(p) for t, p in zip(texts, ["The capital of", "def add(a, b):"])] == [
        True,
        True,
    ]
