"""The report's figures (paper Fig. 3 and Fig. 4), drawn from the report dict. Each ``*_figure`` function returns the
matplotlib figure (so its text can be checked: :func:`figure_text`); each ``plot_*`` saves one as PNG through
:mod:`l3rs.storage`. Titles name settings, datasets and checkpoints as the report does (never an absolute path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs.meta.stats import BEST_ADAM
from l3rs.plots import save_figure
from l3rs.report.build import curves
from l3rs.report.render import shared_label

__all__ = [
    "GROUP_LABELS",
    "meta_evaluation_figure",
    "baselines_figure",
    "layer_stats_figure",
    "plot_meta_evaluation",
    "plot_baselines",
    "plot_layer_stats",
    "figure_text",
]

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


def _group_best(summary: dict[str, Any], names: Sequence[str]) -> list[float]:
    """Per K: the mean accuracy of the best (by mean accuracy) of ``names``."""
    means = curves(summary, "mean_acc")
    out = []
    for j in range(len(summary["k_grid"])):
        best = max(names, key=lambda n: -math.inf if math.isnan(means[n][j]) else means[n][j])
        out.append(means[best][j])
    return out


def _se_band(se: Sequence[float]) -> np.ndarray:
    """The half-width of a ± standard-error band; 0 where the standard error is unknown (one task)."""
    return np.nan_to_num(np.asarray(se, np.float64), nan=0.0)


def meta_evaluation_figure(report: dict[str, Any]) -> Any:
    """Fig. 3: one panel per setting (mean eval accuracy ± standard error vs K, log x; the learned rows, ψ₀, the
    best learning rate per K of each Adam family and best Adam) and panel F (speedup over best Adam vs accuracy
    level). Panels of settings whose classes meta-training used say so."""
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
        means, ses = curves(s, "mean_acc"), curves(s, "se_acc")
        _k_axis(ax, ks, k_range)
        # best Adam underneath (a wide translucent band-line), so the family it comes from stays visible on top
        m, sd = np.asarray(means[BEST_ADAM]), _se_band(ses[BEST_ADAM])
        ax.plot(ks, 100 * m, color="tab:red", lw=6, alpha=0.3, solid_capstyle="round", label=f"{BEST_ADAM} (per-K max)")
        ax.fill_between(ks, 100 * (m - sd), 100 * (m + sd), color="tab:red", alpha=0.07)
        for fam in ("adam_cosine", "adam_const", "adam_cosine_head", "adam_const_head"):
            members = [n for n in s["optimizers"] if groups.get(n) == fam]
            if members:
                m = _group_best(s, members)
                st = _style(fam, fam, 0)
                ax.plot(ks, 100 * np.asarray(m), label=f"{GROUP_LABELS[fam]}, best lr per K", alpha=0.8, ms=4, **st)
        for i, n in enumerate(l3rs_rows):
            st = _style(n, groups[n], i)
            m, sd = np.asarray(means[n]), _se_band(ses[n])
            ax.plot(ks, 100 * m, label=n, **st)
            ax.fill_between(ks, 100 * (m - sd), 100 * (m + sd), color=st["color"], alpha=0.12)
        ax.set_ylabel("eval accuracy (%), mean ± SE over tasks")
        shared = "; shared classes with meta-training" if shared_label(s) else ""
        ax.set_title(f"{name}. {s['title']}: tasks from {s['dataset']}\nθ0: {_short(s['checkpoint'])} "
                     f"({s['n_tasks']} tasks{shared})", fontsize=10)  # fmt: skip
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
        "Meta-evaluation: eval accuracy after K fine-tuning steps on the evaluation tasks (shaded: ± standard error "
        "of the mean; grey band: meta-training K range)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.07 + 0.02 * math.ceil(len(labels) / 4), 1, 0.96))
    return fig


def _short(name: str) -> str:
    return name if len(name) <= 40 else "…" + name[-39:]


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


def baselines_figure(report: dict[str, Any]) -> Any:
    """The paper's Fig. 3 layout: one row per setting, one column per Adam family with every learning rate as its own
    line, the learned rows and ψ₀ overlaid. None without settings."""
    plt = _pyplot()
    settings = report["settings"]
    if not settings:
        return None
    k_range = report["meta"]["meta_train_k_range"]
    opts = report["optimizers"]
    fams = [f for f in ("adam_cosine", "adam_const", "adam_cosine_head", "adam_const_head")
            if any(o["group"] == f for o in opts)]  # fmt: skip
    l3rs_rows = [o for o in opts if o["kind"] == "learned"]
    fig, axes = plt.subplots(len(settings), len(fams), figsize=(4.6 * len(fams), 3.6 * len(settings)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, (name, s) in enumerate(settings.items()):
        ks = s["k_grid"]
        means = curves(s, "mean_acc")
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
    return fig


def layer_stats_figure(trace: dict[str, Any]) -> Any:
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
        f"(setting {trace['setting']}, one evaluation task; eval accuracy after: {100 * trace['eval_accuracy']:.1f}%)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _save(fig: Any, uri: str) -> None:
    if fig is None:
        return
    save_figure(fig, uri)
    _pyplot().close(fig)


def plot_meta_evaluation(report: dict[str, Any], uri: str) -> None:
    """Saves :func:`meta_evaluation_figure` as a PNG at ``uri``."""
    _save(meta_evaluation_figure(report), uri)


def plot_baselines(report: dict[str, Any], uri: str) -> None:
    """Saves :func:`baselines_figure` as a PNG at ``uri`` (nothing without settings)."""
    _save(baselines_figure(report), uri)


def plot_layer_stats(trace: dict[str, Any], uri: str) -> None:
    """Saves :func:`layer_stats_figure` as a PNG at ``uri``."""
    _save(layer_stats_figure(trace), uri)


def figure_text(fig: Any) -> list[str]:
    """Every piece of text drawn in ``fig``: titles, the suptitle, axis labels, tick labels, legends, annotations."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]
