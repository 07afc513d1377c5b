"""The statistics of the meta-evaluation (pure numpy; tests check them against hand-computed values).

Per setting, over its tasks: mean, population std and standard error of the eval accuracy and loss
(:func:`mean_std`, :func:`standard_error`), "best Adam" per K (:func:`best_per_k`), per-task wins
(:func:`win_counts`), and Fig. 3 F's speedup (:func:`interp_steps`, :func:`speedup_table`).
:func:`summarize_setting` turns one setting's per-task results into the report's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from l3rs.meta.eval_optimizers import OptimizerSpec
    from l3rs.meta.eval_setting import SettingResult

__all__ = [
    "BEST_ADAM",
    "mean_std",
    "standard_error",
    "best_per_k",
    "interp_steps",
    "speedup_table",
    "win_counts",
    "summarize_setting",
]

BEST_ADAM = "best Adam"


def mean_std(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over tasks (axis 0) of a [tasks, ...] array.

    The std is the population std (ddof = 0): the spread of the task results, as "mean ± std" in the paper's tables.
    A non-finite value (a diverged run's loss) makes that column's mean and std non-finite: it is not hidden.
    """
    x = np.asarray(values, np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("mean_std: need at least one task (axis 0).")
    with np.errstate(invalid="ignore"):
        return x.mean(axis=0), x.std(axis=0)


def standard_error(values: Any) -> np.ndarray:
    """Standard error of the mean over tasks (axis 0) of a [tasks, ...] array: the sample standard deviation
    (ddof = 1) divided by √n, i.e. ``std(ddof=0) / √(n − 1)``. NaN with a single task (no spread to estimate) and
    where a value is non-finite."""
    x = np.asarray(values, np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("standard_error: need at least one task (axis 0).")
    n = x.shape[0]
    if n < 2:
        return np.full(x.shape[1:], np.nan)
    with np.errstate(invalid="ignore"):
        return x.std(axis=0, ddof=1) / math.sqrt(n)


def best_per_k(mean_accuracy: Mapping[str, Sequence[float]], candidates: Sequence[str] | None = None) -> list[str]:
    """For each K (position), the candidate with the highest mean accuracy (ties: the first in ``candidates``
    order; a NaN never wins). "Best Adam" of the paper: the baseline tuned per K with hindsight.

    Raises:
      ValueError: no candidates, or a K where every candidate is NaN.
    """
    names = list(candidates if candidates is not None else mean_accuracy)
    if not names:
        raise ValueError("best_per_k: no candidates.")
    table = np.asarray([np.asarray(mean_accuracy[n], np.float64) for n in names])  # [C, K]
    best = []
    for j in range(table.shape[1]):
        if np.all(np.isnan(table[:, j])):
            raise ValueError(f"best_per_k: every candidate is NaN at position {j}.")
        col = np.where(np.isnan(table[:, j]), -np.inf, table[:, j])
        best.append(names[int(np.argmax(col))])  # argmax returns the first maximum
    return best


def interp_steps(k_grid: Sequence[float], accuracy: Sequence[float], level: float) -> float:
    """The number of steps at which a mean-accuracy curve first reaches ``level``.

    The curve is known at ``k_grid`` and taken as linear in log K between grid points: between K_a (accuracy a <
    level) and K_b (b ≥ level), K = exp(log K_a + (level − a)/(b − a) · (log K_b − log K_a)). Returns ``k_grid[0]``
    when the first point already reaches the level (the true K may be smaller: a bound), and NaN when the curve never
    reaches it within the grid.
    """
    ks = np.asarray(k_grid, np.float64)
    acc = np.asarray(accuracy, np.float64)
    if ks.shape != acc.shape or ks.ndim != 1 or len(ks) == 0:
        raise ValueError(f"interp_steps: k_grid and accuracy need the same 1-D shape, got {ks.shape}, {acc.shape}.")
    for j in range(len(ks)):
        if not acc[j] >= level:  # NaN: not reached
            continue
        if j == 0:
            return float(ks[0])
        a, b = acc[j - 1], acc[j]
        if not np.isfinite(a) or b == a:
            return float(ks[j])
        t = (level - a) / (b - a)
        return float(np.exp(np.log(ks[j - 1]) + t * (np.log(ks[j]) - np.log(ks[j - 1]))))
    return math.nan


def speedup_table(
    k_grid: Sequence[int], baseline_accuracy: Sequence[float], l3rs_accuracy: Sequence[float]
) -> list[dict[str, Any]]:
    """Fig. 3 F: for each K of the grid, the accuracy level the baseline (best Adam) reaches at K, the steps L3RS
    needs to reach it (:func:`interp_steps` on its mean-accuracy curve) and the speedup K / K_L3RS.

    Each row: ``k_baseline``, ``level``, ``k_l3rs``, ``speedup`` and ``bound``: ``""`` (interpolated), ``">="``
    (L3RS is already there at the first K of the grid: the speedup is at least the value given) or ``"never"``
    (L3RS does not reach the level within the grid; ``k_l3rs`` and ``speedup`` are NaN).
    """
    rows = []
    for k, level in zip(k_grid, baseline_accuracy, strict=True):
        k_l3rs = interp_steps(k_grid, l3rs_accuracy, float(level))
        if math.isnan(k_l3rs):
            bound, speedup = "never", math.nan
        else:
            bound = ">=" if l3rs_accuracy[0] >= level else ""
            speedup = float(k) / k_l3rs
        rows.append({"k_baseline": int(k), "level": float(level), "k_l3rs": k_l3rs, "speedup": speedup, "bound": bound})
    return rows


def win_counts(l3rs_accuracy: Any, baseline_accuracy: Any) -> list[dict[str, int]]:
    """Per K (column): on how many tasks L3RS's accuracy is higher than / equal to / lower than the baseline's."""
    a = np.asarray(l3rs_accuracy, np.float64)
    b = np.asarray(baseline_accuracy, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_counts: shapes differ: {a.shape} vs {b.shape}.")
    return [
        {"wins": int(np.sum(a[:, j] > b[:, j])), "ties": int(np.sum(a[:, j] == b[:, j])),
         "losses": int(np.sum(a[:, j] < b[:, j]))}
        for j in range(a.shape[1])
    ]  # fmt: skip


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def summarize_setting(result: SettingResult, optimizers: Sequence[OptimizerSpec]) -> dict[str, Any]:
    """Tables of one setting: mean, std and standard error per optimizer and K, best Adam per K, per-task wins of
    each learned row against best Adam.

    ``rows`` are long-format records (``setting, optimizer, K, mean_acc, std_acc, mean_loss, std_loss, n_tasks,
    se_acc, se_loss``; non-finite numbers, and the standard error of a single task, as None); the last optimizer is
    ``"best Adam"``: per K the Adam row with the highest mean accuracy (:func:`best_per_k`), its per-task numbers.
    """
    ks = list(result.k_grid)
    n = len(result.indices)
    adam = [o.name for o in optimizers if o.is_adam]
    l3rs_rows = [o.name for o in optimizers if not o.is_adam]

    def moments(acc: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, ...]:
        (ma, sa), (ml, sl) = mean_std(acc), mean_std(loss)
        return ma, sa, standard_error(acc), ml, sl, standard_error(loss)

    stats = {name: moments(result.accuracy[name], result.loss[name]) for name in [o.name for o in optimizers]}
    best = best_per_k({a: stats[a][0] for a in adam}, adam)
    best_acc = np.stack([result.accuracy[best[j]][:, j] for j in range(len(ks))], axis=1)
    best_loss = np.stack([result.loss[best[j]][:, j] for j in range(len(ks))], axis=1)
    stats[BEST_ADAM] = moments(best_acc, best_loss)
    rows = []
    for name, (ma, sa, ea, ml, sl, el) in stats.items():
        for j, k in enumerate(ks):
            rows.append(
                {
                    "setting": result.setting,
                    "optimizer": name,
                    "K": int(k),
                    "mean_acc": _finite(ma[j]),
                    "std_acc": _finite(sa[j]),
                    "mean_loss": _finite(ml[j]),
                    "std_loss": _finite(sl[j]),
                    "n_tasks": n,
                    "se_acc": _finite(ea[j]),
                    "se_loss": _finite(el[j]),
                }
            )
    wins = {name: win_counts(result.accuracy[name], best_acc) for name in l3rs_rows}
    return {
        "setting": result.setting,
        "k_grid": ks,
        "n_tasks": n,
        "optimizers": list(stats),
        "rows": rows,
        "best_adam": {"K": ks, "variant": best},
        "wins_vs_best_adam": wins,
        "per_task": {
            "task_index": result.indices.tolist(),
            "task_seed": [int(s) for s in result.seeds],
            "accuracy": {k: v.tolist() for k, v in result.accuracy.items()},
            "loss": {k: [[_finite(x) for x in row] for row in v] for k, v in result.loss.items()},
            BEST_ADAM: {"accuracy": best_acc.tolist()},
        },
    }
