"""The forward and backward of a packed batch read nothing back from the device: what sizes the
tensors (the encoder-decoder's row lengths, flash_attn's document starts) comes with the batch as
numbers (`PackedLayout`, found on the host by the trainer's `packing_arguments`). Checked with
fake tensors (torch's FakeTensorMode, what torch.compile traces with: shapes and dtypes, no
data), where any data-dependent read (`.item()`, `int(t)`, `nonzero`, boolean indexing) raises: a
step that passes there makes no host sync on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from data.documents import DocumentBoundary
from models.build import build_model
from models.config import model_config
from orchestrator.training.data import packing_arguments

B, T, BOS = 2, 32, 1
BOUNDARY = DocumentBoundary("bos", bos_id=BOS)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs and targets on the host: documents of several lengths per row."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 128, (B, T + 1), generator=g)
    tokens[0, [0, 5, 19]] = BOS
    tokens[1, [0, 11]] = BOS
    return tokens[:, :-1], tokens[:, 1:]


def fake_step(arch: str, attention: str, keep_layout: bool = True) -> None:
    """One packed forward + backward (and an eval forward for logits) under FakeTensorMode, the
    packing arguments found on the host (real tensors) beforehand, as the trainer does."""
    cfg = model_config(
        "tiny" if arch == "llama" else "redllm-tiny", n_layers=2, vocab_size=128, max_seq_len=64,
        d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=172, attention=attention,
        loss_kernel="cross_entropy",  # (the chunked loss keeps real buffers between calls)
    )  # fmt: skip
    inputs, targets = batch()
    packing = packing_arguments(cfg, inputs, targets, BOUNDARY, False, "cpu")
    assert "layout" in packing and "doc_ids" in packing
    if not keep_layout:
        packing.pop("layout")
    with FakeTensorMode() as mode:
        model = build_model(cfg).train()  # fake parameters: built inside the mode
        fake = {
            k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in packing.items()
        }
        inputs, targets = mode.from_tensor(inputs), mode.from_tensor(targets)
        loss = model(inputs, targets=targets, **fake)
        loss.backward()
        assert loss.shape == () and all(p.grad is not None for p in model.parameters())
        model.eval()  # logits at the block's positions (the encoder-decoder scatters them back)
        assert model(inputs, **fake).shape == (B, T, 128)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "encoder_decoder"])
def test_a_packed_step_reads_nothing_back(arch, attention):
    fake_step(arch, attention)


def test_without_the_layout_the_encoder_decoder_would_read_its_row_lengths():
    """What the check above sees: without the host's layout, the forward sizes its encoder and
    decoder rows from the device's masks (a host sync on a GPU), which fake tensors refuse."""
    with pytest.raises(DataDependentOutputException):
        fake_step("encoder_decoder", "sdpa", keep_layout=False)
