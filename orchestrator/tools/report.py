"""`orchestrator report STUDY_DIR [--out DIR]`: what a study (`orchestrator sweep`) found.

Writes report.md, report.json, val_loss.png, loss_vs_lr.png and scaling*.png into DIR (default
STUDY_DIR/report), from each run's metrics.jsonl and the study's study.json. What each holds:
docs/studies.md, "Sweeps and ladders".
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from orchestrator.tools.scaling import step_records
from orchestrator.tools.sweep import LADDER_KEY, LR_KEY, load_study, reconcile, short_keys

# A ladder's fits are per family: the run's model.arch joins the other grid keys in each group's key.
ARCH_KEY = "model.arch"


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The figures of one run from its metrics.jsonl (empty when it never started)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps: dict[int, dict] = {}
    vals: dict[int, float] = {}
    bad_total = 0
    rollbacks = 0
    rollbacks_after_bad = 0
    for r in step_records(path):
        step = r["step"]
        if "loss" in r:
            steps[step] = r  # a rolled-back or resumed step's later line wins
        if r.get("val_loss") is not None:
            vals[step] = float(r["val_loss"])
        if "bad_steps_total" in r:
            bad_total = max(bad_total, int(r["bad_steps_total"]))
            rollbacks_after_bad = 0
        if "rollbacks_total" in r:
            rollbacks = max(rollbacks, int(r["rollbacks_total"]))
            rollbacks_after_bad += 1  # its bad step is not a bad_step record
    rates = [r["tokens_per_sec"] for r in steps.values() if r.get("tokens_per_sec")]
    curve = sorted(vals.items())
    finite = [v for _, v in curve if math.isfinite(v)]
    last_step = max(steps) if steps else 0
    return {
        "steps": last_step,
        "tokens": int(steps[last_step]["tokens_seen"]) if steps else 0,
        "val_curve": curve,
        "final_val_loss": curve[-1][1] if curve else None,
        "final_val_step": curve[-1][0] if curve else None,
        "best_val_loss": min(finite) if finite else None,
        "bad_steps": bad_total + rollbacks_after_bad,
        "rollbacks": rollbacks,
        "tokens_per_sec": statistics.median(rates) if rates else None,
    }


def perplexity(loss: float | None) -> float | None:
    return None if loss is None or not math.isfinite(loss) else math.exp(min(loss, 50.0))


def study_rows(study: dict) -> list[dict[str, Any]]:
    rows = []
    for run in study["runs"]:
        m = read_metrics(run["run_dir"])
        diverged = run["status"] == "diverged"
        rows.append(
            {
                "index": run["index"],
                "name": run["name"],
                "overrides": run["overrides"],
                "status": run["status"],
                "attempts": len(run["attempts"]),
                "params": run["params"],
                "baseline_params": run.get("baseline_params"),
                "ffn_hidden": run.get("ffn_hidden"),
                "baseline_ffn_hidden": run.get("baseline_ffn_hidden"),
                "max_steps": run["max_steps"],
                "steps": m["steps"],
                "tokens": m["tokens"],
                "final_val_loss": m["final_val_loss"],
                "final_val_step": m["final_val_step"],
                "best_val_loss": m["best_val_loss"],
                "final_val_perplexity": perplexity(m["final_val_loss"]),
                "best_val_perplexity": perplexity(m["best_val_loss"]),
                "diverged": diverged,
                "diverged_at_step": run.get("diverged_at_step") if diverged else None,
                "bad_steps": m["bad_steps"] + (1 if diverged else 0),
                "rollbacks": m["rollbacks"],
                "tokens_per_sec": m["tokens_per_sec"],
                "val_curve": m["val_curve"],
                "run_dir": run["run_dir"],
            }
        )
    return rows


def grid_keys(study: dict) -> list[str]:
    keys: list[str] = []
    for run in study["runs"]:
        keys.extend(k for k in run["overrides"] if k not in keys)
    return keys


def variant_of(row: dict, exclude: tuple[str, ...] = (LR_KEY,)) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in row["overrides"].items() if k not in exclude)


def variant_label(variant: tuple[tuple[str, str], ...], short: dict[str, str]) -> str:
    return ",".join(f"{short[k]}={v}" for k, v in variant) or "all runs"


def lr_table(rows: list[dict], short: dict[str, str]) -> list[dict[str, Any]]:
    """Per variant: the largest learning rate that trained (finished without diverging) and the
    smallest that diverged."""
    out = []
    variants: dict[tuple, list[dict]] = {}
    for row in rows:
        if LR_KEY in row["overrides"]:
            variants.setdefault(variant_of(row), []).append(row)
    for variant, group in variants.items():
        trained = [float(r["overrides"][LR_KEY]) for r in group if r["status"] == "finished"]
        diverged = [float(r["overrides"][LR_KEY]) for r in group if r["diverged"]]
        best = min(
            (r for r in group if r["status"] == "finished" and r["final_val_loss"] is not None),
            key=lambda r: r["final_val_loss"],
            default=None,
        )
        out.append(
            {
                "variant": dict(variant),
                "label": variant_label(variant, short),
                "largest_lr_trained": max(trained) if trained else None,
                "smallest_lr_diverged": min(diverged) if diverged else None,
                "best_lr": float(best["overrides"][LR_KEY]) if best else None,
                "best_final_val_loss": best["final_val_loss"] if best else None,
                "runs": len(group),
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # matplotlib: heavy, only the plots need it

    matplotlib.use("Agg")  # before pyplot: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_val_curves(rows: list[dict], path: Path) -> dict[str, Any]:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    curves = 0
    for row in rows:
        points = [(s, v) for s, v in row["val_curve"] if math.isfinite(v)]
        if not points:
            continue
        label = row["name"] + (
            f" (diverged at {row['diverged_at_step']})" if row["diverged"] else ""
        )
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            "--" if row["diverged"] else "-",
            marker="o",
            ms=3,
            label=label,
        )
        curves += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss per run")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"file": path.name, "curves": curves}


def plot_loss_vs_lr(rows: list[dict], short: dict[str, str], path: Path) -> dict[str, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    variants: dict[tuple, list[dict]] = {}
    for row in rows:
        if LR_KEY in row["overrides"]:
            variants.setdefault(variant_of(row), []).append(row)
    curves = 0
    diverged_marked = 0
    for i, (variant, group) in enumerate(variants.items()):
        group = sorted(group, key=lambda r: float(r["overrides"][LR_KEY]))
        ok = [r for r in group if r["status"] == "finished" and r["final_val_loss"] is not None]
        label = variant_label(variant, short)
        color = None
        if ok:
            (line,) = ax.plot(
                [float(r["overrides"][LR_KEY]) for r in ok],
                [r["final_val_loss"] for r in ok],
                "-o",
                label=label,
            )
            color = line.get_color()
            curves += 1
        bad = [float(r["overrides"][LR_KEY]) for r in group if r["diverged"]]
        if bad:  # at the top edge (no loss to show), nudged apart per variant
            ax.plot(
                [lr * 1.15**i for lr in bad],
                [0.96] * len(bad),
                "x",
                transform=ax.get_xaxis_transform(),
                ms=10,
                mew=2,
                color=color,
                label=f"{label}: diverged",
            )
            diverged_marked += len(bad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("final validation loss")
    ax.set_title("final validation loss vs learning rate (x at the top: diverged)")
    ax.grid(True, which="both", alpha=0.3)
    if curves or diverged_marked:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"file": path.name, "curves": curves, "diverged_points": diverged_marked}


def scaling_fits(
    rows: list[dict], short: dict[str, str], out: Path, compute: str = "flops"
) -> list[dict[str, Any]]:
    """A ladder's `orchestrator fit`: one per group of runs that differ only in size and are of
    one family (the group's key: the other grid keys and model.arch), with one figure per group
    of the other grid keys that draws its families together."""
    from orchestrator.tools.scaling import family_dict, fit_families, plot, read_run, run_dict

    variants: dict[tuple, list[dict]] = {}
    for row in rows:
        if LADDER_KEY in row["overrides"]:
            variants.setdefault(variant_of(row, exclude=(LADDER_KEY,)), []).append(row)
    short = {**short, ARCH_KEY: "arch"}
    results = []
    for variant, group in variants.items():
        trained = [
            r for r in group if r["status"] == "finished" and r["final_val_loss"] is not None
        ]
        try:
            runs = [read_run(r["run_dir"], compute=compute) for r in trained]
            families = fit_families(runs)
        except (ValueError, FileNotFoundError) as e:
            results.append(
                {
                    "group": dict(variant),
                    "label": variant_label(variant, short),
                    "runs": [r["name"] for r in trained],
                    "error": str(e),
                }
            )
            continue
        suffix = (
            ""
            if len(variants) == 1
            else "_"
            + "".join(
                c if c.isalnum() or c in "=.-" else "_" for c in variant_label(variant, short)
            )
        )
        path = plot(families, out / f"scaling{suffix}.png", compute)
        for fam in families:
            key = (*variant, (ARCH_KEY, fam.family))
            entry = {
                "group": dict(key),
                "family": fam.family,
                **family_dict(fam),
                "label": variant_label(key, short),
                "family_label": fam.label,
                "compute": compute,
                "runs": [run_dict(r) for r in fam.runs],
                "file": path.name,  # the figure of the group's families together
            }
            results.append(entry)
    return results


def scaling_markdown(fits: list[dict]) -> list[str]:
    """The ladder's fits: a table of each family's exponents, the fitted laws, the figures."""
    lines = ["", "## Scaling (ladder)", ""]
    ok = [f for f in fits if "fits" in f]
    if ok:
        compute = ok[0].get("compute", "flops")
        lines += [
            "One fit per group of sizes of one family (model.arch); compute C = "
            + (
                "6 N D."
                if compute == "6nd"
                else "models/flops.py's training FLOPs per token x tokens seen (an encoder-decoder's "
                "token passes through one of its two stacks: about half a decoder's 6 N)."
            ),
            "",
            "| group | family | alpha_N | alpha_C | E (L(N)) | E (L(C)) | runs | figure |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def pm(p: dict, key: str) -> str:
            err = p[f"{key}_err"]
            return f"{p[key]:.4g}" + (
                f" ± {err:.2g}" if err is not None and math.isfinite(err) else ""
            )

        for f in ok:
            n, c = f["fits"]["params"], f["fits"]["compute"]
            lines.append(
                f"| {f['label']} | {f['family_label']} | {pm(n, 'alpha')} | {pm(c, 'alpha')} | "
                f"{pm(n, 'E')} | {pm(c, 'E')} | {len(f['runs'])} | [{f['file']}]({f['file']}) |"
            )
        lines.append("")
    for f in fits:
        if "fits" not in f:
            lines.append(f"- {f['label']}: no fit ({f['error']})")
            continue
        for key, var in (("params", "N"), ("compute", "C")):
            p = f["fits"][key]
            err = "" if not math.isfinite(p["alpha_err"]) else f" ± {p['alpha_err']:.2g}"
            lines.append(
                f"- {f['label']}: L({var}) = {p['E']:.4g} + {p['A']:.4g} {var}^-({p['alpha']:.4g}{err}) "
                f"over {p['points']} runs"
            )
    for file in dict.fromkeys(f["file"] for f in fits if "file" in f):
        lines += ["", f"![scaling]({file})"]
    return lines


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown(study_dir: Path, rows: list[dict], keys: list[str], short: dict[str, str],
             lrs: list[dict], fits: list[dict], plots: dict[str, dict]) -> str:  # fmt: skip
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    matched = any(r["baseline_params"] is not None for r in rows)
    lines = [
        f"# Study {study_dir.name}",
        "",
        f"`{study_dir}`: {len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        "",
    ]
    head = ["run", *(short[k] for k in keys), "status", "params"]
    if matched:
        head += ["baseline params", "ffn_hidden"]
    head += ["steps", "tokens", "final val loss", "best val loss", "final ppl", "best ppl",
             "diverged", "bad steps", "rollbacks", "tokens/s", "attempts"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"],
            *(r["overrides"].get(k, "-") for k in keys),
            r["status"],
            f"{r['params']:,}",
        ]
        if matched:
            base = r["baseline_params"]
            cells += [
                _fmt(base, ",") + (f" ({100 * (r['params'] / base - 1):+.2f}%)" if base else ""),
                _fmt(r["ffn_hidden"])
                + (
                    f" (from {r['baseline_ffn_hidden']})"
                    if r["baseline_ffn_hidden"] not in (None, r["ffn_hidden"])
                    else ""
                ),
            ]
        cells += [
            f"{r['steps']}/{r['max_steps']}",
            f"{r['tokens']:,}",
            _fmt(r["final_val_loss"], ".4f")
            + (
                f" (step {r['final_val_step']})"
                if r["final_val_step"] not in (None, r["max_steps"])
                else ""
            ),
            _fmt(r["best_val_loss"], ".4f"),
            _fmt(r["final_val_perplexity"], ".2f"),
            _fmt(r["best_val_perplexity"], ".2f"),
            f"yes (step {r['diverged_at_step']})" if r["diverged"] else "no",
            str(r["bad_steps"]),
            str(r["rollbacks"]),
            _fmt(r["tokens_per_sec"], ",.0f"),
            str(r["attempts"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if lrs:
        lines += [
            "",
            "## Learning rate per variant",
            "",
            "| variant | largest lr that trained | smallest lr that diverged | best lr (final val loss) |",
            "|---|---|---|---|",
        ]
        for v in lrs:
            best = (
                f"{v['best_lr']:g} ({v['best_final_val_loss']:.4f})"
                if v["best_lr"] is not None
                else "-"
            )
            lines.append(
                f"| {v['label']} | {_fmt(v['largest_lr_trained'], 'g')} | "
                f"{_fmt(v['smallest_lr_diverged'], 'g')} | {best} |"
            )
    if fits:
        lines += scaling_markdown(fits)
    lines += ["", "## Plots", ""]
    for name, info in plots.items():
        lines.append(f"![{name}]({info['file']})")
    return "\n".join(lines) + "\n"


def strict_json(value: Any) -> Any:
    """NaN / Inf (a diverged run's losses) as null: report.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(study_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write report.md, report.json and the PNGs; returns what report.json holds."""
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    if study is None:
        raise FileNotFoundError(
            f"{study_dir / 'study.json'} is missing: is {study_dir} a study of `orchestrator sweep`?"
        )
    reconcile(study_dir, study)  # statuses from the run dirs (study.json itself is left as it is)
    out = Path(out) if out is not None else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = study_rows(study)
    keys = grid_keys(study)
    short = short_keys(keys)
    lrs = lr_table(rows, short)
    plots = {"val_loss": plot_val_curves(rows, out / "val_loss.png")}
    if any(LR_KEY in r["overrides"] for r in rows):
        plots["loss_vs_lr"] = plot_loss_vs_lr(rows, short, out / "loss_vs_lr.png")
    fits = scaling_fits(rows, short, out) if LADDER_KEY in keys else []
    result = {
        "study_dir": str(study_dir.absolute()),
        "grid_keys": keys,
        "runs": rows,
        "learning_rates": lrs,
        "scaling": fits,
        "plots": plots,
    }
    (out / "report.md").write_text(markdown(study_dir, rows, keys, short, lrs, fits, plots))
    (out / "report.json").write_text(json.dumps(strict_json(result), indent=2) + "\n")
    return result
