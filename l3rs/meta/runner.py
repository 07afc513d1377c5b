"""What one meta-training worker does, without Ray: hold θ0, the task images and one compiled inner loop, and turn
(candidate ψ vectors, task seed) into eval losses. The Ray actor in ``l3rs.service`` is a thin wrapper around
:class:`TaskRunner`, so the same code runs locally, in tests and on a cluster.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np

from l3rs.config import Config
from l3rs.meta.inner import InnerLoop, learned_optimizer_fn
from l3rs.meta.mixture import labels_only, loop_key, merge_pools, place_task, task_sources, with_task_head
from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task

__all__ = ["TaskRunner", "task_distribution", "load_theta0", "initial_meta", "model_for", "model_shapes"]


def task_distribution(cfg: Config, stage: str = "meta_train", *, k_min: int | None = None, k_max: int | None = None):
    return TaskDistribution(
        dataset=cfg.data.spec(),
        stage=stage,
        num_classes=cfg.task.num_classes,
        batch_size=cfg.task.batch_size,
        eval_batch_size=cfg.task.eval_batch_size,
        k_min=cfg.task.k_min if k_min is None else k_min,
        k_max=cfg.task.k_max if k_max is None else k_max,
        data_dir=cfg.data.data_dir,
        truncation_prob=cfg.task.truncation_prob if stage == "meta_train" else 0.0,
    )


def model_for(cfg: Config):
    return cfg.model.create(cfg.task.num_classes)


def load_theta0(
    cfg: Config, checkpoint: str | None = None, *, field: str = "model.checkpoint"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """θ0 and its metadata: a checkpoint (``l3rs pretrain`` folder, flax msgpack or Orbax; see
    :func:`l3rs.checkpoint.read_theta0`) checked against the model's shapes, or a seeded random init for
    ``checkpoint = "random"``. Raises ValueError naming ``field``."""
    from l3rs.checkpoint import check_theta0, read_theta0, theta0_format
    from l3rs.meta.pretrain import random_variables

    checkpoint = checkpoint or cfg.model.checkpoint
    if checkpoint == "random":
        spec = cfg.data.spec()
        variables = random_variables(cfg.model.name, spec.image_shape, cfg.task.num_classes, cfg.run.seed,
                                     module=model_for(cfg))  # fmt: skip
        return jax.tree.map(np.asarray, variables), {"model": cfg.model.name, "random_init": True}
    if theta0_format(checkpoint) == "l3rs-pretrain":  # which model it holds, before reading its variables
        import json

        from l3rs import storage
        from l3rs.meta.pretrain import META_FILE

        model = json.loads(storage.read_bytes(storage.join(checkpoint, META_FILE))).get("model")
        if model != cfg.model.name:
            raise ValueError(f"{field}: {checkpoint!r} holds a {model!r} model, model.name is {cfg.model.name!r}.")
    variables, meta = read_theta0(checkpoint)
    try:
        check_theta0(variables, model_shapes(cfg), head=cfg.model.head, uri=checkpoint, field=field)
    except ValueError as e:
        raise ValueError(f"{e} (model.name = {cfg.model.name!r}, model.options = {cfg.model.options})") from None
    return variables, meta


def model_shapes(cfg: Config) -> Any:
    """The model's variables as ``jax.ShapeDtypeStruct`` (no compute), for images of the run's dataset."""
    from l3rs.models import init_variables

    module = model_for(cfg)
    image_shape = cfg.data.spec().image_shape
    return jax.eval_shape(lambda k: init_variables(module, k, image_shape), jax.random.key(0))


def initial_meta(cfg: Config):
    """The start of meta-training, ``cfg.optimizer.init`` for this run's model (ψ₀ for L3RS). Only the model's layer
    paths and shapes matter; no model compute is done."""
    shapes = model_shapes(cfg)
    return cfg.optimizer.init(shapes["params"], jax.random.key(cfg.run.seed))


class _Slot(NamedTuple):
    """How a runner evaluates one task source: sample from ``dist`` over ``pool`` (labels suffice), run ``loop``
    from ``variables0`` (None: the loop's own θ0) with the task's indices shifted by ``offset`` into the loop's
    merged pool and padded to ``rows`` batch rows (:func:`l3rs.meta.mixture.place_task`)."""

    dist: TaskDistribution
    pool: Any
    loop: InnerLoop
    variables0: Any
    offset: tuple[int, int]
    rows: int


class TaskRunner:
    """Evaluates candidate meta-parameter vectors (ψ for L3RS) on meta-training tasks.

    Args:
      cfg: the validated run config.
      stage: which task distribution ("meta_train" during meta-training).
      vmap_candidates: evaluate the candidates of one call together with ``vmap`` (else one after another; on CPU
        one after another was as fast, environment.md).
    """

    def __init__(self, cfg: Config, stage: str = "meta_train", *, vmap_candidates: bool = False) -> None:
        start = time.perf_counter()
        self.cfg = cfg
        self.sources = task_sources(cfg)  # () unless the config declares a task mixture ([[task.sources]])
        if self.sources:
            self._init_mixture(stage, vmap_candidates)
            self.setup_seconds = time.perf_counter() - start
            return
        self.dist = task_distribution(cfg, stage)
        self.pool = load_task_pool(self.dist)
        variables0, self.theta0_meta = load_theta0(cfg)
        self.meta_template = initial_meta(cfg)
        self.vmap_candidates = vmap_candidates
        self.loop = InnerLoop(
            model_for(cfg),
            variables0,
            self.pool,
            learned_optimizer_fn(cfg.optimizer, self.meta_template),
            num_classes=cfg.task.num_classes,
            train_scope=cfg.task.train_scope,
            vmap_candidates=vmap_candidates,
            head=cfg.model.head,
        )
        self.loops = [self.loop]
        self._slots = [_Slot(self.dist, self.pool, self.loop, None, (0, 0), cfg.task.k_max)]
        self.setup_seconds = time.perf_counter() - start

    def _init_mixture(self, stage: str, vmap_candidates: bool) -> None:
        """Every source's task pool and θ0, and one inner loop per distinct :func:`l3rs.meta.mixture.loop_key`
        (the sources of a key share it: their pools merged, θ0 passed per call)."""
        cfg = self.cfg
        self.meta_template = initial_meta(cfg)
        self.vmap_candidates = vmap_candidates
        dists = [task_distribution(s.config, stage) for s in self.sources]
        pools = [load_task_pool(d) for d in dists]
        theta0s, metas = [], []
        for s in self.sources:
            variables0, meta = load_theta0(s.config, field=f"task.sources[{s.index}].checkpoint")
            variables0 = with_task_head(variables0, s.config.task.num_classes, s.config.model.head)
            theta0s.append(jax.device_put(variables0))
            metas.append(meta)
        self.theta0_meta = metas[0]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for s in self.sources:
            groups.setdefault(loop_key(s.config), []).append(s.index)
        self.loops = []
        slots: list[_Slot | None] = [None] * len(self.sources)
        for members in groups.values():
            first = self.sources[members[0]].config
            pool, offsets = merge_pools([pools[i] for i in members])
            rows = max(dists[i].k_max for i in members)
            loop = InnerLoop(
                model_for(first),
                theta0s[members[0]],
                pool,
                learned_optimizer_fn(cfg.optimizer, self.meta_template),
                num_classes=first.task.num_classes,
                train_scope=first.task.train_scope,
                vmap_candidates=vmap_candidates,
                head=first.model.head,
            )
            self.loops.append(loop)
            for i, offset in zip(members, offsets, strict=True):
                # The loop holds the images on its device; tasks are sampled from the labels alone.
                slots[i] = _Slot(dists[i], labels_only(pools[i]), loop, theta0s[i], offset, rows)
            del pool
        self._slots = [slot for slot in slots if slot is not None]
        self.dist, self.pool, self.loop = dists[0], self._slots[0].pool, self._slots[0].loop

    @property
    def compiles(self) -> int:
        """Traces of this runner's inner loops so far (each loop compiles on its first task)."""
        return sum(loop.compiles for loop in self.loops)

    def evaluate(self, candidates: np.ndarray, task_seed: int, source: int = 0) -> dict[str, Any]:
        """Runs every candidate (rows of ``candidates``) on the task with ``task_seed`` of task source ``source``
        (an index into ``task.sources``; 0 for a run without a mixture, whose one distribution it is).

        Returns ``loss`` and ``accuracy`` arrays (one entry per candidate; a diverged candidate gives a non-finite
        loss, which NES ranks worst), the task's ``num_steps`` and the wall time.
        """
        start = time.perf_counter()
        if not 0 <= source < len(self._slots):
            raise ValueError(f"source: {source} is not a task source of this run (it has {len(self._slots)}).")
        dist, pool, loop, variables0, offset, rows = self._slots[source]
        candidates = np.asarray(candidates, np.float32)
        task = sample_task(task_seed, dist, pool)
        if variables0 is not None:  # a mixture's source: its place in the loop's merged pool, and its θ0
            task = place_task(task, offset, rows)
        if self.vmap_candidates:
            out = loop(candidates, task, variables0=variables0)
            losses, accs = out["loss"], out["accuracy"]
        else:
            outs = [loop.run_arrays(c, task, variables0=variables0) for c in candidates]  # dispatch all, then wait
            outs = jax.device_get(outs)
            losses = np.asarray([o["loss"] for o in outs])
            accs = np.asarray([o["accuracy"] for o in outs])
        return {
            "loss": np.asarray(losses, np.float64),
            "accuracy": np.asarray(accs, np.float64),
            "num_steps": task.num_steps,
            "seconds": time.perf_counter() - start,
        }
