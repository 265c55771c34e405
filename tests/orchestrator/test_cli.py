"""The command line users run: `orchestrator demo`, `models`, `config`, and the config reference
(docs/config.md)."""

import subprocess
import sys

import pytest

from orchestrator.cli import (
    QUICKSTART_CONFIG,
    REFERENCE_END,
    REFERENCE_START,
    main,
    reference_table,
)
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_demo_runs_from_raw_text_to_checkpoint(tmp_path):
    """The `make demo` path end to end (built-in corpus, tokenizer, prepare, 2-process training), shortened."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--data-dir", str(tmp_path / "sample"),
         "--run-dir", str(tmp_path / "run"), "--train.max_steps", "4", "--eval.max_batches", "2",
         "--train.log_interval", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "records skipped" in out  # prepare reports its counts
    assert "step      4/4" in out and "ETA" in out
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in out
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "manifest.json").is_file()
    assert (tmp_path / "sample" / "raw" / "train").is_dir()
    assert sorted((tmp_path / "sample" / "tokens").glob("*/index.json"))


def test_models_lists_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tinyllama-1.1b" in out and "1,100,048,384" in out


def test_config_prints_resolved_values(capsys):
    assert (
        main(
            [
                "config",
                "--config",
                str(REPO_ROOT / "configs" / "quickstart.yaml"),
                "--train.max_steps",
                "7",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "name: tiny" in out
    assert main(["config", "--no.such_key", "1"]) == 2
    assert "unknown config key 'no'" in capsys.readouterr().err


def test_config_reference_page_is_current():
    page = (REPO_ROOT / "docs" / "config.md").read_text()
    assert page.count(REFERENCE_START) == 1 and page.count(REFERENCE_END) == 1
    block = page.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0].strip()
    assert block == reference_table().strip(), (
        "docs/config.md's config reference is stale: run `orchestrator config --reference --write docs/config.md`"
    )
    # The README links to the page and no longer carries a copy of the table.
    readme = (REPO_ROOT / "README.md").read_text()
    assert REFERENCE_START not in readme and "docs/config.md" in readme


def test_config_reference_write_fills_the_marked_block(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text(
        f"# Config reference\n\n{REFERENCE_START}\nstale table\n{REFERENCE_END}\n\nafter\n"
    )
    assert main(["config", "--reference", "--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Config reference\n") and text.endswith(f"{REFERENCE_END}\n\nafter\n")
    assert (
        text.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0].strip()
        == reference_table().strip()
    )
    assert "stale table" not in text and str(page) in capsys.readouterr().out


def test_packaged_quickstart_config_is_the_documented_one(capsys):
    """`orchestrator demo` reads the file shipped as package data (no checkout needed);
    configs/quickstart.yaml is a link to it."""
    documented = REPO_ROOT / "configs" / "quickstart.yaml"
    assert QUICKSTART_CONFIG.read_bytes() == documented.read_bytes(), (
        f"{QUICKSTART_CONFIG} differs from {documented}: configs/quickstart.yaml must link to it"
    )
    assert main(["config", "--config", str(QUICKSTART_CONFIG)]) == 0
    assert "name: tiny" in capsys.readouterr().out


def test_models_lists_both_families_with_their_pairs_and_flops(capsys):
    from models.config import REDLLM_PAIRS, SIZES, model_config
    from models.flops import flops_per_token

    assert main(["models", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    header, *rest = out.splitlines()
    assert "arch" in header.split() and header.endswith("pairs with")
    rows = {cells[0]: cells for cells in map(str.split, rest) if cells and cells[0] in SIZES}
    assert set(rows) == set(SIZES)
    for red, (dec, layers) in REDLLM_PAIRS.items():
        assert rows[red][1] == "enc-dec" and rows[red][4] == f"{layers}+{layers}"
        assert rows[red][-1] == dec and rows[dec][-1] == red
        assert rows[dec][1] == "decoder" and rows[dec][4] == str(model_config(dec).n_layers)
        for name in (red, dec):  # GFLOP/tok is the family's own count
            expected = flops_per_token(model_config(name), 512)["training"] / 1e9
            assert rows[name][-2] == f"{expected:.3f}"
    assert "REDLLM_PAIRS" in out and "tied embeddings" in out
