"""The encoder-decoder over packed examples (models/encdec.py `pack_examples`): instruction data's
input -> encoder, target -> decoder, and pretraining text with document masking. Examples do not
see each other, the packed loss is the unpacked one, and training sees an example exactly as
generation does."""

import pytest
import torch
import torch.nn.functional as F

from models.config import model_config
from models.encdec import (
    DECODER_PAD,
    ENCODER_PAD,
    EncoderDecoder,
    EncoderDecoderCache,
    pack_examples,
    response_split,
)

V = 97
IGNORE = -100


def small(**overrides):
    fields = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=V)
    return model_config("redllm-tiny", max_seq_len=64, **{**fields, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return EncoderDecoder(small(**overrides)).eval()


BOS = 1


def example(prompt_len: int, response_len: int, seed: int) -> tuple[list[int], list[bool]]:
    """[BOS] prompt response as block inputs, and which inputs the decoder reads: the last prompt
    token and the response but its last (their targets are the response and the EOS)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [BOS, *torch.randint(3, V, (prompt_len + response_len,), generator=g).tolist()]
    to_decoder = [False] * prompt_len + [True] * (response_len + 1)
    return tokens, to_decoder


def row(*examples):
    """Examples packed into one row: inputs, decoder mask, doc ids, targets (next tokens where the
    decoder predicts, IGNORE elsewhere; the last example's final target stands in for its EOS)."""
    inputs, mask, docs, targets = [], [], [], []
    for i, (tokens, to_decoder) in enumerate(examples):
        nxt = tokens[1:] + [2]  # 2: the EOS after the response
        inputs += tokens
        mask += to_decoder
        docs += [i] * len(tokens)
        targets += [t if d else IGNORE for t, d in zip(nxt, to_decoder, strict=True)]
    return (
        torch.tensor([inputs]),
        torch.tensor([mask]),
        torch.tensor([docs]),
        torch.tensor([targets]),
    )


def test_pack_examples_moves_prompts_to_the_encoder_and_responses_to_the_decoder():
    ids = torch.tensor([[1, 10, 11, 12, 13, 1, 20, 21, 22], [1, 30, 31, 32, 33, 34, 35, 36, 37]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1]]).bool()
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0] * 9])
    packed = pack_examples(ids, mask, docs)
    # Encoder rows: 4 and 5 positions, padded to 8 (PAD_MULTIPLE); decoder rows 5 and 4 -> 8.
    assert packed.encoder_ids.shape == (2, 8) and packed.decoder_ids.shape == (2, 8)
    assert packed.encoder_ids[0, :4].tolist() == [1, 10, 1, 20]
    assert packed.encoder_positions[0, :4].tolist() == [0, 1, 0, 1]  # offsets in their example
    assert packed.encoder_docs[0].tolist() == [0, 0, 1, 1] + [ENCODER_PAD] * 4
    assert packed.decoder_ids[0, :5].tolist() == [11, 12, 13, 21, 22]
    assert packed.decoder_positions[0, :5].tolist() == [2, 3, 4, 2, 3]  # continuous from encoder
    assert packed.decoder_index[0, :5].tolist() == [2, 3, 4, 7, 8]
    assert packed.decoder_docs[1].tolist() == [0] * 4 + [DECODER_PAD] * 4
    assert packed.encoder_ids[1, :5].tolist() == [1, 30, 31, 32, 33]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(attention):
    m = make_model(attention=attention)
    a, b, c = example(5, 4, 1), example(7, 3, 2), example(3, 6, 3)
    ids, mask, docs, _ = row(a, b, c)
    logits = m(ids, doc_ids=docs, decoder_mask=mask)  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], V)
    assert torch.equal(logits[~mask], torch.zeros_like(logits[~mask]))  # the encoder's positions
    # Change every token of example b (prompt and response): a's and c's logits stay bitwise.
    changed = ids.clone()
    in_b = docs[0] == 1
    changed[0, in_b] = (changed[0, in_b] + 5) % (V - 3) + 3
    out = m(changed, doc_ids=docs, decoder_mask=mask)
    keep = mask[0] & ~in_b
    assert torch.equal(out[0, keep], logits[0, keep])
    assert not torch.allclose(out[0, mask[0] & in_b], logits[0, mask[0] & in_b])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_equals_the_unpacked_loss(attention):
    m = make_model(attention=attention)
    examples = [example(5, 4, 1), example(7, 3, 2), example(3, 6, 3)]
    ids, mask, docs, targets = row(*examples)
    packed = m(ids, targets=targets, doc_ids=docs, decoder_mask=mask)
    total, count = 0.0, 0
    for e in examples:  # each example alone in its row, no padding, no doc ids
        i, msk, _, tgt = row(e)
        n = int((tgt != IGNORE).sum())
        total += m(i, targets=tgt, decoder_mask=msk) * n
        count += n
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-6)
    # A batch of two rows with other splits (each row's encoder and decoder padded to the
    # batch's longest): the mean over every counted target of both.
    rows = [row(*examples[:2]), row(examples[2], examples[0])]
    rows = [tuple(t[:, :20] for t in r) for r in rows]
    ids2, mask2, docs2, targets2 = (torch.cat(ts) for ts in zip(*rows, strict=True))
    batch = m(ids2, targets=targets2, doc_ids=docs2, decoder_mask=mask2)
    total, count = 0.0, 0
    for i, msk, d, tgt in rows:
        n = int((tgt != IGNORE).sum())
        total += m(i, targets=tgt, doc_ids=d, decoder_mask=msk) * n
        count += n
    torch.testing.assert_close(batch, total / count, rtol=1e-5, atol=1e-6)


def test_response_only_loss_ignores_prompt_targets():
    m = make_model()
    ids, mask, docs, targets = row(example(5, 4, 1), example(7, 3, 2))
    loss = m(ids, targets=targets, doc_ids=docs, decoder_mask=mask)
    changed = targets.clone()
    changed[~mask] = 7  # prompt positions' targets: the encoder's positions, predicted nowhere
    assert torch.equal(m(ids, targets=changed, doc_ids=docs, decoder_mask=mask), loss)
    logits = m(ids, doc_ids=docs, decoder_mask=mask)
    ref = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_training_sees_an_example_as_generation_does():
    """The packed forward's logits for an example equal the cached generation path's, prompted
    with [BOS] prompt and fed the response (teacher forcing): the same encoder input, decoder
    tokens, positions and attention."""
    m = make_model()
    a, b = example(5, 4, 1), example(7, 3, 2)
    ids, mask, docs, _ = row(a, b)
    logits = m(ids, doc_ids=docs, decoder_mask=mask)
    start = 0
    for tokens, to_decoder in (a, b):
        n_prompt = to_decoder.index(True) + 1  # [BOS] p1..pn: pn is the decoder's first token
        cache = EncoderDecoderCache(m.cfg, 1)
        seq = torch.tensor([tokens])
        steps = [m(seq[:, :n_prompt], kv_cache=cache, start_pos=0)]  # (1, 1, V)
        for t in range(n_prompt, len(tokens)):
            steps.append(m(seq[:, t : t + 1], kv_cache=cache, start_pos=t))
        generated = torch.cat(steps, dim=1)[0]  # (response + 1, V)
        span = slice(start + n_prompt - 1, start + len(tokens))
        torch.testing.assert_close(logits[0, span], generated, rtol=1e-4, atol=1e-5)
        start += len(tokens)


def test_a_response_fragment_without_its_prompt_reads_no_memory():
    """A block cut inside an example's response: the fragment's decoder tokens have no encoder
    positions of their example; their cross-attention adds nothing, and the loss stays finite."""
    m = make_model()
    tokens, to_decoder = example(4, 6, 5)
    frag_tokens, frag_mask = tokens[6:], to_decoder[6:]  # response only
    ids, mask, docs, targets = row((frag_tokens, frag_mask), example(5, 3, 6))
    loss = m(ids, targets=targets, doc_ids=docs, decoder_mask=mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_text_with_doc_ids_keeps_the_prefix_split_per_document():
    """Pretraining text with data.document_mask: the prefix-LM split (encoder: positions < P) of
    each row, documents kept apart; one document per row equals the plain prefix LM."""
    m = make_model()
    torch.manual_seed(3)
    ids = torch.randint(0, V, (2, 32))
    plain = m(ids, encoder_len=16)  # (B, 16, V)
    one_doc = m(ids, encoder_len=16, doc_ids=torch.zeros_like(ids))  # (B, 32, V)
    torch.testing.assert_close(one_doc[:, 16:], plain, rtol=1e-5, atol=1e-6)
    targets = torch.randint(0, V, (2, 32))
    torch.testing.assert_close(
        m(ids, targets=targets, encoder_len=16, doc_ids=torch.zeros_like(ids)),
        m(ids, targets=targets, encoder_len=16),
        rtol=1e-5,
        atol=1e-6,
    )
    # Two documents in a row: a change in the first leaves the second's decoder logits bitwise.
    docs = (torch.arange(32) >= 20).long().expand(2, 32)
    base = m(ids, encoder_len=16, doc_ids=docs)
    changed = ids.clone()
    changed[:, :20] = (changed[:, :20] + 1) % V
    out = m(changed, encoder_len=16, doc_ids=docs)
    assert torch.equal(out[:, 20:], base[:, 20:])


def test_packed_shapes_are_checked():
    m = make_model()
    ids = torch.randint(0, V, (1, 16))
    with pytest.raises(ValueError, match="decoder_mask has shape"):
        m(ids, decoder_mask=torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_ids has shape"):
        m(ids, doc_ids=torch.zeros(2, 16, dtype=torch.long))


def test_response_split_starts_the_decoder_at_each_examples_first_counted_target():
    """Instruction data: the encoder reads what precedes an example's first response; the rest of
    the example (a chat's later turns, the EOS) is decoder input, so the bidirectional encoder
    never reads a token that comes after a target."""
    # Two examples: counted targets at 2-3 (first), 5 (a second turn) and 9 (second example).
    counted = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0]]).bool()
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    split = response_split(counted, docs)
    assert split.int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]]
    assert response_split(counted).int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]]


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flash_attn", "sdpa"])
def test_packed_encoder_decoder_kernels_match_eager_on_gpu(attention):
    """Packed examples on CUDA under bf16 autocast, each kernel (`flash_attn`: the decoder's
    self-attention through the varlen kernel; the encoder and cross-attention through SDPA's masked
    kernel) with the best other kernels, against the all-eager model in float64."""
    import dataclasses

    from models import kernels

    problem = kernels.why_not("attention", attention, "cuda", torch.bfloat16)
    if problem is not None:
        pytest.skip(problem)
    fast = make_model(attention=attention, d_model=256, ffn_hidden=688).cuda()
    eager_fields = dict(attention="eager", rmsnorm_kernel="eager", swiglu_kernel="eager",
                        rope_kernel="eager", loss_kernel="cross_entropy")  # fmt: skip
    ref = EncoderDecoder(dataclasses.replace(fast.cfg, **eager_fields)).double().eval()
    ref.load_state_dict(fast.state_dict())
    rows = [row(example(5, 4, 1), example(7, 3, 2)), row(example(3, 6, 3), example(9, 2, 4))]
    rows = [tuple(t[:, :22] for t in r) for r in rows]
    ids, mask, docs, targets = (torch.cat(ts) for ts in zip(*rows, strict=True))
    with torch.no_grad():
        want = ref(ids, doc_ids=docs, decoder_mask=mask)[mask]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(ids.cuda(), doc_ids=docs.cuda(), decoder_mask=mask.cuda())[mask.cuda()]
    err = ((got.double().cpu() - want).norm() / want.norm()).item()
    assert err <= 0.05, err
