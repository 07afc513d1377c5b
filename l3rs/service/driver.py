"""The meta-training driver (the Ray job entrypoint, ``l3rs train``).

It holds the NES state in numpy and, every generation:

1. puts the NES mean in Ray's object store once; the candidates are never built here: a worker rebuilds its
   antithetic pair from the mean and the pair's noise coordinates (noise is a pure function of (seed, generation,
   pair), ``l3rs.meta.nes``), so the driver's memory is O(dim ψ) at any population;
2. makes work units ``(generation, pair, task)``: both members of an antithetic pair on the same task (common random
   numbers), every pair on every task of the meta-batch; cost hint = the task's K, so units go longest first;
3. runs them on the elastic worker pool; the generation completes only when every unit has a result, keyed by
   unit, so which worker ran a unit, or how often it was retried, cannot change the outcome;
4. fitness of a candidate = −mean eval loss over the meta-batch (paper §2; NaN ranks worst; ``nes.fitness``), NES
   step. A task mixture (``[[task.sources]]``, :mod:`l3rs.meta.mixture`) draws each meta-batch slot's source from
   its own seed stream; its units carry the source;
5. writes history, metrics, plots, and every ``checkpoint_every`` generations an atomic checkpoint and the ψ artifact.

A run is ``<storage>/<run name>/``; starting ``l3rs train`` again with the same name resumes from its last good
checkpoint, and ends with a ψ bit-identical to an undisturbed run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.checkpoint import load_latest_checkpoint, save_checkpoint
from l3rs.config import Config
from l3rs.meta import mixture, nes
from l3rs.meta.runner import initial_meta, task_distribution
from l3rs.meta.tasks import task_header, task_seed
from l3rs.names import display_uri

__all__ = ["Driver", "TrainResult", "make_units", "resolve_paths", "run_dir_for"]

log = logging.getLogger("l3rs.driver")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: str
    psi_uri: str
    generations: int
    history: list[dict[str, Any]]
    psi_sha256: str


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve_paths(cfg: Config) -> Config:
    """Makes local relative paths absolute, so workers (other processes, other cwd) see the same files."""
    import os

    def absolute(uri: str) -> str:
        if uri == "random" or not _is_local(uri) or uri.startswith("file://"):
            return uri
        return os.path.abspath(os.path.expanduser(uri))

    def source(s: dict) -> dict:  # a task-mixture source's own checkpoint and data cache
        return {**s, **{k: absolute(s[k]) for k in ("checkpoint", "cache") if s.get(k)}}

    sources = tuple(source(s) for s in cfg.task.sources)
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, storage=absolute(cfg.run.storage)),
        model=dataclasses.replace(cfg.model, checkpoint=absolute(cfg.model.checkpoint)),
        pretrain=dataclasses.replace(cfg.pretrain, output=absolute(cfg.pretrain.output)),
        **({"task": dataclasses.replace(cfg.task, sources=sources)} if sources else {}),
        data=dataclasses.replace(cfg.data, cache=absolute(cfg.data.cache)) if cfg.data.cache else cfg.data,
    )


def run_dir_for(cfg: Config) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def make_units(
    nes_cfg: nes.NESConfig,
    generation: int,
    seed: int,
    mean_ref: Any,
    task_seeds: list[int],
    costs: list[float],
    sources: list[int] | None = None,
) -> list[Any]:
    """One unit per (antithetic pair, task). A unit carries no ψ vector, only how to rebuild its pair
    (:func:`l3rs.meta.nes.pair_candidates`): ``mean`` (the generation's mean, put in Ray's object store once per
    generation by the driver: ``mean_ref``), ``sigma``, ``noise``, ``noise_seed``, ``generation``, ``pair``, and
    the ``task_seed``. So dispatch costs O(1) bytes per unit whatever the size of ψ (issue 14). In a task mixture,
    ``sources[j]`` (:func:`l3rs.meta.mixture.slot_sources`) is the task source of slot j, carried as ``source``."""
    from l3rs.service.pool import WorkUnit

    sigma = nes.sigma_at(nes_cfg, generation)
    units = []
    for i in range(nes_cfg.num_pairs):
        for j, (ts, cost) in enumerate(zip(task_seeds, costs, strict=True)):
            payload = {"mean": mean_ref, "sigma": sigma, "noise": nes_cfg.noise, "noise_seed": seed,
                       "generation": generation, "pair": i, "task_seed": ts}  # fmt: skip
            if sources is not None:
                payload["source"] = int(sources[j])
            units.append(WorkUnit(key=(generation, i, j), payload=payload, cost=float(cost)))
    return units


class Driver:
    """Runs (or resumes) one meta-training run on the connected Ray cluster.

    Args:
      cfg: the validated config.
      progress: show a progress bar when attached to a terminal (one log line per generation always).
    """

    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        self.cfg = resolve_paths(cfg)
        self.run_dir = run_dir_for(self.cfg)
        self.progress = progress
        self.nes_cfg = self.cfg.nes.nes_config()
        self.dist = task_distribution(self.cfg)
        self.sources = mixture.task_sources(self.cfg)  # () unless [[task.sources]]: a task mixture
        self.source_dists = [task_distribution(s.config) for s in self.sources]
        # Progress, for the line a stopped run prints (l3rs.cli): generations completed, and those in the newest
        # checkpoint (None: no checkpoint yet; a rerun starts from the beginning).
        self.generation = 0
        self.checkpoint_generation: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    def _prepare_run_dir(self, check_cluster: bool = False) -> None:
        """Refuses bad storage, a missing θ0, an incompatible resume or (``check_cluster``, when Ray is connected) a
        worker shape no node can ever hold, before anything is written; then records the config."""
        from l3rs.service import preflight

        preflight.check_run(self.cfg, self.run_dir)
        import ray

        if check_cluster and ray.is_initialized():  # on the cluster: fail now, not after workers.placement_timeout_s
            nodes, node_types, autoscaling = preflight.cluster_capacity()
            preflight.check_resources(
                dict(self.cfg.workers.resources), nodes, node_types=node_types, autoscaling=autoscaling
            )
        storage.makedirs(self.run_dir)
        config_uri = storage.join(self.run_dir, "config.json")
        current = json.loads(json.dumps(self.cfg.to_dict()))  # as saved: tuples become lists
        storage.write_bytes_atomic(config_uri, json.dumps(current, indent=2).encode())

    def _load_or_init(self, mean0: np.ndarray) -> tuple[nes.NESState, list[dict[str, Any]]]:
        found = load_latest_checkpoint(self.run_dir)
        if found is None:
            return nes.init(self.nes_cfg, mean0), []
        generation, payload = found
        state = nes.state_from_dict(payload["nes"])
        history = json.loads(payload.get("history", "[]"))
        history = [h for h in history if h["generation"] < state.generation]
        log.info("resuming %s from checkpoint at generation %d", self.run_dir, state.generation)
        return state, history

    def _save_checkpoint(self, state: nes.NESState, history: list[dict[str, Any]]) -> None:
        save_checkpoint(
            self.run_dir,
            state.generation,
            # the run's name: a ψ read from this checkpoint later (jobs/budget/psi_at_generation.py) can be checked
            # against the artifact of the same run
            {"nes": nes.state_to_dict(state), "history": json.dumps(history), "run_name": self.cfg.run.name},
            keep_last=self.cfg.run.keep_checkpoints or None,  # 0: every one
        )

    def _write_outputs(self, state: nes.NESState, history: list[dict[str, Any]], template) -> dict[str, Any]:
        from l3rs.artifact import save_artifact
        from l3rs.optim import vector_to_meta
        from l3rs.plots import plot_meta_training

        body = "".join(json.dumps(h) + "\n" for h in history)
        storage.write_bytes_atomic(storage.join(self.run_dir, "history.jsonl"), body.encode())
        if history:
            plot_meta_training(history, storage.join(self.run_dir, "plots", "meta_training.png"), self.cfg.run.name)
        psi = vector_to_meta(state.mean, template)
        last = history[-1] if history else {}
        return save_artifact(
            storage.join(self.run_dir, "psi"),
            psi,
            self.cfg.optimizer,
            {
                "run_name": self.cfg.run.name,
                "model": self.cfg.model.name,
                "model_options": dict(self.cfg.model.options),
                "model_head": self.cfg.model.head,
                # named relative to the run storage, never by this machine's absolute path (l3rs.names)
                "model_checkpoint": display_uri(self.cfg.model.checkpoint, root=self.cfg.run.storage),
                "dataset": self.cfg.data.dataset,
                "classes": {
                    k: list(getattr(self.cfg.data.spec(), f"{k}_classes"))
                    for k in ("pretrain", "meta_train", "meta_test")
                },
                "splits": {"train": self.cfg.data.spec().train_split, "valid": self.cfg.data.spec().valid_split},
                "num_classes": self.cfg.task.num_classes,
                "k_range": [self.cfg.task.k_min, self.cfg.task.k_max],
                "train_scope": self.cfg.task.train_scope,
                "generations": int(state.generation),
                "fitness_mean": last.get("fitness_mean"),
                "accuracy_mean": last.get("accuracy_mean"),
                "nes": dataclasses.asdict(self.cfg.nes),
                "seed": self.cfg.run.seed,
                **({"task_sources": self._sources_meta()} if self.sources else {}),
            },
        )

    def _sources_meta(self) -> list[dict[str, Any]]:
        """What the artifact records of a task mixture: each source's data, classes, θ0, task shape and weight."""
        return [
            {
                "name": s.name,
                "weight": s.weight,
                "dataset": s.config.data.dataset,
                "meta_train_classes": list(s.config.data.spec().meta_train_classes),
                "model_checkpoint": display_uri(s.config.model.checkpoint, root=self.cfg.run.storage),
                "num_classes": s.config.task.num_classes,
                "k_range": [s.config.task.k_min, s.config.task.k_max],
                "batch_size": s.config.task.batch_size,
                "eval_batch_size": s.config.task.eval_batch_size,
            }
            for s in self.sources
        ]

    def slot_sources(self, generation: int) -> list[int] | None:
        """The task source of each meta-batch slot of ``generation`` (None: no task mixture)."""
        if not self.sources:
            return None
        weights = [s.weight for s in self.sources]
        return mixture.slot_sources(self.cfg.run.seed, generation, self.cfg.nes.meta_batch_size, weights)

    def _units(self, generation: int, mean_ref: Any) -> list[Any]:
        b = self.cfg.nes.meta_batch_size
        seeds = [task_seed(self.cfg.run.seed, generation, j) for j in range(b)]
        sources = self.slot_sources(generation)
        if sources is None:
            costs = [task_header(s, self.dist)[1] for s in seeds]
        else:
            costs = [task_header(s, self.source_dists[src])[1] for s, src in zip(seeds, sources, strict=True)]
        return make_units(self.nes_cfg, generation, self.cfg.run.seed, mean_ref, seeds, costs, sources)

    def _source_stats(self, sources: list[int], losses: np.ndarray, accs: np.ndarray) -> dict[str, Any]:
        out = {}
        for s in self.sources:
            cols = [j for j, src in enumerate(sources) if src == s.index]
            with np.errstate(invalid="ignore"):
                loss = float(np.nanmean(losses[:, cols])) if cols and np.isfinite(losses[:, cols]).any() else None
                acc = float(np.nanmean(accs[:, cols])) if cols and np.isfinite(accs[:, cols]).any() else None
            out[s.name] = {"tasks": len(cols), "loss_mean": loss, "accuracy_mean": acc}
        return out

    def make_pool(self) -> Any:
        """The elastic pool of :class:`~l3rs.service.worker.MetaWorker` actors this run's config asks for."""
        from l3rs.service.pool import ElasticPool
        from l3rs.service.worker import MetaWorker, worker_env

        w = self.cfg.workers
        return ElasticPool(
            MetaWorker,
            args=(self.cfg.to_dict(),),
            resources=dict(w.resources),
            min_workers=w.min_workers,
            max_workers=w.max_workers,
            unit_timeout_s=w.unit_timeout_s,
            max_unit_retries=w.max_unit_retries,
            placement_timeout_s=w.placement_timeout_s,
            env_vars=worker_env(dict(w.resources)),
            name=f"{self.cfg.run.name}-workers",
            actor_name_prefix=f"l3rs:{self.cfg.run.name}:worker-",  # dashboard: Actors tells runs apart
        )

    # ------------------------------------------------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None, pool: Any = None) -> TrainResult:
        """Runs until ``nes.generations`` (or ``stop_after`` more generations: for tests of driver restarts).

        ``pool``: an existing :class:`ElasticPool` to use (tests share one); by default one is made and shut down.
        """
        from l3rs.optim import meta_to_vector
        from l3rs.service.metrics import RunMetrics

        own_pool = pool is None
        self._prepare_run_dir(check_cluster=own_pool)
        template = initial_meta(self.cfg)
        psi0 = np.asarray(meta_to_vector(template), dtype=np.float32)  # a pure function of the config and run.seed
        state, history = self._load_or_init(psi0)
        anchor = psi0 if self.cfg.nes.weight_decay_toward == "psi0" else None  # where nes.weight_decay pulls ψ
        self.generation = int(state.generation)
        self.checkpoint_generation = int(state.generation) if state.generation else None
        total = self.cfg.nes.generations
        end = total if stop_after is None else min(total, state.generation + stop_after)
        metrics = RunMetrics(self.cfg.run.name, generation=state.generation)
        if own_pool:
            pool = self.make_pool()
        bar = None
        meta: dict[str, Any] | None = None  # of the artifact last written
        if self.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=state.generation, desc=f"meta-train {self.cfg.run.name}", unit="gen")
        try:
            while state.generation < end:
                gen = state.generation
                start = time.perf_counter()
                import ray

                mean_ref = ray.put(state.mean)  # ψ shipped once per generation; units carry its ref and seeds
                units = self._units(gen, mean_ref)
                results = pool.run(units, method="run")
                pop, b = self.nes_cfg.population_size, self.cfg.nes.meta_batch_size
                losses = np.full((pop, b), np.nan)
                accs = np.full((pop, b), np.nan)
                for (g, i, j), r in results.items():
                    assert g == gen
                    losses[2 * i : 2 * i + 2, j] = r["loss"]
                    accs[2 * i : 2 * i + 2, j] = r["accuracy"]
                # Fitness = −mean eval loss over the meta-batch (paper §2), or with nes.fitness = "log_loss" −mean log
                # eval loss (scale-free across task sources, l3rs.meta.mixture). NaN/inf ⇒ ranked worst by NES.
                fitness = mixture.fitness(losses, self.cfg.nes.fitness)
                state, info = nes.tell_seeded(self.nes_cfg, state, self.cfg.run.seed, fitness, anchor=anchor)  # O(D)
                self.generation = int(state.generation)
                seconds = time.perf_counter() - start
                stats = pool.stats()
                row = {
                    "generation": gen,  # 0-based index of this generation
                    "generations_completed": gen + 1,  # the N of "gen N/T" and of the l3rs_generation gauge
                    "fitness_mean": float(np.nanmean(fitness)) if np.isfinite(fitness).any() else None,
                    "fitness_best": float(np.nanmax(fitness)) if np.isfinite(fitness).any() else None,
                    "accuracy_mean": float(np.nanmean(accs)),
                    "nonfinite_candidates": int((~np.isfinite(fitness)).sum()),
                    "sigma": float(info["sigma"]),
                    "meta_lr": float(info["learning_rate"]),
                    "grad_norm": float(info["grad_norm"]),
                    "mean_k": float(np.mean([u.cost for u in units])),
                    "seconds": round(seconds, 3),
                    "units": len(units),
                    "units_per_s": len(units) / seconds,
                    "live_workers": stats["live_workers"],
                    "retries": stats["retries"],
                    "worker_failures": stats["failures"],
                }
                if self.sources:  # per source: how many slots drew it, and its mean eval loss and accuracy
                    row["sources"] = self._source_stats(self.slot_sources(gen), losses, accs)
                history.append(row)
                metrics.set(
                    generation=row["generations_completed"],
                    fitness_mean=row["fitness_mean"] if row["fitness_mean"] is not None else float("nan"),
                    fitness_best=row["fitness_best"] if row["fitness_best"] is not None else float("nan"),
                    eval_accuracy=row["accuracy_mean"],
                    sigma=row["sigma"],
                    meta_lr=row["meta_lr"],
                    live_workers=row["live_workers"],
                    units_per_s=row["units_per_s"],
                )
                metrics.count("unit_retries", stats["retries"])
                metrics.count("worker_failures", stats["failures"])
                metrics.count("units_done", stats["units_done"])
                line = (
                    f"[{self.cfg.run.name}] gen {gen + 1}/{total} fitness {row['fitness_mean']:.4f} "
                    f"(best {row['fitness_best']:.4f}) acc {100 * row['accuracy_mean']:.1f}% σ {row['sigma']:.4g} "
                    f"lr {row['meta_lr']:.4g} | {seconds:.1f}s, {row['units_per_s']:.2f} units/s, "
                    f"{row['live_workers']} workers, {row['retries']} retries"
                    if row["fitness_mean"] is not None
                    else f"[{self.cfg.run.name}] gen {gen + 1}/{total}: every candidate diverged"
                )
                if bar is not None:
                    bar.update(1)
                    if row["fitness_mean"] is not None:
                        bar.set_postfix(fitness=f"{row['fitness_mean']:.4f}", acc=f"{100 * row['accuracy_mean']:.1f}%")
                    bar.write(line)
                else:
                    print(line, flush=True)
                done = state.generation == total
                if state.generation % self.cfg.run.checkpoint_every == 0 or done or state.generation == end:
                    self._save_checkpoint(state, history)
                    self.checkpoint_generation = int(state.generation)
                    meta = self._write_outputs(state, history, template)
        finally:
            if bar is not None:
                bar.close()
            if own_pool:
                pool.shutdown()
        if meta is None:  # nothing ran (the run was already complete): the outputs of its last state
            meta = self._write_outputs(state, history, template)
        return TrainResult(
            run_dir=self.run_dir,
            psi_uri=storage.join(self.run_dir, "psi"),
            generations=int(state.generation),
            history=history,
            psi_sha256=meta["sha256"],
        )
