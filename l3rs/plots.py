"""Pictures of a run: meta-training curves (paper Fig. 5). Written as PNG through ``l3rs.storage``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs import storage

__all__ = ["save_figure", "plot_meta_training"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes_atomic(uri, buf.getvalue())


def _values(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([np.nan if h.get(key) is None else h[key] for h in history], np.float64)


def moving_average(values: np.ndarray, window: int, reduce=np.mean) -> np.ndarray:
    """Trailing ``reduce`` (mean; or e.g. ``np.median``) over up to ``window`` finite values (NaN where none); same
    length as ``values``."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = reduce(chunk)
    return out


def robust_limits(values: Sequence[np.ndarray], low_percentile: float = 5.0) -> tuple[float, float]:
    """y-limits that show the bulk of the values: from the ``low_percentile``-th percentile of all finite values to
    their maximum, padded by 10 %. One diverging candidate can pull a generation's population mean down by orders
    of magnitude; these limits keep the rest of the curve readable (the outliers are counted on the plot)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if finite.size == 0:
        return -1.0, 0.0
    lo, hi = float(np.percentile(finite, low_percentile)), float(finite.max())
    pad = 0.1 * (hi - lo) or 0.1 * abs(hi) or 0.1
    return lo - pad, hi + pad


def plot_meta_training(history: Sequence[dict[str, Any]], uri: str, title: str = "") -> None:
    """Fitness (mean and best of the population), population eval accuracy, and the σ / meta-lr schedules.

    Every generation draws new tasks (another K, other classes and batches), so the per-generation values jump; the
    bold lines are trailing moving averages over 10 generations, the faint ones the raw values.
    """
    plt = _pyplot()
    gen = np.asarray([h["generation"] for h in history])
    window = 10
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    raws = []
    for key, label, color in (("fitness_mean", "population mean", "black"), ("fitness_best", "best", "tab:green")):
        raw = _values(history, key)
        raws.append(raw)
        ax.plot(gen, raw, color=color, alpha=0.25, lw=1)
        # A median: one diverged candidate's huge loss must not hide ten generations of the curve.
        smooth = moving_average(raw, window, np.median)
        ax.plot(gen, smooth, color=color, lw=2, label=f"{label} ({window}-gen. median)")
    lo, hi = robust_limits(raws)
    ax.set_ylim(lo, hi)
    below = int(np.sum(raws[0] < lo))
    fitness_title = "Fitness (higher is better)"
    if below:  # said in the title, where no curve or legend can cover it
        fitness_title += f"\n{below} generation(s) of the mean below the axis (diverging candidates)"
    ax.set(xlabel="generation", ylabel="fitness = -mean eval loss")
    ax.set_title(fitness_title, fontsize=10)
    ax.legend()
    ax = axes[1]
    acc = 100 * _values(history, "accuracy_mean")
    ax.plot(gen, acc, color="tab:blue", alpha=0.25, lw=1)
    ax.plot(gen, moving_average(acc, window), color="tab:blue", lw=2, label=f"{window}-gen. average")
    ax.set(xlabel="generation", ylabel="eval accuracy after K steps (%)", title="Population eval accuracy")
    ax.legend()
    ax = axes[2]
    ax.plot(gen, _values(history, "sigma"), label="σ")
    ax.plot(gen, _values(history, "meta_lr"), label="meta learning rate")
    ax.set(xlabel="generation", title="NES schedules", yscale="log")
    ax.legend()
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"{title}: meta-training (new tasks every generation; faint = raw)" if title else "meta-training",
                 y=1.04)  # fmt: skip
    save_figure(fig, uri)
    plt.close(fig)
