"""model.dropout (finetuning regularisation): on the embedding output and each residual branch's output,
training mode only; at 0 no random number is drawn and every number is the plain model's."""

import shutil
from pathlib import Path

import pytest
import torch

import models.llama as llama
from models.config import model_config
from models.encdec import EncoderDecoder
from models.llama import Llama, count_parameters
from orchestrator.schema import ConfigError

V = 97


def config(family, **overrides):
    fields = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=V)
    name = "tiny" if family == "decoder" else "redllm-tiny"
    return model_config(name, max_seq_len=64, **{**fields, **overrides})


def build(family, **overrides):
    cfg = config(family, **overrides)
    return (Llama if family == "decoder" else EncoderDecoder)(cfg)


def pair(family, p):
    """A dropout-0 model and one with dropout p, same weights."""
    torch.manual_seed(0)
    plain = build(family)
    other = build(family, dropout=p)
    other.load_state_dict(plain.state_dict())
    return plain, other


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 33), generator=g)


def loss_and_grads(model, block):
    model.zero_grad(set_to_none=True)
    loss = model(block[:, :-1], targets=block[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


FAMILIES = ["decoder", "encoder_decoder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_zero_is_bitwise_the_plain_model_and_draws_nothing(family):
    """In training mode, dropout 0 gives bitwise the loss and gradients of the eval-mode model (which
    skips dropout whatever p), and draws no random number (the seeded streams after it are unchanged)."""
    plain, other = pair(family, 0.1)
    block = batch()
    plain.train()
    state = torch.get_rng_state()
    loss, grads = loss_and_grads(plain, block)
    assert torch.equal(torch.get_rng_state(), state)  # no RNG draw at dropout 0
    other.eval()
    loss_eval, grads_eval = loss_and_grads(other, block)  # eval mode: dropout skipped
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(loss, loss_eval)
    assert all(torch.equal(grads[n], grads_eval[n]) for n in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_changes_the_training_loss_but_not_eval_logits(family):
    plain, other = pair(family, 0.1)
    block = batch()
    plain.train(), other.train()
    torch.manual_seed(3)
    loss_plain = plain(block[:, :-1], targets=block[:, 1:])
    torch.manual_seed(3)
    loss_drop = other(block[:, :-1], targets=block[:, 1:])
    assert not torch.equal(loss_plain, loss_drop)
    plain.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(plain(block[:, :-1]), other(block[:, :-1]))
        assert torch.equal(
            plain(block[:, :-1], targets=block[:, 1:]), other(block[:, :-1], targets=block[:, 1:])
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forwards_are_deterministic_under_the_seed(family):
    _, model = pair(family, 0.1)
    model.train()
    block = batch()

    def seeded(seed):
        torch.manual_seed(seed)
        return loss_and_grads(model, block)

    (a, grads_a), (b, grads_b), (c, _) = seeded(7), seeded(7), seeded(8)
    assert torch.equal(a, b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert not torch.equal(a, c)


def test_every_dropout_site_is_used():
    """Embedding output, attention and FFN branches (and the decoder's cross-attention)."""
    calls = []
    real = llama.residual_dropout

    def spy(x, p, training):
        calls.append((tuple(x.shape), p, training))
        return real(x, p, training)

    for family, expected in (("decoder", 1 + 2 * 2), ("encoder_decoder", 2 + 2 * 2 + 2 * 3)):
        _, model = pair(family, 0.1)
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama, "residual_dropout", spy)
            mp.setattr("models.encdec.residual_dropout", spy)
            model.train()(batch()[:, :-1])
        assert len(calls) == expected and all(c[1:] == (0.1, True) for c in calls), family


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_replays_the_masks(mode):
    """Recomputation in backward draws the same masks as the forward (torch.utils.checkpoint keeps
    the RNG state): the gradients are bitwise the plain model's."""
    from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing

    _, plain = pair("decoder", 0.1)
    torch.manual_seed(0)
    checkpointed = build("decoder", dropout=0.1)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, mode)
    block = batch()
    plain.train(), checkpointed.train()
    torch.manual_seed(11)
    loss, grads = loss_and_grads(plain, block)
    torch.manual_seed(11)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, block)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


def test_config_validation_names_the_key_and_counts_no_parameter():
    from orchestrator.config import load_config

    for bad in (1.0, -0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ConfigError, match=r"model\.dropout=.* must be a number in \[0, 1\)"):
            config("decoder", dropout=bad).validate()
    for family in FAMILIES:
        plain, other = pair(family, 0.05)
        assert other.cfg.num_params() == plain.cfg.num_params() == count_parameters(other)
    cfg = load_config(["--model.name", "tiny", "--model.dropout", "0.05"])
    assert cfg.model.dropout == 0.05
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(["--model.name", "tiny", "--model.dropout", "1"])


def test_dropout_may_differ_from_the_checkpoint():
    """Not a weight: a checkpoint trained without dropout resumes or finetunes (init_from) with it."""
    from orchestrator.checkpoint.resume import model_mismatch
    from orchestrator.config import load_config
    from orchestrator.schema import to_dict

    saved = {"model": to_dict(load_config(["--model.name", "tiny"]).model)}
    assert (
        model_mismatch(saved, load_config(["--model.name", "tiny", "--model.dropout", "0.1"]))
        is None
    )
    assert "model.n_layers" in model_mismatch(
        saved, load_config(["--model.name", "tiny", "--model.n_layers", "2"])
    )


@pytest.mark.slow
def test_a_run_with_dropout_resumes_bitwise(sample_data, tmp_path):
    """The dropout masks come from the per-rank RNG streams the checkpoint saves: steps 3-4 of a run
    resumed from its step-2 checkpoint are bitwise those of the uninterrupted run."""
    from tests.training import step_records, train

    flags = ["--model.dropout", "0.05", "--train.max_steps", "4", "--schedule.decay_steps", "4"]
    flags += [
        "--checkpoint.interval",
        "2",
        "--checkpoint.keep_last",
        "0",
        "--train.log_interval",
        "1",
    ]
    flags += ["--eval.at_start", "false", "--eval.interval", "0", "--eval.max_batches", "0"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full, sample_data, *flags)
    step2 = Path("checkpoints") / f"step-{2:08d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / step2, resumed / step2)
    train(resumed, sample_data, *flags)
    losses = {r["step"]: r["loss"] for r in step_records(full)}
    resumed_losses = {r["step"]: r["loss"] for r in step_records(resumed)}
    assert set(resumed_losses) >= {3, 4}, resumed_losses
    assert [resumed_losses[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]


def test_reading_training_batches_draws_nothing_from_the_global_stream():
    """torch's DataLoader draws a base seed at each pass's first batch; `endless` hides that draw,
    so the dropout masks after a resume (a new pass, the saved stream restored) are the run's own."""
    from torch.utils.data import DataLoader

    from orchestrator.training.data import endless

    batches = endless(DataLoader(list(range(6)), batch_size=2))
    state = torch.get_rng_state()
    read = [next(batches) for _ in range(7)]  # three passes
    assert torch.equal(torch.get_rng_state(), state)
    assert [new for new, _ in read] == [False, False, False, True, False, False, True]
    assert torch.equal(read[3][1], torch.tensor([0, 1]))
