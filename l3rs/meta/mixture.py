"""Meta-training on a task mixture (issue 11, part 2): several task sources in one NES run.

A run's config may list ``[[task.sources]]`` (:data:`l3rs.config.SOURCE_FIELDS`), each with its own dataset (a preset
or the [data] fields), θ0 checkpoint, N-way, K range, batch sizes and a weight. Without sources a run has exactly one
task distribution, that of [data], [model] and [task], and nothing here is used: its tasks, RNG streams and op order
are those of a run made before mixtures existed.

With sources:

- **Which source a meta-batch slot draws** is :func:`slot_source`, a pure function of (run seed, generation, slot,
  weights) on its own seed stream (tag ``"mixs"``), independent of the task seed of the slot
  (:func:`l3rs.meta.tasks.task_seed`, unchanged) and of which worker runs the unit, so resumes and worker faults
  cannot change it. Slots are drawn independently with probabilities ``weight / Σ weights``.
- **A worker holds every source** (its task pool and θ0) and one compiled inner loop per :func:`loop_key`, i.e. per
  distinct (model, image shape, N-way, batch size, eval batch size): sources that share a key share one loop, their
  pools concatenated (:func:`merge_pools`) and their tasks' indices shifted into it and padded to the key's largest
  ``k_max`` (:func:`place_task`; K is a traced loop bound, so K ranges need no compile of their own). θ0 is an
  argument of the compiled loop, so sources with different checkpoints share it too (their pretraining heads,
  replaced for every task anyway, are first given the task's width: :func:`with_task_head`).
- **Fitness.** ``nes.fitness = "loss"`` (default, paper §2): −mean eval loss over the meta-batch. Sources whose loss
  scales differ (e.g. 5-way vs 10-way tasks, an easy and a hard domain) then weigh by their loss *differences between
  candidates*, so an easy source with small losses barely moves the ranking. ``"log_loss"``: −mean log eval loss,
  every task counting by its *relative* improvement. Under NES's centered ranks this equals normalising each task's
  loss by any per-task reference that is the same for all candidates (e.g. θ0's loss on that task): every candidate
  of a generation runs the same tasks (common random numbers), so Σ_j log(L_ij / R_j) = Σ_j log L_ij − Σ_j log R_j
  differs between candidates by the first sum only, and no reference run is needed (:func:`fitness`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from l3rs.config import source_name
from l3rs.meta.tasks import Task, TaskPool

__all__ = [
    "FITNESS_MODES",
    "LOG_LOSS_FLOOR",
    "TaskSource",
    "fitness",
    "labels_only",
    "loop_key",
    "merge_pools",
    "place_task",
    "slot_source",
    "slot_sources",
    "source_probabilities",
    "task_sources",
    "with_task_head",
]

FITNESS_MODES = ("loss", "log_loss")
LOG_LOSS_FLOOR = 1e-6
"""``log_loss`` fitness takes log(max(loss, floor)): a loss that underflows to 0 is a very good result, not −∞."""

# Tag of the source draw's own seed stream ("mixs"): SeedSequence([run seed, generation, slot, tag]).
_SOURCE_TAG = int.from_bytes(b"mixs", "big")


class TaskSource(NamedTuple):
    """One entry of ``[[task.sources]]``.

    Attributes:
      index: its position in ``task.sources`` (what work units carry).
      name: its name (``name``, else its dataset's).
      weight: its share of the meta-batch is ``weight / Σ weights``.
      config: the run as if this source were its only task distribution (:meth:`l3rs.config.Config.source_config`):
        ``config.data``, ``config.task`` and ``config.model.checkpoint`` are the source's.
    """

    index: int
    name: str
    weight: float
    config: Any


def task_sources(cfg: Any) -> tuple[TaskSource, ...]:
    """The sources of a validated :class:`l3rs.config.Config`; empty when it declares none (a plain run)."""
    return tuple(
        TaskSource(i, source_name(s), float(s.get("weight", 1.0)), cfg.source_config(i))
        for i, s in enumerate(cfg.task.sources)
    )


def source_probabilities(weights: Any) -> np.ndarray:
    """``weights / Σ weights`` as float64. Raises ValueError for an empty list or a weight that is not > 0."""
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights: need one or more finite weights > 0, got {list(w)}.")
    return w / w.sum()


def slot_source(seed: int, generation: int, slot: int, weights: Any) -> int:
    """The source that meta-batch ``slot`` of ``generation`` draws its task from: index ``i`` with probability
    ``weights[i] / Σ weights``. A pure function of its arguments (its own seed stream), the same on any machine."""
    p = source_probabilities(weights)
    if p.size == 1:
        return 0
    u = np.random.default_rng(np.random.SeedSequence([int(seed), int(generation), int(slot), _SOURCE_TAG])).random()
    return int(min(np.searchsorted(np.cumsum(p), u, side="right"), p.size - 1))


def slot_sources(seed: int, generation: int, count: int, weights: Any) -> list[int]:
    """:func:`slot_source` of slots ``0 .. count-1``."""
    return [slot_source(seed, generation, j, weights) for j in range(count)]


def fitness(losses: np.ndarray, mode: str = "loss") -> np.ndarray:
    """Fitness of each candidate (row) from its eval losses on the meta-batch (columns); higher is better.

    ``"loss"``: −mean loss (paper §2). ``"log_loss"``: −mean log(max(loss, :data:`LOG_LOSS_FLOOR`)), scale-free (see
    the module doc). A non-finite loss anywhere in a row gives NaN, which NES ranks worst.
    """
    if mode not in FITNESS_MODES:
        raise ValueError(f"nes.fitness: must be one of {FITNESS_MODES}, got {mode!r}.")
    losses = np.asarray(losses, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = losses if mode == "loss" else np.log(np.maximum(losses, LOG_LOSS_FLOOR))
        out = -values.mean(axis=1)
    return np.where(np.isfinite(out), out, np.nan)


def loop_key(cfg: Any) -> tuple[Any, ...]:
    """What decides the compiled inner loop of a source's config: the model (name, options, head, training scope),
    its input image shape, the N-way and the two batch sizes. Sources with equal keys share one compile."""
    import json

    m = cfg.model
    return (
        m.name,
        json.dumps(m.options, sort_keys=True, default=str),
        m.head,
        m.module_path,
        cfg.task.train_scope,
        tuple(cfg.data.spec().image_shape),
        cfg.task.num_classes,
        cfg.task.batch_size,
        cfg.task.eval_batch_size,
    )


def merge_pools(pools: list[TaskPool]) -> tuple[TaskPool, list[tuple[int, int]]]:
    """One pool holding ``pools`` one after another, and each one's (train, eval) offset into it.

    A single pool is returned as it is (no copy), with offsets (0, 0).
    """
    if len(pools) == 1:
        return pools[0], [(0, 0)]
    offsets, train_at, eval_at = [], 0, 0
    for p in pools:
        offsets.append((train_at, eval_at))
        train_at += len(p.train_labels)
        eval_at += len(p.eval_labels)
    merged = TaskPool(*(np.concatenate([getattr(p, f) for p in pools]) for f in TaskPool._fields))
    return merged, offsets


def with_task_head(variables: dict[str, Any], num_classes: int, head: str = "head") -> dict[str, Any]:
    """θ0 with its classifier ``head`` replaced by a ``num_classes``-way one (numpy). The inner loop replaces the
    head of θ0 by a fresh one for every task and reads only the old head's input width and dtype
    (:func:`l3rs.models.fresh_head`), so this changes no result; it gives every θ0 of a shared loop the same shapes
    (a checkpoint pretrained on 360 classes and one pretrained on 5 would otherwise compile twice)."""
    import jax

    from l3rs.models import fresh_head

    params = fresh_head(variables["params"], jax.random.key(0), num_classes, head)
    return jax.tree.map(np.asarray, {**variables, "params": params})


def labels_only(pool: TaskPool) -> TaskPool:
    """``pool`` without its images (empty arrays of the same image shape): all that sampling a task reads
    (:func:`l3rs.meta.tasks.sample_task`), once a loop holds the images on its device."""

    def empty(images: np.ndarray) -> np.ndarray:  # a new array: a view [:0] would keep the images alive
        return np.empty((0, *images.shape[1:]), images.dtype)

    return pool._replace(train_images=empty(pool.train_images), eval_images=empty(pool.eval_images))


def place_task(task: Task, offset: tuple[int, int], rows: int) -> Task:
    """``task`` with its indices shifted by ``offset`` (its pool's place in a merged pool) and its batch rows padded
    with zeros to ``rows`` (the largest ``k_max`` among the sources of its loop; rows past ``num_steps`` are never
    read). A task needing neither is returned as it is."""
    train_off, eval_off = offset
    pad = rows - task.train_idx.shape[0]
    if pad < 0:
        raise ValueError(f"rows: {rows} is fewer than the task's {task.train_idx.shape[0]} batch rows.")
    if not (train_off or eval_off or pad):
        return task
    train_idx = np.pad(task.train_idx + np.int32(train_off), ((0, pad), (0, 0)))
    train_y = np.pad(task.train_y, ((0, pad), (0, 0)))
    return task._replace(train_idx=train_idx.astype(np.int32), train_y=train_y.astype(np.int32),
                         eval_idx=(task.eval_idx + np.int32(eval_off)).astype(np.int32))  # fmt: skip
