"""`orchestrator fit` and `orchestrator report` over two model families (model.arch decoder and
encoder_decoder, the RedLLM study): compute from models/flops.py, one fit per family, one figure."""

import dataclasses
import json

import pytest
import yaml

from models.config import SIZES, model_config, paired_size
from models.flops import flops_per_token
from orchestrator.cli import main as cli_main
from orchestrator.tools.scaling import fit_families, read_run
from tests.orchestrator.tools.test_sweep import _fake_run, ladder_args, png_size, study_json

# The CPU ladder's five smallest decoder sizes and the encoder-decoder size paired with each.
DECODERS = sorted(
    (n for n in SIZES if n.startswith("micro-") and paired_size(n)),
    key=lambda n: model_config(n).num_params(),
)[:5]
ENCODER_DECODERS = [paired_size(name) for name in DECODERS]
# Known laws, one per family: (E, A, alpha) of L(N) = E + A N^-alpha.
LAWS = {"decoder": (1.8, 60.0, 0.30), "encoder_decoder": (1.6, 25.0, 0.24)}
SEQ_LEN = 128  # train.seq_len: below the micro sizes' max_seq_len (256), so it must be read
K = 120.0  # every run's final compute C = K N^2 (FLOPs), as Chinchilla's D = 20 N gives with 6 N D


def write_run(root, name, loss_at, tokens_final, full_config=False):
    """A finished run dir: config.yaml (the name only, or every model key as the trainer resolves
    it) and a metrics.jsonl whose validation loss falls to loss_at(tokens_final)."""
    cfg = model_config(name)
    run = root / name
    run.mkdir(parents=True)
    model = dataclasses.asdict(cfg) if full_config else {"name": name}
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": model, "train": {"seq_len": SEQ_LEN}})
    )
    lines = [{"step": 0, "val_loss": 7.0, "tokens_seen": 0}]
    for k in range(1, 6):
        tokens = tokens_final * k / 5
        lines.append({"step": 10 * k, "loss": loss_at(tokens), "tokens_seen": tokens})
        lines.append({"step": 10 * k, "val_loss": loss_at(tokens), "tokens_seen": tokens})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def write_two_families(root, decoders=DECODERS, encoder_decoders=ENCODER_DECODERS):
    """Both families' ladders. Each run trains D = K N^2 / (training FLOPs per token) tokens, so its
    compute from models/flops.py is exactly K N^2, and its final loss is its family's L(N): then
    L(C) = E + A K^(alpha/2) C^-(alpha/2) exactly, on the FLOPs axis (and not on 6 N D)."""
    dirs = []
    for name in [*decoders, *encoder_decoders]:
        cfg = model_config(name)
        E, A, alpha = LAWS[cfg.arch]
        n = cfg.num_params()
        d_final = K * n**2 / flops_per_token(cfg, SEQ_LEN)["training"]
        loss_at = lambda t, n=n, d=d_final, E=E, A=A, a=alpha: E + A * n**-a * (d / t) ** a  # noqa: E731
        # The encoder-decoders' config.yaml has every key (model.arch too), the decoders' the name only.
        dirs.append(write_run(root, name, loss_at, d_final, full_config=cfg.arch != "decoder"))
    return dirs


def test_compute_is_the_flops_count_of_each_family(tmp_path):
    tokens = 3.0e7
    loss_at = lambda t: 2.0 + 1.0 / t  # noqa: E731
    name = ENCODER_DECODERS[2]
    red = read_run(write_run(tmp_path, name, loss_at, tokens, full_config=True))
    cfg = model_config(name)
    assert red.arch == "encoder_decoder" and red.params == cfg.num_params()
    assert red.tokens == tokens
    # C = training FLOPs per token at the run's train.seq_len x tokens seen ...
    assert red.compute == pytest.approx(flops_per_token(cfg, SEQ_LEN)["training"] * tokens)
    # ... which is neither 6 N D (each token passes through one stack: about half) nor the count
    # at model.max_seq_len.
    assert 0.4 < red.compute / (6 * red.params * tokens) < 0.7
    assert red.compute != pytest.approx(flops_per_token(cfg)["training"] * tokens, rel=1e-3)
    six = read_run(tmp_path / name, compute="6nd")
    assert six.compute == pytest.approx(6 * cfg.num_params() * tokens)
    # A decoder's config.yaml with the name only: the family and the shape come from the size.
    dec = read_run(write_run(tmp_path, DECODERS[2], loss_at, tokens))
    assert dec.arch == "decoder"
    assert dec.compute == pytest.approx(
        flops_per_token(model_config(DECODERS[2]), SEQ_LEN)["training"] * tokens
    )
    with pytest.raises(ValueError, match="flops | 6nd"):
        read_run(tmp_path / DECODERS[2], compute="6ND")


def test_fit_recovers_each_familys_exponents_and_draws_them_together(tmp_path, capsys):
    dirs = write_two_families(tmp_path / "runs")
    png, out_json = tmp_path / "fit.png", tmp_path / "fit.json"
    argv = ["fit", *map(str, dirs), "--plot", str(png), "--json", str(out_json)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "decoder-only (Llama), 5 runs:" in out and "encoder-decoder (RedLLM), 5 runs:" in out
    assert "N^-(0.3 ± " in out and "N^-(0.24 ± " in out  # each family's own exponent
    assert "C^-(0.15 ± " in out and "C^-(0.12 ± " in out
    result = json.loads(out_json.read_text())
    assert result["compute"] == "flops" and "fits" not in result  # two families: no single fit
    assert {r["arch"] for r in result["runs"]} == {"decoder", "encoder_decoder"}
    for family, (E, A, alpha) in LAWS.items():
        fam = result["families"][family]
        assert len(fam["runs"]) == 5
        n, c = fam["fits"]["params"], fam["fits"]["compute"]
        assert n["alpha"] == pytest.approx(alpha, abs=1e-6)
        assert n["E"] == pytest.approx(E, abs=1e-5) and n["A"] == pytest.approx(A, rel=1e-4)
        assert c["alpha"] == pytest.approx(alpha / 2, abs=1e-6)
        assert c["E"] == pytest.approx(E, abs=1e-5)
        assert c["A"] == pytest.approx(A * K ** (alpha / 2), rel=1e-4)
        assert n["alpha_err"] < 1e-6  # 5 runs: an uncertainty, ~0 on exact data
    # One figure, both families (12 x 4.8 inches at 120 dpi).
    assert png_size(png) == (1440, 576) and png.stat().st_size > 30_000
    # On 6 N D the same runs do not follow the compute law: the axis is the FLOPs count.
    six = fit_families([read_run(d, compute="6nd") for d in dirs])
    for fam in six:
        alpha = LAWS[fam.family][2]
        assert fam.fits["params"].alpha == pytest.approx(alpha, abs=1e-6)
        assert abs(fam.fits["compute"].alpha - alpha / 2) > 1e-3


def test_a_family_without_enough_sizes_is_reported_not_fitted(tmp_path, capsys):
    dirs = write_two_families(tmp_path / "runs", encoder_decoders=ENCODER_DECODERS[:2])
    out_json = tmp_path / "fit.json"
    argv = ["fit", *map(str, dirs), "--plot", str(tmp_path / "fit.png"), "--json", str(out_json)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "encoder-decoder (RedLLM), 2 runs:\n  no fit: need runs of at least 3" in out
    families = json.loads(out_json.read_text())["families"]
    assert "fits" in families["decoder"] and "at least 3" in families["encoder_decoder"]["error"]
    assert (tmp_path / "fit.png").is_file()
    # When no family can be fitted, that is an error naming each family.
    assert cli_main(["fit", *map(str, dirs[3:]), "--plot", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert "decoder-only (Llama): need runs" in err and "encoder-decoder (RedLLM): need" in err


def test_report_fits_each_family_of_a_mixed_ladder(tmp_path, sample_data, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "train": {"max_steps": 4}}))
    study = tmp_path / "ladder"
    sizes = [*DECODERS[:4], *ENCODER_DECODERS[:4]]
    args = ladder_args(base, study, sample_data)
    code = cli_main(
        ["sweep", *args, "--ladder", ",".join(sizes), "--tokens-per-param", "20", "--dry-run"]
    )
    assert code == 0
    runs = study_json(study)["runs"]
    assert [r["overrides"]["model.name"] for r in runs] == sizes
    for run in runs:  # the trainer's resolved config.yaml, its final loss its family's L(N)
        E, A, alpha = LAWS[model_config(run["overrides"]["model.name"]).arch]
        _fake_run(run, E + A * run["params"] ** -alpha)
    capsys.readouterr()
    assert cli_main(["report", str(study)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((study / "report" / "report.json").read_text())
    scaling = {s["family"]: s for s in report["scaling"]}
    assert list(scaling) == ["decoder", "encoder_decoder"]  # one fit per family
    for family, (_, _, alpha) in LAWS.items():
        s = scaling[family]
        assert s["group"] == {"model.arch": family} and s["label"] == f"arch={family}"
        assert [r["name"] for r in s["runs"]] == [
            r["name"] for r in runs if model_config(r["overrides"]["model.name"]).arch == family
        ]
        assert s["fits"]["params"]["alpha"] == pytest.approx(alpha, rel=1e-3)
        assert s["compute"] == "flops"
    assert scaling["decoder"]["file"] == scaling["encoder_decoder"]["file"] == "scaling.png"
    assert png_size(study / "report" / "scaling.png")[0] > 0
    (listed,) = [line for line in printed.splitlines() if line.startswith("Report: ")]
    assert listed.count("scaling.png") == 1  # the families' figure, once
    md = (study / "report" / "report.md").read_text()
    assert "| group | family | alpha_N | alpha_C | E (L(N)) | E (L(C)) | runs | figure |" in md
    rows = [line for line in md.splitlines() if line.startswith("| arch=")]
    assert len(rows) == 2 and "decoder-only (Llama) | 0.3 ± " in rows[0]
    assert "encoder-decoder (RedLLM) | 0.24 ± " in rows[1] and rows[1].endswith(
        "| 4 | [scaling.png](scaling.png) |"
    )
    assert md.count("![scaling](scaling.png)") == 1
    # `orchestrator fit` on the study: the same two fits.
    out_json = tmp_path / "fit.json"
    argv = ["fit", str(study), "--plot", str(tmp_path / "fit.png"), "--json", str(out_json)]
    assert cli_main(argv) == 0
    families = json.loads(out_json.read_text())["families"]
    for family, (_, _, alpha) in LAWS.items():
        assert families[family]["fits"]["params"]["alpha"] == pytest.approx(alpha, rel=1e-3)
