"""data.document_mask in the trainer: the config key, where the separator comes from, and a short
2-process run with it (training and validation losses differ from the unmasked run's)."""

from __future__ import annotations

import json

import pytest

from data.documents import DocumentBoundary
from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.data import document_boundaries
from tests.training import step_records, train


def test_document_mask_is_off_by_default_and_taken_by_both_families():
    assert load_config(["--model.name", "tiny"]).data.document_mask is False
    assert load_config(["--model.name", "tiny", "--data.document_mask", "true"]).data.document_mask
    # The encoder-decoder keeps its prefix split and keeps documents apart (models/encdec.py).
    cfg = load_config(["--model.name", "redllm-tiny", "--data.document_mask", "true"])
    assert cfg.data.document_mask and cfg.model.arch == "encoder_decoder"


def _prepared(root, separator, bos=1, eos=2):
    """A stand-in prepare output: train/ and val/ with an index.json, and its prepare_stats.json."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "index.json").write_text("{}")
    if separator is not None:
        stats = {"separator": separator, "bos_id": bos, "eos_id": eos}
        (root / "prepare_stats.json").write_text(json.dumps(stats))
    return root


def test_document_boundaries_come_from_prepare_stats(tmp_path):
    data = _prepared(tmp_path / "a", "bos+eos")
    val = _prepared(tmp_path / "v", "eos")
    cfg = load_config(["--data.dir", str(data), "--data.val_dir", str(val / "val")])
    assert document_boundaries(cfg) == (
        DocumentBoundary("bos+eos", bos_id=1),
        DocumentBoundary("eos", eos_id=2),
    )
    # A mixture: every source must start its documents the same way.
    other = _prepared(tmp_path / "b", "eos")
    mixed = f"[{{name: a, dir: {data}, weight: 1}}, {{name: b, dir: {other}, weight: 1}}]"
    cfg = load_config(["--data.sources", mixed])
    with pytest.raises(ConfigError, match=r"one document separator for all data\.sources"):
        document_boundaries(cfg)
    bare = _prepared(tmp_path / "c", None)
    with pytest.raises(ConfigError, match=r"needs the prepare_stats\.json .*data\.dir="):
        document_boundaries(load_config(["--data.dir", str(bare)]))


def test_training_with_document_mask(sample_data, tmp_path):
    """Two steps with and without data.document_mask from the same weights and batches: the
    masked run trains (finite losses) and its step-1 and step-0 validation losses differ."""
    args = ("--train.max_steps", "2", "--eval.interval", "0", "--checkpoint.interval", "0")
    train(tmp_path / "masked", sample_data, *args, "--data.document_mask", "true")
    train(tmp_path / "plain", sample_data, *args)
    masked, plain = step_records(tmp_path / "masked"), step_records(tmp_path / "plain")
    assert [r["step"] for r in masked] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in masked)  # finite, near ln(512)
    assert masked[0]["loss"] != plain[0]["loss"]
    summary_m = json.loads((tmp_path / "masked" / "summary.json").read_text())
    summary_p = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary_m["initial_val_loss"] != summary_p["initial_val_loss"]
    assert abs(summary_m["initial_val_loss"] - summary_p["initial_val_loss"]) < 0.5


def test_encoder_decoder_pretraining_with_document_mask(sample_data, tmp_path):
    """The encoder-decoder with data.document_mask (its prefix split per block, documents apart in
    the encoder, decoder and cross-attention) trains, and `orchestrator evaluate` scores its
    checkpoint as its validation does (over the decoder's targets, documents apart)."""
    from orchestrator.tools.evaluate import evaluate_checkpoint

    args = ("--model.name", "redllm-tiny", "--data.document_mask", "true", "--train.max_steps",
            "2", "--eval.interval", "0", "--checkpoint.interval", "2")  # fmt: skip
    train(tmp_path / "masked", sample_data, *args)
    records = step_records(tmp_path / "masked")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)
    summary = json.loads((tmp_path / "masked" / "summary.json").read_text())
    tokens, _ = sample_data
    result = evaluate_checkpoint(tmp_path / "masked", data=tokens, batch_size=4, max_batches=2)
    assert result["tokens"] == 8 * 32  # the decoder's half of each 64-token block
    # Other batches than the 2-process validation's: the same model, about the same loss.
    assert abs(result["loss"] - summary["final_val_loss"]) < 0.3
