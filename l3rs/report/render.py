"""The report as text: ``report.csv`` (long format) and ``report.md`` (tables shaped like the paper's Tables 5–10), and
what ``l3rs evaluate`` prints. Everything here is rendered from the report dict (:func:`l3rs.report.build_report`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from l3rs.meta.provenance import SHARED_NOTE, format_classes
from l3rs.meta.stats import BEST_ADAM
from l3rs.report.build import FILES

__all__ = ["CSV_FIELDS", "csv_text", "render_markdown", "summary_text", "shared_label"]

CSV_FIELDS = (
    "setting", "optimizer", "K", "mean_acc", "std_acc", "mean_loss", "std_loss", "n_tasks",
    "se_acc", "se_loss",
    "eval_dataset", "eval_classes", "eval_split", "theta0", "theta0_dataset", "theta0_classes",
    "meta_train_dataset", "meta_train_classes", "eval_vs_theta0", "eval_vs_meta_train",
)  # fmt: skip


def _csv_classes(classes: Sequence[int] | None) -> str:
    return "" if classes is None else format_classes(classes, dash="-", limit=1 << 30) if classes else ""


def _class_columns(setting: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """The CSV's class columns of one row: the setting's evaluation classes and θ0's pretraining, and the row's own
    meta-training (empty for Adam, ψ₀ and best Adam, which were not meta-trained)."""
    c = setting["classes"]
    ev, theta0 = c["eval"], c["theta0"]
    mt = next((m for m in c["meta_train"] if m["optimizer"] == optimizer), None)
    return {
        "eval_dataset": ev["dataset"],
        "eval_classes": _csv_classes(ev["classes"]),
        "eval_split": ev["eval_split"],
        "theta0": theta0["checkpoint"],
        "theta0_dataset": theta0["dataset"] or "",
        "theta0_classes": _csv_classes(theta0["classes"]),
        "meta_train_dataset": (mt["dataset"] or "") if mt else "",
        "meta_train_classes": _csv_classes(mt["classes"]) if mt else "",
        "eval_vs_theta0": c["relation"]["theta0"],
        "eval_vs_meta_train": c["relation"]["meta_train"].get(optimizer, "") if mt else "",
    }


def csv_text(report: dict[str, Any]) -> str:
    """The long-format CSV (:data:`CSV_FIELDS`), one row per (setting, optimizer, K): mean, population std and
    standard error of accuracy (a fraction) and loss over ``n_tasks`` tasks, and which classes the row's tasks,
    θ0 and meta-training used. Floats with full precision; None (non-finite, or a standard error of one task) as an
    empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for setting in report["settings"].values():
        for row in setting["rows"]:
            full = {**row, **_class_columns(setting, row["optimizer"])}
            writer.writerow({k: ("" if full.get(k) is None else repr(full[k]) if isinstance(full[k], float)
                                 else full[k]) for k in CSV_FIELDS})  # fmt: skip
    return buf.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * mean:.2f}"


def _num(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.3f} ± {se:.3f}" if se is not None else f"{mean:.3f}"


def _k_header(ks: Sequence[int], k_max: int) -> list[str]:
    return [f"K={k}" + ("†" if k > k_max else "") for k in ks]


def shared_label(setting: dict[str, Any]) -> str | None:
    """``"shared classes: these tasks are not new classes"`` when a meta-trained row's meta-training used every
    evaluation class of the setting, ``"partly shared classes"`` when some; None when the classes are new."""
    relations = set(setting["classes"]["relation"]["meta_train"].values())
    if relations & {"shared", "subset"}:
        return SHARED_NOTE
    if "overlap" in relations:
        return "partly shared classes: some of these tasks' classes were meta-trained on"
    return None


def _spread_note(n_tasks: int) -> str:
    if n_tasks < 2:
        return "mean of 1 task (no standard error)"
    return f"mean ± standard error over the {n_tasks} tasks"


def _title(name: str, s: dict[str, Any]) -> str:
    label = shared_label(s)
    return f"## {name}. {s['title']}" + (f" ({label})" if label else "")


def _classes_lines(s: dict[str, Any]) -> list[str]:
    return ["Classes:", "", *(f"- {line}" for line in s["classes"]["statement"]), ""]


def _acc_table(s: dict[str, Any], report: dict[str, Any], names: Sequence[str]) -> str:
    ks = s["k_grid"]
    k_max = report["meta"]["meta_train_k_range"][1]
    cells = _cells(s)
    best_col = {}
    for k in ks:
        vals = [(c[k]["mean_acc"], n) for n, c in cells.items() if c[k]["mean_acc"] is not None and n != BEST_ADAM]
        best_col[k] = max(vals)[0] if vals else None

    def acc_row(n: str) -> list[str]:
        out = [n]
        for k in ks:
            r = cells[n][k]
            text = _pct(r["mean_acc"], r.get("se_acc"))
            out.append(f"**{text}**" if r["mean_acc"] is not None and r["mean_acc"] == best_col[k] else text)
        return out

    return _md_table(["Optimizer", *_k_header(ks, k_max)], [acc_row(n) for n in names])


def _cells(s: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for row in s["rows"]:
        cells.setdefault(row["optimizer"], {})[row["K"]] = row
    return cells


def _setting_tables(name: str, s: dict[str, Any], report: dict[str, Any]) -> list[str]:
    ks = s["k_grid"]
    k_max = report["meta"]["meta_train_k_range"][1]
    groups = {o["name"]: o for o in report["optimizers"]}
    cells = _cells(s)
    full = [n for n in s["optimizers"] if n == BEST_ADAM or groups[n]["train_scope"] == "all"]
    head = [n for n in s["optimizers"] if n != BEST_ADAM and groups[n]["train_scope"] == "head"]
    n_tasks = s["n_tasks"]
    lines = [
        _title(name, s),
        "",
        f"{s['description']}. {n_tasks} tasks per cell: every optimizer ran the same {n_tasks} tasks at every K.",
        "",
        *_classes_lines(s),
        f"Eval accuracy in %, {_spread_note(n_tasks)} (bold: best mean per K; † = beyond the meta-training range "
        f"K ≤ {k_max}; the std over tasks is in report.json and report.csv).",
        "",
        _acc_table(s, report, full),
        "",
    ]
    if head:
        lines += [
            f"Head-only fine-tuning (setting {name}, classifier head trained, the rest frozen; cf. Table 6), "
            f"{_spread_note(n_tasks)}:",
            "",
            _acc_table(s, report, head),
            "",
        ]
    best = s["best_adam"]["variant"]
    lines += ["Best Adam per K: " + "; ".join(f"K={k}: {v}" for k, v in zip(ks, best, strict=True)) + ".", ""]
    wins = s["wins_vs_best_adam"]
    lines += [
        f"Per task, each learned optimizer vs best Adam (wins / ties / losses of {n_tasks} tasks; best Adam's "
        "variant fixed per K):",
        "",
        _md_table(
            ["Optimizer", *_k_header(ks, k_max)],
            [[n, *(f"{w['wins']} / {w['ties']} / {w['losses']}" for w in wins[n])] for n in wins],
        ),
        "",
        f"Eval loss ({_spread_note(n_tasks)}):",
        "",
        _md_table(
            ["Optimizer", *_k_header(ks, k_max)],
            [[n, *(_num(cells[n][k]["mean_loss"], cells[n][k].get("se_loss")) for k in ks)] for n in s["optimizers"]],
        ),
        "",
    ]
    return lines


def _speedup_lines(report: dict[str, Any], setting: str | None) -> list[str]:
    if setting is None:
        return []
    rows = report["speedup"]["by_setting"].get(setting, {})
    label = shared_label(report["settings"][setting]) if setting in report["settings"] else None
    lines = [
        f"## F. Speedup of the learned optimizers over best Adam (setting {setting}"
        + (f"; {label}" if label else "") + ")",
        "",
        "For each K of the grid: the mean accuracy best Adam reaches at K, the steps the learned optimizer needs to "
        "reach the same mean accuracy (its mean-accuracy curve interpolated linearly in log K) and the speedup "
        'K_Adam / K_learned. "≥": it is already there at the first K of the grid; "never": not within the grid.',
        "",
    ]  # fmt: skip
    for name, table in rows.items():
        body = []
        for r in table:
            if r["bound"] == "never":
                k_l3rs, sp = "never", "—"
            else:
                k_l3rs = ("≤ " if r["bound"] == ">=" else "") + f"{r['k_l3rs']:.1f}"
                sp = ("≥ " if r["bound"] == ">=" else "") + f"{r['speedup']:.2f}×"
            body.append([str(r["k_baseline"]), f"{100 * r['level']:.2f}", k_l3rs, sp])
        lines += [f"{name}:", "", _md_table(["best Adam K", "accuracy level (%)", f"{name} K", "speedup"], body), ""]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: protocol, one section per setting (its classes, then tables like the paper's Tables 5–10),
    F, figures, meta-training and cost."""
    meta = report["meta"]
    per_setting = {name: s["n_tasks"] for name, s in report["settings"].items()}
    lines = ["# L3RS meta-evaluation", ""]
    lines += [
        f"Created {report['created']}. Settings evaluated: {', '.join(report['settings']) or 'none'}; "
        f"{meta['tasks_per_setting']} tasks per setting (tasks per cell: "
        + (", ".join(f"{k}: {v}" for k, v in per_setting.items()) or "none")
        + f"); K ∈ {meta['k_grid']}; meta-training K range {meta['meta_train_k_range']}.",
        "",
        "Protocol (paper §5): " + meta["tasks"] + ". Accuracy and loss are measured on the task's evaluation batch "
        "after K steps (a fresh N-way head per task). Tables show the mean ± its standard error (" + meta["se"]
        + "); report.json and report.csv also hold the " + meta["std"] + ". Best Adam's loss row is the loss of "
        "the variant chosen by accuracy.",
        "",
        meta["best_adam"],
        "",
        *([meta["psi0"], ""] if meta.get("psi0") else []),
        "Artifacts (named relative to the run storage):",
        "",
    ]  # fmt: skip
    if meta["artifacts"]:
        lines.append(
            _md_table(
                ["label", "artifact", "sha256", "run", "generations", "meta-train K"],
                [
                    [
                        a["label"],
                        f"`{a['uri']}`",
                        f"`{(a['sha256'] or '')[:16]}…`",
                        str(a["run_name"]),
                        str(a["generations"]),
                        str(a["k_range"]),
                    ]
                    for a in meta["artifacts"]
                ],
            )  # fmt: skip
        )
    else:
        lines.append("none (only ψ₀, the untrained learned optimizer, against the baselines)")
    lines += ["", f"![Fig. 3: accuracy vs K per setting, and speedup]({FILES['fig3']})", ""]
    for name, s in report["settings"].items():
        lines += _setting_tables(name, s, report)
    lines += _speedup_lines(report, report["speedup"]["setting"])
    if report["skipped"]:
        lines += ["## Skipped settings", ""] + [f"- {m}" for m in report["skipped"].values()] + [""]
    lines += [
        "## Figures",
        "",
        f"![Fig. 3 (paper layout): every Adam learning rate per baseline family]({FILES['fig3_baselines']})",
        "",
    ]
    ls = report.get("layer_stats")
    if ls:
        lines += [
            f"![Fig. 4: μ and λ per layer over a {ls['num_steps']}-step run]({FILES['fig4']})",
            "",
            f"Fig. 4: {ls['optimizer']} on one evaluation task of setting {ls['setting']} (seed {ls['task_seed']}), "
            f"{ls['num_steps']} steps, eval accuracy after the run {100 * ls['eval_accuracy']:.2f}%.",
            "",
        ]
    mt = report.get("meta_training")
    lines += ["## Meta-training", ""]
    if mt:
        lines.append(f"History: `{mt['history']}`.")
        if mt.get("last"):
            last, first = mt["last"], mt["first"]
            lines.append(
                f"{mt['generations']} generations; population mean fitness {first['fitness_mean']} → "
                f"{last['fitness_mean']}, mean eval accuracy {first['accuracy_mean']} → {last['accuracy_mean']}."
            )
            lines += ["", f"![Meta-training curves]({FILES['meta_training']})"]
        if mt.get("error"):
            lines.append(f"(could not read it: {mt['error']})")
    else:
        lines.append("No history.jsonl given (meta-training curves: `<run>/plots/meta_training.png`).")
    secs = meta.get("seconds", {})
    lines += [
        "",
        "## Cost",
        "",
        f"{meta.get('workers')} process(es); {meta.get('steps_per_task')} training steps per task and setting; "
        f"evaluation {secs.get('evaluation')} s wall, total {secs.get('total')} s; process-seconds per setting "
        f"{secs.get('per_setting_process_seconds')}; inner-loop traces per setting (summed over processes; "
        f"compilation-cache hits included) {meta.get('compiles')}.",
        "",
    ]
    return "\n".join(lines)


def summary_text(report: dict[str, Any]) -> str:
    """What ``l3rs evaluate`` prints: the in-domain (or first) setting's classes and accuracy table, the speedup,
    and the skipped settings."""
    setting = report["speedup"]["setting"]
    if setting is None:
        return "no setting evaluated."
    s = report["settings"][setting]
    full = [n for n in s["optimizers"] if n == BEST_ADAM or next(
        o for o in report["optimizers"] if o["name"] == n)["train_scope"] == "all"]  # fmt: skip
    lines = [
        _title(setting, s),
        "",
        *_classes_lines(s),
        f"Eval accuracy in %, {_spread_note(s['n_tasks'])}:",
        "",
        _acc_table(s, report, full),
        "",
    ]
    lines += _speedup_lines(report, setting)
    lines += [f"Skipped: {m}" for m in report["skipped"].values()]
    return "\n".join(lines)
