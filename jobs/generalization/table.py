"""Several ψ rows of issue 11's measurement side by side, as the tables in docs/ show them: per setting and K, mean eval
accuracy ± standard error over the tasks, how many task × K cells fall below best Adam − 2 points, how many runs were
non-finite; then how many of issue 11's targets each row meets (``targets.check``).

    python jobs/generalization/table.py REPORT.json [MORE.json ...] [--rows-from OTHER.json ...]
        --row "L3RS (run)=label" [--row ...] [--psi0 "L3RS ψ₀"]

Reports are read as ``targets.py`` reads them (``merge``, then ``add_rows``, with the same checks), so rows measured in
separate evaluations of the same tasks stand against one full Adam grid. Bold: the best mean of a setting's column.
Exit code 2 for reports that cannot be of the same tasks, or a row they lack.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from l3rs.meta.stats import standard_error

_spec = importlib.util.spec_from_file_location("targets", Path(__file__).with_name("targets.py"))
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def _cells(setting: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(means [K], standard errors [K], cells below best Adam − 2, non-finite runs) of one row in one setting."""
    acc = targets._acc(setting, name)
    loss = targets._loss(setting, name)
    below = int((acc < targets._best_adam(setting) - 2.0).sum())
    return acc.mean(0), standard_error(acc), below, int((~np.isfinite(loss)).sum())


def _means(mean: np.ndarray, se: np.ndarray, top: np.ndarray) -> str:
    """One row's "mean ± SE" cells, bold where the mean is the column's best."""
    return " | ".join(
        f"**{m:.1f}** ± {e:.1f}" if m == t else f"{m:.1f} ± {e:.1f}" for m, e, t in zip(mean, se, top, strict=True)
    )


def table(report: dict[str, Any], rows: list[tuple[str, str]], psi0: str) -> str:
    """The markdown table of ``rows`` ((row name, label) pairs) plus ψ₀ and best Adam, every setting of ``report``."""
    some = next(iter(report["settings"].values()))
    ks = [int(k) for k in some["k_grid"]]
    head = (
        "| setting | ψ | "
        + " | ".join(f"K={k}" for k in ks)
        + " | tasks below best Adam − 2 (all K) | non-finite runs |"
    )
    out = [head, "|" + "---|" * (len(ks) + 4)]
    counts = {}
    for code, setting in report["settings"].items():
        shown = [(name, label) for name, label in [*rows, (psi0, "ψ₀")] if targets._acc(setting, name) is not None]
        stats = [_cells(setting, name) for name, _ in shown]
        best = targets._best_adam(setting)
        counts[code] = best.shape[0]
        top = np.stack([s[0] for s in stats] + [best.mean(0)]).max(0)
        for i, ((_, label), (mean, se, below, bad)) in enumerate(zip(shown, stats, strict=True)):
            out.append(f"| {code if i == 0 else ''} | {label} | {_means(mean, se, top)} | {below} | {bad} |")
        out.append(f"| {'' if shown else code} | best Adam | {_means(best.mean(0), standard_error(best), top)} |  |  |")
    same = len(set(counts.values())) == 1
    tasks = f"{counts[code]} tasks per setting" if same else ", ".join(f"{c}: {k} tasks" for c, k in counts.items())
    out += [
        "",
        f"{tasks}. Issue 11's targets met (`targets.py`):",
        "",
        "| ψ | met | of |",
        "|---|---|---|",
    ]
    for name, label in rows:
        checked = [r for r in targets.check(report, name, psi0) if r["status"] in ("met", "missed")]
        out.append(f"| {label} | {sum(r['status'] == 'met' for r in checked)} | {len(checked)} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="+", help="report.json files of the same tasks (later ones win per setting)")
    ap.add_argument("--rows-from", action="append", default=[], metavar="REPORT", help="as targets.py")
    ap.add_argument("--row", action="append", required=True, metavar="NAME=LABEL", help="a row and its label")
    ap.add_argument("--psi0", default="L3RS ψ₀")
    args = ap.parse_args(argv)
    rows = [tuple(r.split("=", 1)) if "=" in r else (r, r) for r in args.row]
    try:
        report = targets.read_reports(args.report, args.rows_from)
        targets.require_rows(report, [("--row", name) for name, _ in rows] + [("--psi0", args.psi0)])
    except ValueError as e:
        print(f"table: {e}", file=sys.stderr)
        return 2
    print(table(report, rows, args.psi0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
