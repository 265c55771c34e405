"""`orchestrator report`: a sweep's results as a table, JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a sweep's results: Markdown table, JSON, loss curves, loss vs learning rate, ladder fit",
    )
    p.add_argument("study_dir", help="a study directory of `orchestrator sweep`")
    p.add_argument("--out", default=None, help="directory to write (default STUDY_DIR/report)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    # imported on use: matplotlib (and scipy for a ladder's fit)
    from orchestrator.tools.report import write_report

    out = Path(args.out) if args.out else Path(args.study_dir) / "report"
    result = write_report(args.study_dir, out)
    print((out / "report.md").read_text(), end="")
    print(
        f"Report: {out / 'report.md'}, {out / 'report.json'}; plots: "
        + ", ".join(str(out / p["file"]) for p in result["plots"].values())
        + "".join(
            f", {out / f}"
            for f in dict.fromkeys(s["file"] for s in result["scaling"] if "file" in s)
        )
    )
    return 0
