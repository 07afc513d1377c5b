"""Rows compared task by task: two ψs of one evaluation, or the same rows of two evaluations of the same tasks.

    python jobs/anchor/paired.py REPORT.json --reference "L3RS (G1-anchor1)" --candidate "L3RS (run @ 50)"
        [--psi0 "L3RS ψ₀"]
    python jobs/anchor/paired.py REPORT.json --rerun-of OTHER.json --row "L3RS=L3RS (G1-anchor1)" [--row ...]

For an evaluation that cannot be read against docs/generalization's full Adam grid (``targets.py --rows-from``
refuses reports whose shared rows differ in one number, e.g. one run on another kind of machine, whose XLA:CPU
rounds differently), the two ψs are still comparable with each other: the same tasks, θ0s and machine. Per setting
and K: both means, the candidate's wins / ties / losses against the reference (task accuracies compared at whole
eval images, 1 point on a 100-image eval batch), and per setting, the task × K cells where each ψ ends more than 2
points below ψ₀ of the same evaluation (ψ₀ = Adam(init_lr), the safe reference out of domain).

``--rerun-of``: the same optimizers on the same tasks in two evaluations (``--row HERE=THERE`` names a row of REPORT
and its row in OTHER), e.g. on two kinds of machine: per setting, the task × K cells where the two runs of a row end
more than 2 points apart, and the largest gap. Exit code 2 for a report without one of the rows, or two reports of
different tasks.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

_TARGETS = Path(__file__).resolve().parent.parent / "generalization" / "targets.py"
_spec = importlib.util.spec_from_file_location("targets", _TARGETS)
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def paired(report: dict[str, Any], reference: str, candidate: str, psi0: str) -> str:
    """The markdown table: one line per setting, K by K ("reference / candidate (wins-ties-losses)")."""
    some = next(iter(report["settings"].values()))
    ks = [int(k) for k in some["k_grid"]]
    out = [
        "| setting | " + " | ".join(f"K={k}" for k in ks) + " | cells below ψ₀ − 2 (all K) |",
        "|" + "---|" * (len(ks) + 2),
    ]
    for code, setting in report["settings"].items():
        ref, cand, base = (targets._acc(setting, n) for n in (reference, candidate, psi0))
        if ref is None or cand is None or base is None:
            continue  # a setting some of the rows were not run in
        diff = np.round(cand) - np.round(ref)  # whole eval images (accuracies are multiples of 100/eval batch)
        cells = [
            f"{r:.1f} / {c:.1f} ({int((d > 0).sum())}-{int((d == 0).sum())}-{int((d < 0).sum())})"
            for r, c, d in zip(ref.mean(0), cand.mean(0), diff.T, strict=True)
        ]
        below = [int((a < base - 2.0).sum()) for a in (ref, cand)]
        out.append(f"| {code} | " + " | ".join(cells) + f" | {below[0]} / {below[1]} |")
    return "\n".join(out)


def rerun(report: dict[str, Any], other: dict[str, Any], rows: list[tuple[str, str]]) -> str:
    """The markdown table: one line per row pair, per setting "cells more than 2 points apart (largest gap)"."""
    try:
        targets._require_same_meta(report, other, ("k_grid", "tasks_per_setting"))
    except ValueError as e:
        raise ValueError(f"the two reports do not hold the same tasks: {e}") from None
    codes = list(report["settings"])
    for code in codes:
        theirs = other["settings"].get(code, {}).get("per_task", {}).get("task_seed")
        if theirs != report["settings"][code]["per_task"]["task_seed"]:
            raise ValueError(f"setting {code}: the two reports do not hold the same tasks")
    out = ["| row | " + " | ".join(codes) + " | all |", "|" + "---|" * (len(codes) + 2)]
    for here, there in rows:
        cells, apart, total = [], 0, 0
        for code in codes:
            a, b = targets._acc(report["settings"][code], here), targets._acc(other["settings"][code], there)
            if a is None or b is None:
                cells.append("—")  # not run in this setting
                continue
            gap = np.abs(np.round(a) - np.round(b))
            cells.append(f"{int((gap > 2.0).sum())} ({int(gap.max())})")
            apart, total = apart + int((gap > 2.0).sum()), total + gap.size
        out.append(f"| {here} | " + " | ".join(cells) + f" | {apart} of {total} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--reference", metavar="ROW")
    ap.add_argument("--candidate", metavar="ROW")
    ap.add_argument("--psi0", default="L3RS ψ₀", metavar="ROW")
    ap.add_argument("--rerun-of", metavar="OTHER.json", help="compare rows with their run in this evaluation")
    ap.add_argument("--row", action="append", default=[], metavar="HERE=THERE", help="with --rerun-of")
    args = ap.parse_args(argv)
    pair, again = (args.reference, args.candidate), (args.rerun_of, args.row)
    if any(pair) == any(again) or not all(pair if any(pair) else again):  # exactly one mode, and all of it
        ap.error("give --reference and --candidate, or --rerun-of with --row")  # exit code 2
    try:
        report = targets._load(args.report)
        if args.rerun_of is None:
            targets.require_rows(report, [("--reference", args.reference), ("--candidate", args.candidate),
                                          ("--psi0", args.psi0)])  # fmt: skip
            print(paired(report, args.reference, args.candidate, args.psi0))
            return 0
        other = targets._load(args.rerun_of)
        rows = [tuple(r.split("=", 1)) if "=" in r else (r, r) for r in args.row]
        targets.require_rows(report, [("--row", here) for here, _ in rows])
        targets.require_rows(other, [("--row", there) for _, there in rows])
        print(rerun(report, other, rows))
    except ValueError as e:
        print(f"paired: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
