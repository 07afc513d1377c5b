"""The work of a meta-evaluation: every optimizer at every K of ``evaluate.k_grid`` on (a shard of) one setting's
tasks (paper §5, Fig. 3; Appendix C Tables 5–10).

Cost: Adam (const) runs once per task to the largest K, evaluated on the way at every K (``InnerLoop`` ``eval_at``);
Adam (cosine) and the learned optimizers run once per K (the schedule and L3RS's time features depend on K). K is
traced, so one compile serves every K and task of an optimizer family. :func:`evaluate_setting` is pure work over task
seeds and can be sharded (``shard=(i, n)``); :func:`merge_results` puts shards back together by task index, so the
numbers do not depend on the sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from l3rs.config import Config
from l3rs.meta.eval_optimizers import OptimizerSpec
from l3rs.meta.settings import SETTINGS, SettingSpec, eval_distribution, setting_spec

__all__ = ["SettingResult", "evaluate_setting", "merge_results", "clear_runners"]


class SettingResult(NamedTuple):
    """Per-task results of (a shard of) one setting.

    ``accuracy[name]`` and ``loss[name]`` are [tasks, len(k_grid)] float64 arrays, rows in ``indices`` order (the
    task's index in the setting's seed list). ``compiles`` counts the inner-loop traces this part caused (0 when a
    process reused its loops) and ``seconds`` the wall time of its work.
    """

    setting: str
    k_grid: tuple[int, ...]
    indices: np.ndarray
    seeds: np.ndarray
    accuracy: dict[str, np.ndarray]
    loss: dict[str, np.ndarray]
    compiles: int = 0
    seconds: float = 0.0


class _SettingRunner:
    """θ0, the setting's task images and one compiled inner loop per optimizer family."""

    def __init__(self, cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> None:
        from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, learned_optimizer_fn
        from l3rs.meta.runner import load_theta0, model_for
        from l3rs.meta.tasks import load_task_pool

        self.k_grid = tuple(int(k) for k in cfg.evaluate.k_grid)
        self.dist = eval_distribution(cfg, setting.dataset)
        self.pool = load_task_pool(self.dist)
        variables0, _ = load_theta0(cfg, setting.checkpoint)
        module = model_for(cfg)
        self.optimizers = list(optimizers)
        self.params = [o.params() for o in self.optimizers]
        self.loops: dict[tuple, Any] = {}
        for o in self.optimizers:
            key = o.family()
            if key in self.loops:
                continue
            fn = learned_optimizer_fn(o.config, o.psi) if o.kind == "learned" else adam_optimizer_fn(o.schedule)
            self.loops[key] = InnerLoop(
                module,
                variables0,
                self.pool,
                fn,
                num_classes=cfg.task.num_classes,
                train_scope=o.train_scope,
                head=cfg.model.head,
            )
        self._counted = 0

    def new_compiles(self) -> int:
        total = sum(loop.compiles for loop in self.loops.values())
        new, self._counted = total - self._counted, total
        return new

    def run_task(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        import jax

        from l3rs.meta.tasks import sample_task

        task = sample_task(int(seed), self.dist, self.pool)
        k_max = self.k_grid[-1]
        pending = []  # dispatch everything, then wait once (the runs queue up on the device)
        for o, p in zip(self.optimizers, self.params, strict=True):
            loop = self.loops[o.family()]
            if o.kind == "adam" and o.schedule == "constant":
                # K-independent: one run to the largest K, evaluated on the way at every K of the grid.
                pending.append(loop.run_arrays(p, task, k_max, eval_at=self.k_grid))
            else:
                # Adam (cosine) and L3RS depend on K (schedule, time features): one run per K.
                pending.append([loop.run_arrays(p, task, k) for k in self.k_grid])
        got = jax.device_get(pending)
        acc, loss = {}, {}
        for o, out in zip(self.optimizers, got, strict=True):
            if isinstance(out, dict):
                acc[o.name] = np.asarray(out["curve_accuracy"], np.float64)
                loss[o.name] = np.asarray(out["curve_loss"], np.float64)
            else:
                acc[o.name] = np.asarray([r["accuracy"] for r in out], np.float64)
                loss[o.name] = np.asarray([r["loss"] for r in out], np.float64)
        return acc, loss


# Per process: the runners of the settings seen last (data and compiled loops stay), at most one per setting.
_RUNNERS: dict[str, _SettingRunner] = {}
_MAX_RUNNERS = len(SETTINGS)


def _fingerprint(cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(dataclasses.asdict(setting), sort_keys=True).encode())
    for o in optimizers:
        h.update(repr((o.name, o.family())).encode())
        h.update(np.asarray(o.params(), np.float32).tobytes())
    return h.hexdigest()


def clear_runners() -> None:
    """Frees this process's cached setting runners (their data and compiled loops)."""
    _RUNNERS.clear()


def _runner_for(cfg: Config, setting: SettingSpec, optimizers: Sequence[OptimizerSpec]) -> _SettingRunner:
    key = _fingerprint(cfg, setting, optimizers)
    runner = _RUNNERS.pop(key, None)
    if runner is None:
        while len(_RUNNERS) >= _MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))  # least recently used
        runner = _SettingRunner(cfg, setting, optimizers)
    _RUNNERS[key] = runner
    return runner


def evaluate_setting(
    cfg: Config,
    setting: SettingSpec | str,
    optimizers: Sequence[OptimizerSpec],
    task_seeds: Sequence[int],
    *,
    shard: tuple[int, int] = (0, 1),
) -> SettingResult:
    """Runs every optimizer at every K of ``cfg.evaluate.k_grid`` on the tasks ``task_seeds[i::n]``.

    Pure work: the result of a task depends only on (config, setting, optimizer, task seed), so shards can run in
    any process and :func:`merge_results` gives the same numbers for any sharding. The process keeps the recent
    settings' data and compiled loops, so further shards of the same setting compile nothing.

    Args:
      cfg: the validated config (``evaluate.k_grid``, task shape, model).
      setting: a :class:`SettingSpec` or a setting name ("A".."E").
      optimizers: from :func:`build_optimizers`.
      task_seeds: all task seeds of the setting (:func:`eval_task_seeds`).
      shard: ``(i, n)``: this call runs the tasks with index ≡ i (mod n).
    """
    start = time.perf_counter()
    spec = setting_spec(cfg, setting) if isinstance(setting, str) else setting
    i, n = shard
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"shard: {shard!r} must be (i, n) with 0 <= i < n.")
    runner = _runner_for(cfg, spec, optimizers)
    indices = list(range(i, len(task_seeds), n))
    acc = {o.name: np.zeros((len(indices), len(runner.k_grid))) for o in optimizers}
    loss = {o.name: np.zeros((len(indices), len(runner.k_grid))) for o in optimizers}
    for row, index in enumerate(indices):
        a, lo = runner.run_task(task_seeds[index])
        for name in acc:
            acc[name][row], loss[name][row] = a[name], lo[name]
    return SettingResult(
        setting=spec.name,
        k_grid=runner.k_grid,
        indices=np.asarray(indices, np.int64),
        seeds=np.asarray([task_seeds[j] for j in indices], np.uint64),
        accuracy=acc,
        loss=loss,
        compiles=runner.new_compiles(),
        seconds=time.perf_counter() - start,
    )


def merge_results(parts: Sequence[SettingResult]) -> SettingResult:
    """Concatenates shards of one setting, rows sorted by task index (independent of how the tasks were split)."""
    if not parts:
        raise ValueError("merge_results: no parts.")
    first = parts[0]
    if any(p.setting != first.setting or p.k_grid != first.k_grid for p in parts):
        raise ValueError("merge_results: parts of different settings or K grids.")
    indices = np.concatenate([p.indices for p in parts])
    if len(set(indices.tolist())) != len(indices):
        raise ValueError("merge_results: a task index appears in two parts.")
    order = np.argsort(indices, kind="stable")

    def cat(field: str) -> dict[str, np.ndarray]:
        return {k: np.concatenate([getattr(p, field)[k] for p in parts])[order] for k in getattr(first, field)}

    return SettingResult(
        setting=first.setting,
        k_grid=first.k_grid,
        indices=indices[order],
        seeds=np.concatenate([p.seeds for p in parts])[order],
        accuracy=cat("accuracy"),
        loss=cat("loss"),
        compiles=sum(p.compiles for p in parts),
        seconds=sum(p.seconds for p in parts),
    )
