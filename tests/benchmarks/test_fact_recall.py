"""Smoke test of benchmarks/fact_recall.py on random checkpoints of both families (no figure is
judged: every relation is counted over every country, the encoder-decoder in both layouts)."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark
from tests.hf_helpers import random_model, small_config, write_checkpoint


def test_fact_recall_counts_every_country_and_relation(sample_data, tmp_path, capsys):
    bench = load_benchmark("fact_recall")
    _, tokenizer = sample_data
    decoder = write_checkpoint(
        tmp_path / "dec", random_model(small_config(vocab_size=512)), tokenizer
    )
    encdec_cfg = small_config(arch="encoder_decoder", tie_embeddings=True, vocab_size=512)
    encdec = write_checkpoint(tmp_path / "encdec", random_model(encdec_cfg), tokenizer)
    out = tmp_path / "recall.json"
    assert bench.main([str(decoder), str(encdec), "--json", str(out)]) == 0
    dec, enc = json.loads(out.read_text())
    assert set(dec) == {"checkpoint", "arch", "decoder"}
    assert set(enc) == {"checkpoint", "arch", "decoder", "encoder"}
    for rows in (dec["decoder"], enc["decoder"], enc["encoder"]):
        assert set(rows) == set(bench.SENTENCES)
        assert all(0 <= r["known"] <= r["countries"] == 24 for r in rows.values())
        assert rows["continent"]["values"] < rows["capital"]["values"] == 24
    assert "subject in the encoder" in capsys.readouterr().out
