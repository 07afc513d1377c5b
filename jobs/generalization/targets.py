"""Issue 11's targets, checked against an evaluation's ``report.json``: one line per target, with the numbers.

    python jobs/generalization/targets.py REPORT.json [MORE.json ...] [--rows-from OTHER.json ...] [--optimizer L3RS]
        [--psi0 "L3RS ψ₀"] [--json]

Reads only the report (its per-task numbers, best-Adam choice per K, speedups, and the meta-training K range). With
several reports of the same tasks, a setting is read from the last report that has it (:func:`merge`): e.g. all
settings from one evaluation, B and D from a second that added FC-LOpt and VeLO rows from the same journal. A
target whose inputs the report lacks (a setting not evaluated, no FC-LOpt row, K = 5 × K_max not on the grid) is
"not measured", never passed. ``--rows-from`` adds the rows of an evaluation that ran only a few rows on the same tasks
(:func:`add_rows`: e.g. a new ψ with ψ₀ and one Adam learning rate beside it, against the full Adam grid of the first
report), after checking that the rows both reports ran agree to the last digit. The exit code is 0 whatever the
outcome: this states results, it does not gate (2 for reports that cannot be of the same tasks).

Targets (issue 11, "Targets"):

- A: the optimizer beats best Adam (mean accuracy) at every K ≤ K_max and wins ≥ 75 % of the tasks there; speedup
  ≥ 2× at every K ≥ 25; at K = 10, ≥ best Adam + 10 points and ≥ ψ₀ + 5 points; at K = 5 × K_max, ≥ best Adam − 0.5.
- B–E: no non-finite loss and no task below best Adam − 2 points (per task, best Adam's variant of that K) at any
  K; ahead of best Adam (mean) at every K ≤ K_max; in B and D, ahead of FC-LOpt and VeLO (ft) (mean) at every K.
  Beside the per-task target, as a reference and not a target: how many tasks Adam's second-best variant has below
  the best one, i.e. the per-task spread that target meets on a 100-image eval batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import numpy as np

PT = 100.0  # accuracies are fractions in report.json; targets are in points


def _acc(setting: dict[str, Any], name: str) -> np.ndarray | None:
    got = setting["per_task"]["accuracy"].get(name)
    return None if got is None else np.asarray(got, np.float64) * PT  # [tasks, K]


def _loss(setting: dict[str, Any], name: str) -> np.ndarray | None:
    got = setting["per_task"]["loss"].get(name)
    return None if got is None else np.asarray(got, np.float64)


def _best_adam(setting: dict[str, Any]) -> np.ndarray:
    return np.asarray(setting["per_task"]["best Adam"]["accuracy"], np.float64) * PT


def _row(name: str, ok: bool | None | str, value: str) -> dict[str, Any]:
    status = ok if isinstance(ok, str) else {True: "met", False: "missed", None: "not measured"}[ok]
    return {"target": name, "status": status, "value": value}


def _runner_up_adam(setting: dict[str, Any]) -> np.ndarray | None:
    """Per K, the per-task accuracy of the Adam variant with the second-highest mean: [tasks, K] (None with < 2)."""
    per_task = setting["per_task"]["accuracy"]
    adam = {n: np.asarray(a, np.float64) * PT for n, a in per_task.items() if n.startswith("Adam")}
    if len(adam) < 2:
        return None
    stacked = np.stack(list(adam.values()))  # [variants, tasks, K]
    second = np.argsort(-stacked.mean(1), axis=0, kind="stable")[1]  # [K]
    return stacked[second, :, np.arange(stacked.shape[2])].T


def _ks(ks: list[int], mask: list[bool]) -> str:
    return ", ".join(str(k) for k, m in zip(ks, mask, strict=True) if m) or "none"


def check(report: dict[str, Any], opt: str = "L3RS", psi0: str | None = None) -> list[dict[str, Any]]:
    """The targets for the optimizer row ``opt``, against the ψ₀ row ``psi0`` (default ``f"{opt} ψ₀"`` if the report
    has it, else its first ψ₀ row: with several artifacts of one family, ψ₀ is the family's, "L3RS ψ₀")."""
    if psi0 is None:
        names = [o["name"] for o in report["optimizers"]]
        psi0 = f"{opt} ψ₀" if f"{opt} ψ₀" in names else next((n for n in names if n.endswith("ψ₀")), f"{opt} ψ₀")
    k_max = int(report["meta"]["meta_train_k_range"][1])
    out = []
    settings = report["settings"]
    a = settings.get("A")
    if a is None:
        out.append(_row("A: every target", None, "setting A not evaluated"))
    elif _acc(a, opt) is None:
        out.append(_row("A: every target", None, f"no {opt} row in setting A"))
    else:
        ks = [int(k) for k in a["k_grid"]]
        mine, best = _acc(a, opt), _best_adam(a)
        inside = [k <= k_max for k in ks]
        means, best_means = mine.mean(0), best.mean(0)
        ahead = [bool(m > b) for m, b in zip(means, best_means, strict=True)]
        wins = (mine > best + 1e-9).mean(0)
        ok = all(x for x, i in zip(ahead, inside, strict=True) if i)
        out.append(_row("A: mean above best Adam at every K ≤ K_max", ok,
                        "; ".join(f"K={k}: {m:.1f} vs {b:.1f}" for k, m, b, i
                                  in zip(ks, means, best_means, inside, strict=True) if i)))  # fmt: skip
        ok = all(w >= 0.75 for w, i in zip(wins, inside, strict=True) if i)
        out.append(
            _row(
                "A: wins ≥ 75 % of tasks at every K ≤ K_max",
                ok,
                "; ".join(f"K={k}: {100 * w:.0f} %" for k, w, i in zip(ks, wins, inside, strict=True) if i),
            )
        )
        speed = {int(r["k_baseline"]): r for r in report["speedup"]["by_setting"].get("A", {}).get(opt, [])}
        values = [(k, speed[k]) for k in ks if k >= 25 and k in speed]
        ok = bool(values) and all(r["speedup"] >= 2.0 for _, r in values)
        out.append(_row("A: speedup ≥ 2× at every K ≥ 25", ok if values else None,
                        "; ".join(f"K={k}: {r['bound']}{r['speedup']:.2f}×" for k, r in values)))  # fmt: skip
        if 10 in ks:
            j = ks.index(10)
            gain = means[j] - best_means[j]
            out.append(_row("A: K=10 ≥ best Adam + 10 points", bool(gain >= 10), f"{gain:+.1f} points"))
            base = _acc(a, psi0)
            if base is not None:
                gain0 = means[j] - base.mean(0)[j]
                out.append(_row("A: K=10 ≥ ψ₀ + 5 points (meta-learning's own gain)", bool(gain0 >= 5),
                                f"{gain0:+.1f} points"))  # fmt: skip
        far = 5 * k_max
        if far in ks:
            j = ks.index(far)
            gap = means[j] - best_means[j]
            out.append(_row(f"A: K={far} (5 × K_max) ≥ best Adam − 0.5", bool(gap >= -0.5), f"{gap:+.2f} points"))
        else:
            out.append(_row("A: K = 5 × K_max ≥ best Adam − 0.5", None, f"K={far} not on the grid"))
    for name in "BCDE":
        s = settings.get(name)
        if s is None:
            out.append(_row(f"{name}: every target", None, "not evaluated"))
            continue
        if _acc(s, opt) is None:
            out.append(_row(f"{name}: every target", None, f"no {opt} row in setting {name}"))
            continue
        ks = [int(k) for k in s["k_grid"]]
        mine, best, loss = _acc(s, opt), _best_adam(s), _loss(s, opt)
        nonfinite = int((~np.isfinite(loss)).sum())
        below = mine < best - 2.0
        worst = (mine - best).min(0)
        out.append(_row(f"{name}: no non-finite loss", nonfinite == 0, f"{nonfinite} of {loss.size} runs"))
        out.append(_row(f"{name}: no task below best Adam − 2 points, any K", not below.any(),
                        "; ".join(f"K={k}: {int(n)}/{len(mine)} (worst {w:+.0f})" for k, n, w
                                  in zip(ks, below.sum(0), worst, strict=True))))  # fmt: skip
        runner_up = _runner_up_adam(s)
        if runner_up is not None:  # the per-task target's noise floor: Adam's own next-best variant against the best
            out.append(_row(f"{name}: (reference) the second-best Adam variant, tasks below best Adam − 2", "reference",
                            "; ".join(f"K={k}: {int(n)}/{len(mine)} (its mean {g:+.1f})" for k, n, g
                                      in zip(ks, (runner_up < best - 2.0).sum(0), (runner_up - best).mean(0),
                                             strict=True))))  # fmt: skip
        means, best_means = mine.mean(0), best.mean(0)
        inside = [k <= k_max for k in ks]
        behind = [bool(m <= b) and i for m, b, i in zip(means, best_means, inside, strict=True)]
        out.append(
            _row(
                f"{name}: mean above best Adam at every K ≤ K_max",
                not any(behind),
                "; ".join(f"K={k}: {m:.1f} vs {b:.1f}" for k, m, b in zip(ks, means, best_means, strict=True)),
            )
        )
        if name in "BD":
            for other in ("FC-LOpt", "VeLO (ft)"):
                theirs = _acc(s, other)
                if theirs is None:
                    out.append(_row(f"{name}: above {other} at every K", None, f"no {other} row"))
                    continue
                them = theirs.mean(0)
                ok = all(m > t for m, t in zip(means, them, strict=True))
                out.append(
                    _row(
                        f"{name}: above {other} at every K",
                        ok,
                        "; ".join(f"K={k}: {m:.1f} vs {t:.1f}" for k, m, t in zip(ks, means, them, strict=True)),
                    )
                )
    return out


def _require_same_meta(first: dict[str, Any], other: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``keys`` whose ``meta`` value differs between the two reports."""
    for key in keys:
        if other["meta"].get(key) != first["meta"].get(key):
            raise ValueError(f"reports differ in meta.{key}: {first['meta'].get(key)} vs {other['meta'].get(key)}")


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several evaluations of the same tasks: the first one's ``meta``; each setting (its rows,
    per-task numbers and speedups) from the last report that has it. Refuses reports whose K grids, task counts or
    meta-training K ranges differ, which cannot be of the same tasks."""
    first = reports[0]
    for other in reports[1:]:
        _require_same_meta(first, other, ("k_grid", "tasks_per_setting", "meta_train_k_range"))
    merged = {**first, "settings": {}, "speedup": {**first["speedup"], "by_setting": {}}}
    optimizers: dict[str, dict[str, Any]] = {}
    for r in reports:
        merged["settings"].update(r["settings"])
        merged["speedup"]["by_setting"].update({s: r["speedup"]["by_setting"].get(s, {}) for s in r["settings"]})
        for o in r["optimizers"]:
            optimizers.setdefault(o["name"], o)
    merged["optimizers"] = list(optimizers.values())
    return merged


def _same_numbers(a: Any, b: Any) -> bool:
    """Exact equality of two per-task tables as report.json writes them (lists of floats, None for non-finite)."""
    return json.dumps(a) == json.dumps(b)


def add_rows(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the rows of ``other`` that it lacks, setting by setting (the settings both have), and their
    speedups over ``base``'s best Adam (:func:`l3rs.meta.stats.speedup_table`, as the report computes them).

    ``other`` must be an evaluation of the same tasks: the same K grid, meta-training K range and task seeds per
    setting, and at least one row in common (ψ₀, an Adam variant) whose per-task accuracies and losses equal
    ``base``'s exactly. Those rows depend on θ0, the data and the task seeds, so equal numbers show the same tasks
    from the same θ0 (a re-pretrained θ0 that differs in one bit would not give them). Raises ValueError otherwise.
    Only what :func:`check` reads is added (per-task numbers, speedups, the optimizer list): a setting's summary
    tables (``rows``, ``wins_vs_best_adam``) stay ``base``'s.
    """
    from l3rs.meta.stats import speedup_table

    _require_same_meta(base, other, ("k_grid", "meta_train_k_range"))  # task counts: the seeds below say more
    merged = copy.deepcopy(base)
    optimizers = {o["name"]: o for o in merged["optimizers"]}
    their_specs = {o["name"]: o for o in other["optimizers"]}
    for name, theirs in other["settings"].items():
        mine = merged["settings"].get(name)
        if mine is None:
            continue
        if theirs["per_task"]["task_seed"] != mine["per_task"]["task_seed"]:
            raise ValueError(f"setting {name}: the reports' task seeds differ; they are not of the same tasks")
        shared = [r for r in theirs["per_task"]["accuracy"] if r in mine["per_task"]["accuracy"]]
        if not shared:
            raise ValueError(f"setting {name}: no row in common to show that the tasks and θ0 are the same")
        for row in shared:
            for field in ("accuracy", "loss"):
                if not _same_numbers(theirs["per_task"][field][row], mine["per_task"][field][row]):
                    raise ValueError(f"setting {name}: row {row!r} differs between the reports ({field}): not the "
                                     "same tasks, data or θ0")  # fmt: skip
        new = [r for r in theirs["per_task"]["accuracy"] if r not in shared]
        ks = [int(k) for k in mine["k_grid"]]
        best = _best_adam(mine).mean(0) / PT
        by_setting = merged["speedup"]["by_setting"].setdefault(name, {})
        for row in new:
            for field in ("accuracy", "loss"):
                mine["per_task"][field][row] = theirs["per_task"][field][row]
            by_setting[row] = speedup_table(ks, best.tolist(), (_acc(mine, row).mean(0) / PT).tolist())
            optimizers.setdefault(row, their_specs[row])
    merged["optimizers"] = list(optimizers.values())
    return merged


def markdown(rows: list[dict[str, Any]], report: dict[str, Any], opt: str) -> str:
    n = report["meta"].get("tasks_per_setting")
    lines = [f"Issue 11's targets for {opt} ({n} tasks per setting, K ∈ {report['meta']['k_grid']}, "
             f"meta-training K ≤ {report['meta']['meta_train_k_range'][1]}):", "",
             "| target | status | measured |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['target']} | {r['status']} | {r['value']} |" for r in rows]
    met = sum(r["status"] == "met" for r in rows)
    targets = sum(r["status"] != "reference" for r in rows)
    lines += [
        "",
        f'{met} of {targets} met. A "reference" row is not a target: Adam\'s second-best variant (by mean, '
        "per K) counted task by task against the best one, the spread a per-task comparison meets.",
    ]
    return "\n".join(lines)


def _load(path: str) -> dict[str, Any]:
    """A report.json, or a ValueError that names the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno}); give an evaluation's report.json") from e
    if not isinstance(report, dict) or not {"meta", "optimizers", "settings"} <= report.keys():
        raise ValueError(f"{path}: not an evaluation's report.json (needs meta, optimizers and settings)")
    return report


def read_reports(paths: list[str], rows_from: list[str] = ()) -> dict[str, Any]:
    """The reports at ``paths`` merged (:func:`merge`), then the rows of each of ``rows_from`` added
    (:func:`add_rows`); ValueError naming the file or the mismatch."""
    report = merge([_load(p) for p in paths])
    for path in rows_from:
        report = add_rows(report, _load(path))
    return report


def require_rows(report: dict[str, Any], rows: list[tuple[str, str | None]]) -> None:
    """ValueError naming the flag for each ``(flag, row name)`` the report has no row of (a None name is skipped)."""
    names = [o["name"] for o in report["optimizers"]]
    for flag, name in rows:
        if name is not None and name not in names:
            raise ValueError(f"{flag}: no row named {name!r}; the reports have {', '.join(map(repr, names))}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="+", help="report.json files of the same tasks (later ones win per setting)")
    ap.add_argument(
        "--rows-from",
        action="append",
        default=[],
        metavar="REPORT",
        help="add the rows of another evaluation of the same tasks (checked: shared rows must be equal)",
    )
    ap.add_argument("--optimizer", default="L3RS")
    ap.add_argument("--psi0", default=None, help='the ψ₀ row (default: "<optimizer> ψ₀", else the first ψ₀ row)')
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        report = read_reports(args.report, args.rows_from)
        require_rows(report, [("--optimizer", args.optimizer), ("--psi0", args.psi0)])
    except ValueError as e:
        print(f"targets: {e}", file=sys.stderr)
        return 2
    rows = check(report, args.optimizer, args.psi0)
    print(json.dumps(rows, indent=1, ensure_ascii=False) if args.json else markdown(rows, report, args.optimizer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
