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


def plot_meta_training(history: Sequence[dict[str, Any]], uri: str, title: str = "") -> None:
    """Fitness (mean and best of the population), population eval accuracy, and the σ / meta-lr schedules."""
    plt = _pyplot()
    gen = np.asarray([h["generation"] for h in history])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(gen, [h["fitness_mean"] for h in history], label="population mean", color="black")
    ax.plot(gen, [h["fitness_best"] for h in history], label="population best", color="tab:green", alpha=0.7)
    ax.set(xlabel="generation", ylabel="fitness = −mean eval loss", title="Fitness")
    ax.legend()
    ax = axes[1]
    ax.plot(gen, 100 * np.asarray([h["accuracy_mean"] for h in history]), color="black")
    ax.set(xlabel="generation", ylabel="eval accuracy (%)", title="Population eval accuracy")
    ax = axes[2]
    ax.plot(gen, [h["sigma"] for h in history], label="σ")
    ax.plot(gen, [h["meta_lr"] for h in history], label="meta learning rate")
    ax.set(xlabel="generation", title="NES schedules", yscale="log")
    ax.legend()
    for a in axes:
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, uri)
    plt.close(fig)
