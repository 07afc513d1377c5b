"""The meta-evaluation report (paper §5, Fig. 3, Fig. 4, Appendix C Tables 5–10): ``report.md``, ``report.csv``,
``report.json`` and figures, all written atomically through :mod:`l3rs.storage`.

- ``report.csv``: long format, one row per (setting, optimizer, K): ``setting, optimizer, K, mean_acc, std_acc,
  mean_loss, std_loss, n_tasks`` (accuracy as a fraction in [0, 1]; an empty cell is a non-finite number).
- ``report.json``: the same rows per setting, plus per-task numbers, best Adam per K, per-task wins, the speedups,
  Fig. 4's μ/λ trace and meta (config, artifact sha256s, seconds, versions).
- ``report.md``: tables shaped like the paper's (rows = optimizers, columns = K, "mean ± std" in %), wins, speedups
  and the figures: ``fig3_meta_evaluation.png`` (accuracy vs K per setting + panel F), ``fig3_baselines.png``
  (every Adam learning rate, one column per baseline family, like the paper's Fig. 3), ``fig4_layer_stats.png``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.plots import save_figure

__all__ = [
    "FORMAT",
    "CSV_FIELDS",
    "build_report",
    "write_report",
    "render_markdown",
    "csv_text",
    "summary_text",
    "plot_meta_evaluation",
    "plot_baselines",
    "plot_layer_stats",
]

FORMAT = "l3rs-evaluation/1"
CSV_FIELDS = ("setting", "optimizer", "K", "mean_acc", "std_acc", "mean_loss", "std_loss", "n_tasks")
FILES = {
    "markdown": "report.md",
    "csv": "report.csv",
    "json": "report.json",
    "fig3": "fig3_meta_evaluation.png",
    "fig3_baselines": "fig3_baselines.png",
    "fig4": "fig4_layer_stats.png",
    "meta_training": "meta_training.png",
}
GROUP_LABELS = {
    "l3rs": "L3RS",
    "fc_lopt": "FC-LOpt",
    "velo": "VeLO",
    "psi0": "ψ₀ (untrained)",
    "adam_cosine": "Adam (cosine)",
    "adam_const": "Adam (const)",
    "adam_cosine_head": "Adam (cosine, head only)",
    "adam_const_head": "Adam (const, head only)",
}
BEST_ADAM_RULE = (
    "best Adam = per K, the Adam variant (schedule, full or head-only, learning rate) with the highest mean accuracy "
    "over the tasks at that K: the baseline tuned per K with hindsight (the paper's choice of best baseline)."
)


# ----------------------------------------------------------------------------------------------------------------
# the report dict
# ----------------------------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """numpy → Python; non-finite floats → None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _versions() -> dict[str, str]:
    import flax
    import jax
    import optax

    import l3rs

    return {"l3rs": l3rs.__version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def _read_history(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _history_summary(uri: str | None) -> dict[str, Any] | None:
    """A pointer to the run's meta-training history and its first and last generation."""
    if not uri:
        return None
    out: dict[str, Any] = {"history": uri}
    try:
        rows = _read_history(uri)
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["generations"] = len(rows)
    keys = ("generation", "fitness_mean", "fitness_best", "accuracy_mean")
    if rows:
        out["first"] = {k: rows[0].get(k) for k in keys}
        out["last"] = {k: rows[-1].get(k) for k in keys}
    return out


def build_report(
    cfg: Any,
    *,
    artifacts: Sequence[Any],
    optimizers: Sequence[Any],
    specs: Sequence[Any],
    results: dict[str, Any],
    skipped: dict[str, str],
    trace: dict[str, Any] | None,
    history: str | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The report: per evaluated setting the summary of :func:`l3rs.meta.evaluate.summarize_setting`, the speedups of
    every L3RS row over best Adam per setting (panel F uses setting A, or the first one evaluated), the Fig. 4 trace,
    and meta (config, artifacts with sha256, timings)."""
    from l3rs.meta.evaluate import BEST_ADAM, summarize_setting

    k_range = None
    for art in artifacts:
        if art.meta.get("k_range"):
            k_range = [int(k) for k in art.meta["k_range"]]
            break
    if k_range is None:
        k_range = [cfg.task.k_min, cfg.task.k_max]
    settings: dict[str, Any] = {}
    speedup: dict[str, Any] = {}
    l3rs_names = [o.name for o in optimizers if not o.is_adam]
    for spec in specs:
        if spec.name not in results:
            continue
        summary = summarize_setting(results[spec.name], optimizers)
        settings[spec.name] = {
            "title": spec.title,
            "description": spec.description,
            "dataset": spec.dataset,
            "checkpoint": spec.checkpoint,
            **summary,
        }
        means = _curves(summary, "mean_acc")
        speedup[spec.name] = {name: _speedup(summary["k_grid"], means[BEST_ADAM], means[name]) for name in l3rs_names}
    panel_f = "A" if "A" in settings else next(iter(settings), None)
    report = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "meta": {
            "config": cfg.to_dict(),
            "artifacts": [
                {
                    "label": a.label,
                    "uri": a.uri,
                    "sha256": a.meta.get("sha256"),
                    "run_name": a.meta.get("run_name"),
                    "model": a.meta.get("model"),
                    "dataset": a.meta.get("dataset"),
                    "generations": a.meta.get("generations"),
                    "k_range": a.meta.get("k_range"),
                    "train_scope": a.meta.get("train_scope"),
                }
                for a in artifacts
            ],
            "k_grid": [int(k) for k in cfg.evaluate.k_grid],
            "meta_train_k_range": k_range,
            "best_adam": BEST_ADAM_RULE,
            "std": "population standard deviation (ddof = 0) over the tasks",
            "tasks": (
                "held-out tasks from the meta-test distribution (meta-test classes, eval batch from the test split), "
                "seeds from a stream disjoint from meta-training; every optimizer runs on the same tasks"
            ),
            "versions": _versions(),
            **meta,
        },
        "optimizers": [
            {
                "name": o.name,
                "kind": o.kind,
                "group": o.group,
                "train_scope": o.train_scope,
                "schedule": o.schedule,
                "learning_rate": o.learning_rate,
            }
            for o in optimizers
        ],
        "settings": settings,
        "skipped": dict(skipped),
        "speedup": {"setting": panel_f, "baseline": BEST_ADAM, "by_setting": speedup},
        "layer_stats": _trace_summary(trace),
        "meta_training": _history_summary(history),
        "files": dict(FILES),
    }
    return _jsonable(report)


def _curves(summary: dict[str, Any], field: str) -> dict[str, list[float]]:
    """Per optimizer, ``field`` of its rows (e.g. "mean_acc") in k_grid order; NaN where missing or null."""
    ks = summary["k_grid"]
    out: dict[str, list[float]] = {}
    for row in summary["rows"]:
        out.setdefault(row["optimizer"], [math.nan] * len(ks))
        v = row[field]
        out[row["optimizer"]][ks.index(row["K"])] = math.nan if v is None else v
    return out


def _speedup(k_grid: list[int], baseline: list[float], l3rs_curve: list[float]) -> list[dict[str, Any]]:
    from l3rs.meta.evaluate import speedup_table

    return speedup_table(k_grid, baseline, l3rs_curve)


def _trace_summary(trace: dict[str, Any] | None) -> dict[str, Any] | None:
    if trace is None:
        return None
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in trace.items()}


# ----------------------------------------------------------------------------------------------------------------
# CSV and markdown
# ----------------------------------------------------------------------------------------------------------------
def csv_text(report: dict[str, Any]) -> str:
    """The long-format CSV (:data:`CSV_FIELDS`); floats with full precision, None as an empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for setting in report["settings"].values():
        for row in setting["rows"]:
            writer.writerow({k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                             for k in CSV_FIELDS})  # fmt: skip
    return buf.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _num(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _k_header(ks: Sequence[int], k_max: int) -> list[str]:
    return [f"K={k}" + ("†" if k > k_max else "") for k in ks]


def _setting_tables(name: str, s: dict[str, Any], report: dict[str, Any]) -> list[str]:
    from l3rs.meta.evaluate import BEST_ADAM

    ks = s["k_grid"]
    k_max = report["meta"]["meta_train_k_range"][1]
    groups = {o["name"]: o for o in report["optimizers"]}
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for row in s["rows"]:
        cells.setdefault(row["optimizer"], {})[row["K"]] = row
    best_col = {}
    for k in ks:
        vals = [(c[k]["mean_acc"], n) for n, c in cells.items() if c[k]["mean_acc"] is not None and n != BEST_ADAM]
        best_col[k] = max(vals)[0] if vals else None

    def acc_row(n: str) -> list[str]:
        out = [n]
        for k in ks:
            r = cells[n][k]
            text = _pct(r["mean_acc"], r["std_acc"])
            out.append(f"**{text}**" if r["mean_acc"] is not None and r["mean_acc"] == best_col[k] else text)
        return out

    full = [n for n in s["optimizers"] if n == BEST_ADAM or groups[n]["train_scope"] == "all"]
    head = [n for n in s["optimizers"] if n != BEST_ADAM and groups[n]["train_scope"] == "head"]
    n_tasks = s["n_tasks"]
    lines = [
        f"## {name}. {s['title']}",
        "",
        f"{s['description']}. θ0: `{s['checkpoint']}`. {n_tasks} tasks; eval accuracy in %, mean ± std over tasks "
        f"(bold: best mean per K; † = beyond the meta-training range K ≤ {k_max}).",
        "",
        _md_table(["Optimizer", *_k_header(ks, k_max)], [acc_row(n) for n in full]),
        "",
    ]
    if head:
        lines += [
            f"Head-only fine-tuning (setting {name}, classifier head trained, the rest frozen; cf. Table 6):",
            "",
            _md_table(["Optimizer", *_k_header(ks, k_max)], [acc_row(n) for n in head]),
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
        "Eval loss (mean ± std over tasks):",
        "",
        _md_table(
            ["Optimizer", *_k_header(ks, k_max)],
            [[n, *(_num(cells[n][k]["mean_loss"], cells[n][k]["std_loss"]) for k in ks)] for n in s["optimizers"]],
        ),
        "",
    ]
    return lines


def _speedup_lines(report: dict[str, Any], setting: str | None) -> list[str]:
    if setting is None:
        return []
    rows = report["speedup"]["by_setting"].get(setting, {})
    lines = [
        f"## F. Speedup of the learned optimizers over best Adam (setting {setting})",
        "",
        "For each K of the grid: the mean accuracy best Adam reaches at K, the steps the learned optimizer needs to "
        "reach the same mean accuracy (its mean-accuracy curve interpolated linearly in log K) and the speedup "
        'K_Adam / K_learned. "≥": it is already there at the first K of the grid; "never": not within the grid.',
        "",
    ]
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
    """``report.md``: protocol, one section per setting (tables like the paper's Tables 5–10), F, figures."""
    meta = report["meta"]
    lines = ["# L3RS meta-evaluation", ""]
    lines += [
        f"Created {report['created']}. Settings evaluated: {', '.join(report['settings']) or 'none'}; "
        f"{meta['tasks_per_setting']} tasks per setting; K ∈ {meta['k_grid']}; meta-training K range "
        f"{meta['meta_train_k_range']}.",
        "",
        "Protocol (paper §5): " + meta["tasks"] + ". Accuracy and loss are measured on the task's evaluation batch "
        "after K steps (a fresh N-way head per task); " + meta["std"] + ". Best Adam's loss row is the loss of the "
        "variant chosen by accuracy.",
        "",
        BEST_ADAM_RULE,
        "",
        "Artifacts:",
        "",
    ]
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
        lines.append("none (only ψ₀, the untrained L3RS, against the baselines)")
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
            f"Fig. 4: {ls['optimizer']} on one held-out task of setting {ls['setting']} (seed {ls['task_seed']}), "
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
    """What ``l3rs evaluate`` prints: the in-domain (or first) table and the speedup."""
    setting = report["speedup"]["setting"]
    if setting is None:
        return "no setting evaluated."
    lines = _setting_tables(setting, report["settings"][setting], report)[:5] + [""]
    lines += _speedup_lines(report, setting)
    lines += [f"Skipped: {m}" for m in report["skipped"].values()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(name: str, group: str, index: int) -> dict[str, Any]:
    palette = ["black", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    styles = {
        "psi0": {"color": "0.55", "ls": "--", "marker": "s"},
        "adam_cosine": {"color": "tab:blue", "ls": "-", "marker": "v"},
        "adam_const": {"color": "tab:orange", "ls": "-", "marker": "D"},
        "adam_cosine_head": {"color": "tab:cyan", "ls": ":", "marker": "v"},
        "adam_const_head": {"color": "tab:green", "ls": ":", "marker": "D"},
    }
    if group == "l3rs":
        return {"color": palette[index % len(palette)], "ls": "-", "marker": "o", "lw": 2.2}
    if group in ("fc_lopt", "velo"):  # the other learned optimizers: as bold, but dashed and in their own colours
        other = {"fc_lopt": "tab:olive", "velo": "tab:brown"}[group]
        return {"color": other, "ls": "-.", "marker": "^" if group == "velo" else "P", "lw": 2.0}
    return {**styles.get(group, {"color": "gray", "ls": "-", "marker": "."}), "lw": 1.3}


def _k_axis(ax: Any, ks: Sequence[int], k_range: Sequence[int]) -> None:
    ax.set_xscale("log")
    ax.axvspan(k_range[0], k_range[1], color="0.85", alpha=0.35, lw=0, label="meta-training K range")
    ax.axvline(k_range[1], color="0.4", ls=":", lw=1)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning steps K (log scale)")
    ax.grid(alpha=0.3)


def _group_best(summary: dict[str, Any], names: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per K: the best (by mean accuracy) of ``names``, as (mean, std) curves."""
    means, stds = _curves(summary, "mean_acc"), _curves(summary, "std_acc")
    m, s = [], []
    for j in range(len(summary["k_grid"])):
        best = max(names, key=lambda n: -math.inf if math.isnan(means[n][j]) else means[n][j])
        m.append(means[best][j])
        s.append(stds[best][j])
    return m, s


def plot_meta_evaluation(report: dict[str, Any], uri: str) -> None:
    """Fig. 3: one panel per setting (mean eval accuracy ± std vs K, log x; L3RS rows, ψ₀, the best learning rate per
    K of each Adam family and best Adam) and panel F (speedup of L3RS over best Adam vs accuracy level)."""
    from l3rs.meta.evaluate import BEST_ADAM

    plt = _pyplot()
    settings = report["settings"]
    k_range = report["meta"]["meta_train_k_range"]
    groups = {o["name"]: o["group"] for o in report["optimizers"]}
    l3rs_rows = [o["name"] for o in report["optimizers"] if o["kind"] == "learned"]
    n_panels = len(settings) + 1
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.3 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (name, s) in zip(flat, settings.items(), strict=False):
        ks = s["k_grid"]
        means, stds = _curves(s, "mean_acc"), _curves(s, "std_acc")
        _k_axis(ax, ks, k_range)
        # best Adam underneath (a wide translucent band-line), so the family it comes from stays visible on top
        m, sd = np.asarray(means[BEST_ADAM]), np.asarray(stds[BEST_ADAM])
        ax.plot(ks, 100 * m, color="tab:red", lw=6, alpha=0.3, solid_capstyle="round", label=f"{BEST_ADAM} (per-K max)")
        ax.fill_between(ks, 100 * (m - sd), 100 * (m + sd), color="tab:red", alpha=0.07)
        for fam in ("adam_cosine", "adam_const", "adam_cosine_head", "adam_const_head"):
            members = [n for n in s["optimizers"] if groups.get(n) == fam]
            if members:
                m, _ = _group_best(s, members)
                st = _style(fam, fam, 0)
                ax.plot(ks, 100 * np.asarray(m), label=f"{GROUP_LABELS[fam]}, best lr per K", alpha=0.8, ms=4, **st)
        for i, n in enumerate(l3rs_rows):
            st = _style(n, groups[n], i)
            m, sd = np.asarray(means[n]), np.asarray(stds[n])
            ax.plot(ks, 100 * m, label=n, **st)
            ax.fill_between(ks, 100 * (m - sd), 100 * (m + sd), color=st["color"], alpha=0.12)
        ax.set_ylabel("eval accuracy (%), mean ± std over tasks")
        ax.set_title(f"{name}. {s['title']}: tasks from {s['dataset']}\nθ0: {_short(s['checkpoint'])} "
                     f"({s['n_tasks']} tasks)", fontsize=10)  # fmt: skip
    ax = flat[len(settings)]
    _plot_speedup(ax, report)
    for extra in flat[n_panels:]:
        extra.axis("off")
    handles, labels = {}, []
    for a in flat[: len(settings)]:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(4, len(labels)),
               bbox_to_anchor=(0.5, -0.01), frameon=False)  # fmt: skip
    fig.suptitle(
        "Meta-evaluation: eval accuracy after K fine-tuning steps on held-out tasks (shaded: ± std; grey band: "
        "meta-training K range)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.07 + 0.02 * math.ceil(len(labels) / 4), 1, 0.96))
    save_figure(fig, uri)
    plt.close(fig)


def _short(uri: str) -> str:
    return uri if len(uri) <= 40 else "…" + uri[-39:]


def _plot_speedup(ax: Any, report: dict[str, Any]) -> None:
    setting = report["speedup"]["setting"]
    groups = {o["name"]: o["group"] for o in report["optimizers"]}
    ax.axhline(1.0, color="0.4", ls=":", lw=1, label="no speedup")
    tables = report["speedup"]["by_setting"].get(setting, {}) if setting else {}
    for i, (name, table) in enumerate(tables.items()):
        st = _style(name, groups.get(name, "l3rs"), i)
        pts = [r for r in table if r["bound"] != "never"]
        if not pts:
            continue
        x = [100 * r["level"] for r in pts]
        y = [r["speedup"] for r in pts]
        ax.plot(x, y, color=st["color"], ls=st["ls"], marker=st["marker"], lw=1.8, label=name)
        for r, xi, yi in zip(pts, x, y, strict=True):
            prefix = "≥" if r["bound"] == ">=" else ""
            ax.annotate(f"{prefix}K={r['k_baseline']}", (xi, yi), textcoords="offset points", xytext=(3, 4),
                        fontsize=7, color=st["color"])  # fmt: skip
    ax.set_xlabel("accuracy level best Adam reaches at K (%)")
    ax.set_ylabel("speedup = K_best Adam / K_learned (×)")
    ax.set_title(f"F. Steps saved vs best Adam (setting {setting})\n≥: reached at the first K already",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_baselines(report: dict[str, Any], uri: str) -> None:
    """The paper's Fig. 3 layout: one row per setting, one column per Adam family with every learning rate as its own
    line, L3RS and ψ₀ overlaid."""
    plt = _pyplot()
    settings = report["settings"]
    if not settings:
        return
    k_range = report["meta"]["meta_train_k_range"]
    opts = report["optimizers"]
    fams = [f for f in ("adam_cosine", "adam_const", "adam_cosine_head", "adam_const_head")
            if any(o["group"] == f for o in opts)]  # fmt: skip
    l3rs_rows = [o for o in opts if o["kind"] == "learned"]
    fig, axes = plt.subplots(len(settings), len(fams), figsize=(4.6 * len(fams), 3.6 * len(settings)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, (name, s) in enumerate(settings.items()):
        ks = s["k_grid"]
        means = _curves(s, "mean_acc")
        for c, fam in enumerate(fams):
            ax = axes[r, c]
            _k_axis(ax, ks, k_range)
            members = [o for o in opts if o["group"] == fam]
            for i, o in enumerate(members):
                color = cmap(i / max(len(members) - 1, 1))
                ax.plot(ks, 100 * np.asarray(means[o["name"]]), color=color, marker=".", lw=1.2,
                        label=f"lr {o['name'].rsplit(', ', 1)[-1]}")  # fmt: skip
            for i, o in enumerate(l3rs_rows):
                st = _style(o["name"], o["group"], i)
                ax.plot(ks, 100 * np.asarray(means[o["name"]]), label=o["name"], **st)
            ax.set_title(f"{name}. {s['title']}: L3RS vs {GROUP_LABELS[fam]}", fontsize=9)
            ax.set_ylabel("mean eval accuracy (%)")
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("L3RS vs every Adam learning rate (rows: settings; columns: baseline families)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_figure(fig, uri)
    plt.close(fig)


def plot_layer_stats(trace: dict[str, Any], uri: str) -> None:
    """Fig. 4: λ and μ of every layer over one run (top: averaged over the layers; bottom: per layer)."""
    plt = _pyplot()
    mixing = np.asarray(trace["mixing"], np.float64)  # [T, L, P]
    lam = np.asarray(trace["step_norm"], np.float64)  # [T, L]
    lam = np.where(lam > 0, lam, np.nan)
    steps = np.arange(1, lam.shape[0] + 1)
    paths, dirs = trace["layer_paths"], trace["directions"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0, 0]
    ax.plot(steps, np.exp(np.nanmean(np.log(lam), axis=1)), color="black", lw=2)
    ax.set(yscale="log", xlabel="step k", ylabel="λ = step length ‖Δθ‖ (log scale)",
           title="λ, geometric mean over layers")  # fmt: skip
    ax = axes[0, 1]
    for p, d in enumerate(dirs):
        ax.plot(steps, mixing[:, :, p].mean(axis=1), lw=2, label=f"μ_{d}")
    ax.set(
        ylim=(-0.02, 1.02), xlabel="step k", ylabel="mixing coefficient μ", title="μ per direction, mean over layers"
    )
    ax.legend()
    cmap = plt.get_cmap("tab20")
    ax = axes[1, 0]
    for i, path in enumerate(paths):
        ax.plot(steps, lam[:, i], color=cmap(i % 20), lw=1.2, label=path)
    ax.set(yscale="log", xlabel="step k", ylabel="λ = step length ‖Δθ‖ (log scale)", title="λ per layer")
    ax = axes[1, 1]
    for i, path in enumerate(paths):
        ax.plot(steps, mixing[:, i, 0], color=cmap(i % 20), lw=1.2, label=path)
    ax.set(ylim=(-0.02, 1.02), xlabel="step k", ylabel=f"μ_{dirs[0]}", title=f"μ_{dirs[0]} per layer")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="layer")
    for a in axes.ravel():
        a.grid(alpha=0.3)
    fig.suptitle(
        f"{trace['optimizer']}: learned step sizes λ and mixing μ per layer over a {trace['num_steps']}-step run "
        f"(setting {trace['setting']}, one held-out task; eval accuracy after: {100 * trace['eval_accuracy']:.1f}%)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save_figure(fig, uri)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def write_report(
    report: dict[str, Any], out: str, *, trace: dict[str, Any] | None = None, started: float | None = None
) -> dict[str, str]:
    """Writes figures, ``report.csv``, ``report.md`` and, last, ``report.json`` under ``out`` (each atomically).

    ``trace``: the Fig. 4 run (:func:`l3rs.meta.evaluate.trace_layer_stats`). ``started``: a ``time.perf_counter()``
    value; if given, ``meta.seconds.total`` is set to the time since then (figures included). Returns the written
    files' URIs by kind.
    """
    storage.makedirs(out)
    written = {}
    if report["settings"]:
        plot_meta_evaluation(report, storage.join(out, FILES["fig3"]))
        written["fig3"] = storage.join(out, FILES["fig3"])
        plot_baselines(report, storage.join(out, FILES["fig3_baselines"]))
        written["fig3_baselines"] = storage.join(out, FILES["fig3_baselines"])
    if trace is not None:
        plot_layer_stats(trace, storage.join(out, FILES["fig4"]))
        written["fig4"] = storage.join(out, FILES["fig4"])
    mt = report.get("meta_training")
    if mt and mt.get("generations"):
        try:
            from l3rs.plots import plot_meta_training

            uri = storage.join(out, FILES["meta_training"])
            plot_meta_training(_read_history(mt["history"]), uri, "meta-training (copied from the run's history)")
            written["meta_training"] = uri
        except (OSError, KeyError, TypeError, ValueError) as e:  # another version's history: keep the pointer only
            mt["error"] = f"could not plot it: {type(e).__name__}: {e}"
    report["files"] = {k: FILES[k] for k in (*written, "csv", "markdown", "json")}  # what this folder holds
    if started is not None:
        report["meta"].setdefault("seconds", {})["total"] = round(time.perf_counter() - started, 3)
    storage.write_bytes_atomic(storage.join(out, FILES["csv"]), csv_text(report).encode())
    written["csv"] = storage.join(out, FILES["csv"])
    storage.write_bytes_atomic(storage.join(out, FILES["markdown"]), render_markdown(report).encode())
    written["markdown"] = storage.join(out, FILES["markdown"])
    body = json.dumps(report, indent=1, allow_nan=False, ensure_ascii=False)
    storage.write_bytes_atomic(storage.join(out, FILES["json"]), body.encode())
    written["json"] = storage.join(out, FILES["json"])
    return written
