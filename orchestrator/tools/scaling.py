"""Scaling-law fits over finished runs (`orchestrator fit`): loss against parameters and against compute.

    orchestrator fit runs/ladder-* | STUDY_DIR [--plot fit.png] [--json fit.json] [--non-embedding]
                     [--metric val_loss] [--compute flops|6nd]

L(N) = E_N + A * N^-alpha_N and L(C) = E_C + B * C^-alpha_C, least squares on log L, per family.
What is read and counted: docs/studies.md, "Plan the next run: `plan` and `fit`".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.config import ModelConfig, model_config
from models.flops import flops_per_token

COMPUTE_MODES = ("flops", "6nd")
# Families (model.arch) in the order they are reported and drawn, with their names and colours.
FAMILIES = {
    "decoder": ("decoder-only (Llama)", "tab:blue", "Blues"),
    "encoder_decoder": ("encoder-decoder (RedLLM)", "tab:orange", "Oranges"),
}


@dataclass
class Run:
    name: str
    params: int
    curve: list[tuple[float, float]]  # (tokens seen, loss) of every validation, in step order
    arch: str = "decoder"  # model.arch: the family the run is fitted with
    flops_per_token: float | None = None  # training FLOPs per token seen; None: 6 N

    @property
    def compute_per_token(self) -> float:
        return 6.0 * self.params if self.flops_per_token is None else self.flops_per_token

    @property
    def tokens(self) -> float:
        return self.curve[-1][0]

    @property
    def loss(self) -> float:
        return self.curve[-1][1]

    @property
    def compute(self) -> float:
        return self.compute_per_token * self.tokens


@dataclass
class PowerLaw:
    """y = E + A * x^-alpha, with one-standard-error uncertainties (nan when they cannot be estimated)."""

    E: float
    A: float
    alpha: float
    E_err: float
    A_err: float
    alpha_err: float
    points: int
    rms_log_residual: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(x, -self.alpha)

    def describe(self, var: str) -> str:
        return (
            f"L({var}) = {fmt_err(self.E, self.E_err)} + {self.A:.4g} * {var}^-{fmt_err(self.alpha, self.alpha_err)}"
            f"   ({self.points} runs, rms log residual {self.rms_log_residual:.2e})"
        )


def fmt_err(value: float, err: float) -> str:
    if not math.isfinite(err):
        return f"{value:.4g} (± n/a)"
    return f"({value:.4g} ± {err:.2g})"


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


def run_model(config_file: str | Path) -> tuple[ModelConfig, int]:
    """The model of a run's config.yaml and the sequence length it trained at (train.seq_len,
    else model.max_seq_len). Keys the file leaves out (model.arch among them) come from the
    named size, as the trainer resolves them."""
    config_file = Path(config_file)
    data = yaml.safe_load(config_file.read_text()) or {}
    model = dict(data.get("model") or {})
    if not model:
        raise ValueError(f"{config_file} has no model section")
    cfg = model_config(model.pop("name", "tinyllama-1.1b"), **model)
    seq_len = (data.get("train") or {}).get("seq_len") or cfg.max_seq_len
    return cfg, int(seq_len)


def compute_per_token(cfg: ModelConfig, seq_len: int, params: int, compute: str = "flops") -> float:
    """Training FLOPs a run spends per token seen: models/flops.py's count at its sequence length
    (`flops`), or 6 N with N the parameters the fit uses (`6nd`)."""
    if compute == "flops":
        return float(flops_per_token(cfg, seq_len)["training"])
    if compute == "6nd":
        return 6.0 * params
    raise ValueError(f"compute={compute!r} is not one of {' | '.join(COMPUTE_MODES)}")


def step_records(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl that belong to a step, in file order (a resumed or
    rolled-back step appears again later: readers let the later line win). A torn last line of a
    killed run is passed over; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") is not None:
            records.append(record)
    return records


def _curve_from_jsonl(path: Path, metric: str) -> list[tuple[float, float]]:
    tokens_at: dict[int, float] = {}
    points: dict[int, tuple[float | None, float]] = {}
    for r in step_records(path):
        step = r["step"]
        if "loss" in r and "tokens_seen" in r:
            tokens_at[step] = float(r["tokens_seen"])
        if metric in r and r[metric] is not None and math.isfinite(r[metric]):
            points[step] = (r.get("tokens_seen"), float(r[metric]))  # a later line wins
    tokens_at.setdefault(0, 0.0)
    curve = []
    for step in sorted(points):
        tokens, loss = points[step]
        tokens = tokens if tokens is not None else tokens_at.get(step)
        if tokens is not None:
            curve.append((float(tokens), loss))
    return curve


def _curve_from_tensorboard(tb_dir: Path, metric: str) -> list[tuple[float, float]]:
    # tensorboard: only runs without a metrics.jsonl need it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tag = {"val_loss": "val/loss", "loss": "train/loss"}.get(metric, metric)
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    if tag not in tags or "train/tokens_seen" not in tags:
        return []
    tokens_at = {e.step: e.value for e in acc.Scalars("train/tokens_seen")}
    tokens_at.setdefault(0, 0.0)
    steps = sorted(tokens_at)
    curve = []
    for e in acc.Scalars(tag):
        if e.step in tokens_at:
            tokens = tokens_at[e.step]
        else:  # tokens_seen is logged every log interval: interpolate linearly in steps
            tokens = float(np.interp(e.step, steps, [tokens_at[s] for s in steps]))
        if math.isfinite(e.value):
            curve.append((float(tokens), float(e.value)))
    return curve


def study_runs(path: str | Path) -> list[Path] | None:
    """The run dirs of an `orchestrator sweep` study that trained (finished, not diverged), in
    the study's order; None when `path` is not a study directory."""
    study_file = Path(path) / "study.json"
    if not study_file.is_file():
        return None
    runs = []
    for run in json.loads(study_file.read_text()).get("runs", []):
        if run.get("status") == "diverged":
            continue
        summary = Path(run["run_dir"]) / "summary.json"
        try:
            steps = json.loads(summary.read_text()).get("steps", 0)
        except (OSError, json.JSONDecodeError):
            continue
        if steps >= run.get("max_steps", 0):
            runs.append(Path(run["run_dir"]))
    return runs


def expand_studies(paths: list[str | Path]) -> list[Path]:
    """Run paths with every study directory replaced by its runs that trained."""
    out: list[Path] = []
    for path in paths:
        runs = study_runs(path)
        out.extend([Path(path)] if runs is None else runs)
    return out


def read_run(
    path: str | Path, metric: str = "val_loss", non_embedding: bool = False, compute: str = "flops"
) -> Run:
    """One finished run from a run dir, its metrics.jsonl, or its tensorboard/ dir; `compute`
    (flops | 6nd) is how its training compute is counted."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute={compute!r} is not one of {' | '.join(COMPUTE_MODES)}")
    path = Path(path)
    if path.is_file():
        run_dir, jsonl, tb = path.parent, path, None
    elif (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
        run_dir, jsonl, tb = path, path / "metrics.jsonl", path / "tensorboard"
    else:  # a tensorboard dir
        run_dir, jsonl, tb = path.parent, None, path
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} is missing: fit needs each run's config.yaml for its parameter count"
        )
    curve = _curve_from_jsonl(jsonl, metric) if jsonl is not None and jsonl.is_file() else []
    if not curve and tb is not None and tb.is_dir():
        curve = _curve_from_tensorboard(tb, metric)
    curve = [(t, loss) for t, loss in curve if t > 0]  # the step-0 evaluation has spent no compute
    if not curve:
        raise ValueError(
            f"{path}: no {metric} with tokens seen > 0 in metrics.jsonl or tensorboard/"
        )
    cfg, seq_len = run_model(config)
    params = cfg.num_non_embedding_params() if non_embedding else cfg.num_params()
    return Run(
        name=run_dir.name,
        params=params,
        curve=curve,
        arch=cfg.arch,
        flops_per_token=compute_per_token(cfg, seq_len, params, compute),
    )


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least-squares fit of log y = log(E + A x^-alpha), E >= 0, over points (x, y)."""
    from scipy.optimize import least_squares  # scipy: heavy, only the fit needs it

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3:
        raise ValueError(
            f"a power law with an irreducible term has 3 parameters: need >= 3 runs, got {len(x)}"
        )
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("x and loss must be positive")
    x_ref = float(np.exp(np.mean(np.log(x))))  # conditioning: fit in units of the geometric mean
    u = np.log(x / x_ref)
    logy = np.log(y)

    def model(theta: np.ndarray) -> np.ndarray:
        E, log_a, alpha = theta
        return np.log(E + np.exp(log_a - alpha * u))

    def residuals(theta: np.ndarray) -> np.ndarray:
        return model(theta) - logy

    # Start from the best of a few irreducible terms, each with a linear fit of log(y - E) on u.
    best = None
    for frac in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
        E0 = frac * y.min()
        slope, intercept = np.polyfit(u, np.log(y - E0), 1)
        theta0 = np.array([E0, intercept, max(-slope, 1e-3)])
        cost = float(np.sum(residuals(theta0) ** 2))
        if best is None or cost < best[0]:
            best = (cost, theta0)
    theta0 = best[1]
    lower = np.array([0.0, -np.inf, 0.0])
    upper = np.array([y.min() * (1 - 1e-9), np.inf, 10.0])
    theta0 = np.clip(theta0, lower + 1e-12, upper - 1e-12)
    sol = least_squares(
        residuals,
        theta0,
        bounds=(lower, upper),
        x_scale="jac",
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=20000,
    )
    E, log_a, alpha = sol.x
    dof = len(x) - 3
    rss = float(np.sum(sol.fun**2))
    errs = np.full(3, np.nan)
    if dof > 0:
        try:
            cov = np.linalg.inv(sol.jac.T @ sol.jac) * rss / dof
            errs = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            pass
    # Back to absolute units: A x_ref^alpha x^-alpha.
    A = float(np.exp(log_a) * x_ref**alpha)
    # d(log A_abs) = d(log_a) + log(x_ref) d(alpha): first-order error, ignoring the correlation's sign.
    A_err = (
        float(A * math.hypot(errs[1], math.log(x_ref) * errs[2]))
        if np.all(np.isfinite(errs))
        else math.nan
    )
    return PowerLaw(
        E=float(E),
        A=A,
        alpha=float(alpha),
        E_err=float(errs[0]),
        A_err=A_err,
        alpha_err=float(errs[2]),
        points=len(x),
        rms_log_residual=math.sqrt(rss / len(x)),
    )


def fit_runs(runs: list[Run]) -> dict[str, PowerLaw]:
    """L(N) and L(C) over runs of one family."""
    params = np.array([r.params for r in runs], dtype=float)
    compute = np.array([r.compute for r in runs], dtype=float)
    loss = np.array([r.loss for r in runs], dtype=float)
    if len(set(params)) < 3:
        raise ValueError(f"need runs of at least 3 different model sizes, got {len(set(params))}")
    return {"params": fit_power_law(params, loss), "compute": fit_power_law(compute, loss)}


@dataclass
class FamilyFit:
    """One family's runs and its fits (None, with the reason in `error`, when it has none)."""

    family: str
    runs: list[Run]
    fits: dict[str, PowerLaw] | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return family_label(self.family)


def family_label(family: str) -> str:
    return FAMILIES[family][0] if family in FAMILIES else family


def by_family(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by model.arch: decoder first, then encoder_decoder, then any other."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.arch, []).append(run)
    order = [f for f in FAMILIES if f in groups] + [f for f in groups if f not in FAMILIES]
    return {f: groups[f] for f in order}


def fit_families(runs: list[Run]) -> list[FamilyFit]:
    """Each family's L(N) and L(C), fitted on its own runs. A family that cannot be fitted (fewer
    than 3 sizes) is kept with its error, as long as another one fits; when none does, the
    ValueError is raised (named by family when there are several)."""
    if not runs:
        raise ValueError("no runs to fit")
    out = []
    for family, group in by_family(runs).items():
        try:
            out.append(FamilyFit(family, group, fits=fit_runs(group)))
        except ValueError as e:
            out.append(FamilyFit(family, group, error=str(e)))
    if all(f.fits is None for f in out):
        if len(out) == 1:
            raise ValueError(out[0].error)
        raise ValueError("; ".join(f"{f.label}: {f.error}" for f in out))
    return out


# --------------------------------------------------------------------------------------------
# Plot and report
# --------------------------------------------------------------------------------------------


def compute_label(compute: str) -> str:
    if compute == "6nd":
        return "training compute C = 6 N D (FLOPs)"
    return "training compute C = FLOPs/token (models/flops.py) x D"


def _alpha_label(var: str, f: PowerLaw) -> str:
    err = "" if not math.isfinite(f.alpha_err) else f" ± {f.alpha_err:.2g}"
    return f"α_{var} = {f.alpha:.3f}{err}"


def plot(families: list[FamilyFit], path: str | Path, compute: str = "flops") -> Path:
    """One figure, two panels (loss vs compute: every run's validation curve and its final point;
    loss vs parameters: the final points), each family in its own colour with its fitted curves
    labelled by exponent."""
    import matplotlib  # matplotlib: heavy, only the plot needs it

    matplotlib.use("Agg")  # before pyplot: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_n) = plt.subplots(1, 2, figsize=(12, 4.8))
    spare = iter(["tab:green", "tab:red", "tab:purple", "tab:brown"])
    for i, fam in enumerate(families):
        _, color, cmap = FAMILIES.get(fam.family, (None, None, None))
        color = color or next(spare, "tab:gray")
        marker = "os^Dv"[i % 5]
        runs = sorted(fam.runs, key=lambda r: r.params)
        shades = (
            plt.get_cmap(cmap)(np.linspace(0.45, 0.95, len(runs))) if cmap else [color] * len(runs)
        )
        for run, shade in zip(runs, shades, strict=True):
            ax_c.plot(
                [run.compute_per_token * t for t, _ in run.curve],
                [loss for _, loss in run.curve],
                "-",
                color=shade,
                alpha=0.6,
                lw=1,
            )
            ax_c.plot(
                [run.compute],
                [run.loss],
                marker,
                color=shade,
                mec=color,
                # one family: a legend entry per run; several: per family (the N panel's)
                label=f"{run.name} ({run.params / 1e6:,.3g}M)" if len(families) == 1 else None,
            )
        ax_n.plot(
            [r.params for r in runs],
            [r.loss for r in runs],
            marker,
            color=color,
            label=f"{fam.label} ({len(runs)} runs)" + ("" if fam.fits else ": no fit"),
        )
        if fam.fits is None:
            continue
        for ax, key, xs, var in (
            (ax_c, "compute", [r.compute for r in runs], "C"),
            (ax_n, "params", [r.params for r in runs], "N"),
        ):
            f = fam.fits[key]
            grid = np.geomspace(min(xs) / 2, max(xs) * 2, 200)
            ax.plot(
                grid,
                f(grid),
                "--",
                color=color,
                lw=1.5,
                label=f"{fam.label}: {f.E:.3g} + {f.A:.3g}·{var}^-α, {_alpha_label(var, f)}",
            )
            ax.axhline(f.E, color=color, lw=0.8, ls=":")
    for ax in (ax_c, ax_n):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("validation loss")
    ax_c.set_xlabel(compute_label(compute))
    ax_n.set_xlabel("parameters N")
    ax_c.set_title("loss vs compute (lines: runs; dots: final)")
    ax_n.set_title("loss vs parameters (final validation loss)")
    ax_c.legend(fontsize=6, loc="upper right")
    ax_n.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(families: list[FamilyFit], compute: str = "flops") -> str:
    lines = [
        f"{'run':<24} {'family':<16} {'params':>14} {'tokens':>16} {'compute (FLOPs)':>16} {'loss':>8}"
    ]
    for fam in families:
        for r in sorted(fam.runs, key=lambda r: r.params):
            lines.append(
                f"{r.name:<24} {r.arch:<16} {r.params:>14,} {r.tokens:>16,.0f} {r.compute:>16.3e} "
                f"{r.loss:>8.4f}"
            )
    lines.append(f"(compute: {compute_label(compute)})")
    for fam in families:
        lines += ["", f"{fam.label}, {len(fam.runs)} runs:"]
        if fam.fits is None:
            lines.append(f"  no fit: {fam.error}")
            continue
        lines.append("loss vs parameters: " + fam.fits["params"].describe("N"))
        lines.append("loss vs compute:    " + fam.fits["compute"].describe("C"))
    return "\n".join(lines)


def run_dict(r: Run) -> dict[str, Any]:
    return {
        "name": r.name,
        "arch": r.arch,
        "params": r.params,
        "tokens": r.tokens,
        "flops_per_token": r.compute_per_token,
        "compute": r.compute,
        "loss": r.loss,
    }


def family_dict(fam: FamilyFit) -> dict[str, Any]:
    out: dict[str, Any] = {"label": fam.label, "runs": [r.name for r in fam.runs]}
    if fam.fits is None:
        out["error"] = fam.error
    else:
        out["fits"] = {k: asdict(v) for k, v in fam.fits.items()}
    return out


def results_dict(families: list[FamilyFit], compute: str = "flops") -> dict[str, Any]:
    """Every run, and per family (model.arch) its fits; `fits` at the top as well when all the
    runs are of one family (the layout before families)."""
    out: dict[str, Any] = {
        "compute": compute,
        "runs": [run_dict(r) for fam in families for r in fam.runs],
        "families": {fam.family: family_dict(fam) for fam in families},
    }
    if len(families) == 1 and families[0].fits is not None:
        out["fits"] = {k: asdict(v) for k, v in families[0].fits.items()}
    return out
