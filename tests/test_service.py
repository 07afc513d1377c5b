"""The meta-training service end to end on a real local Ray cluster (``ray.cluster_utils.Cluster``, logical GPUs).

Every run here is the same tiny meta-training run (small CNN from a seeded random init, 3-way digits tasks, NES with
population 4 and meta-batch 2): undisturbed, with a worker process killed mid-generation, with a node removed
mid-run, with a node added mid-run, and with the driver stopped and resumed. Each must end with a ψ bit-identical to
the undisturbed run (design.md, "Deterministic under faults"). A candidate whose loss is NaN must not break a run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from l3rs.config import Config
from l3rs.service.driver import Driver, TrainResult
from l3rs.service.worker import MetaWorker

pytestmark = pytest.mark.ray

GENERATIONS = 5


def tiny_config(storage: Any, name: str, **workers: Any) -> Config:
    return Config().replace(
        run={"name": name, "storage": str(storage), "checkpoint_every": 1, "keep_checkpoints": 0, "seed": 7},
        data={"dataset": "sklearn_digits"},
        model={"name": "small_cnn", "checkpoint": "random"},
        task={"num_classes": 3, "batch_size": 32, "eval_batch_size": 64, "k_min": 30, "k_max": 60},
        nes={"population_size": 4, "meta_batch_size": 2, "generations": GENERATIONS},
        # Logical GPUs: every worker needs one, so workers live only on the nodes the tests add.
        workers={"min_workers": 1, "max_workers": 2, "resources": {"GPU": 1.0}, "unit_timeout_s": 120.0, **workers},
        evaluate={"k_grid": [10, 30, 120]},
    )


class Background:
    """Runs ``driver.run(pool=pool)`` in a thread, so the test can disturb the cluster meanwhile."""

    def __init__(self, driver: Driver, **run_kwargs: Any) -> None:
        self.pool = driver.make_pool()
        self.result: TrainResult | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = driver.run(pool=self.pool, **run_kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in join()
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stats(self) -> dict[str, Any]:
        for _ in range(20):  # the driver thread may be changing the worker table
            try:
                return self.pool.stats()
            except RuntimeError:
                time.sleep(0.01)
        return self.pool.stats()

    def wait_for(self, predicate, timeout: float = 180.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            stats = self.stats()
            if predicate(stats):
                return stats
            if not self.thread.is_alive():
                raise AssertionError(f"the run ended before: {what}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for: {what}")

    def join(self, timeout: float = 300.0) -> TrainResult:
        self.thread.join(timeout)
        try:
            if self.thread.is_alive():
                raise AssertionError("the run did not finish")
            if self.error is not None:
                raise self.error
            assert self.result is not None
            return self.result
        finally:
            self.pool.shutdown()


def history(result: TrainResult) -> list[dict[str, Any]]:
    with open(os.path.join(result.run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cluster(ray_connected):
    """Two worker nodes with one logical GPU each (the head has CPUs only)."""
    nodes = [ray_connected.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    yield ray_connected, nodes
    for node in nodes:
        if node in ray_connected.nodes:
            ray_connected.remove_node(node)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> TrainResult:
    """The undisturbed run every other run is compared with."""
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), "reference")
    return Background(Driver(cfg, progress=False)).join()


def test_undisturbed_run_writes_history_plots_checkpoints_and_artifact(reference):
    import l3rs
    from l3rs.artifact import verify_artifact

    rows = history(reference)
    assert [r["generation"] for r in rows] == list(range(GENERATIONS))
    assert all(r["units"] == 4 and r["nonfinite_candidates"] == 0 for r in rows)
    assert os.path.getsize(os.path.join(reference.run_dir, "plots", "meta_training.png")) > 10_000
    ckpts = sorted(os.listdir(os.path.join(reference.run_dir, "checkpoints")))
    assert ckpts == [f"gen_{g:06d}.ckpt" for g in range(1, GENERATIONS + 1)]  # run.keep_checkpoints = 0: every one
    meta = verify_artifact(reference.psi_uri)
    assert meta["sha256"] == reference.psi_sha256 and meta["generations"] == GENERATIONS
    psi, _, _ = l3rs.load_psi(reference.psi_uri)
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(psi))


def test_psi_at_an_earlier_generation_is_read_from_the_runs_checkpoints(reference, tmp_path):
    """jobs/budget/psi_at_generation.py: the newest checkpoint gives the run's own artifact bit for bit; an earlier
    one gives that generation's NES mean, labelled with it; a folder that holds an artifact and a checkpoint of
    another run are refused."""
    import importlib.util

    from l3rs.artifact import verify_artifact

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "budget", "psi_at_generation.py")
    spec = importlib.util.spec_from_file_location("psi_at_generation", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    ckpts = os.path.join(reference.run_dir, "checkpoints")
    newest, earlier = (os.path.join(ckpts, f"gen_{g:06d}.ckpt") for g in (GENERATIONS, GENERATIONS - 1))
    same = job.psi_at_generation(newest, reference.psi_uri, str(tmp_path / "same"))
    assert same["sha256"] == reference.psi_sha256 and same["generations"] == GENERATIONS
    meta = job.psi_at_generation(earlier, reference.psi_uri, str(tmp_path / "earlier"))
    assert verify_artifact(str(tmp_path / "earlier"))["sha256"] == meta["sha256"] != reference.psi_sha256
    assert meta["generations"] == GENERATIONS - 1 and meta["label"] == f"L3RS (reference @ {GENERATIONS - 1})"
    assert meta["fitness_mean"] == history(reference)[GENERATIONS - 2]["fitness_mean"]
    assert meta["derived_from"]["checkpoint"] == os.path.join("checkpoints", f"gen_{GENERATIONS - 1:06d}.ckpt")
    with pytest.raises(ValueError, match="an artifact is already there"):
        job.psi_at_generation(earlier, reference.psi_uri, str(tmp_path / "same"))
    from l3rs.checkpoint import load_checkpoint, save_checkpoint

    generation, payload = load_checkpoint(earlier)
    assert payload["run_name"] == "reference"
    other = str(tmp_path / "other-run")
    save_checkpoint(other, generation, {**payload, "run_name": "other-run"})
    with pytest.raises(ValueError, match="a checkpoint of run 'other-run', the artifact is of run 'reference'"):
        job.psi_at_generation(os.path.join(other, "checkpoints", os.path.basename(earlier)), reference.psi_uri,
                              str(tmp_path / "mixed"))  # fmt: skip


def test_worker_killed_mid_generation_gives_identical_psi(cluster, reference, tmp_path):
    run = Background(Driver(tiny_config(tmp_path, "killed"), progress=False))
    stats = run.wait_for(
        lambda s: s["units_done"] >= 5 and any(w["inflight"] and w["info"] for w in s["workers"]),
        what="a worker busy in generation 2",
    )
    victim = next(w for w in stats["workers"] if w["inflight"] and w["info"])
    os.kill(victim["info"]["pid"], signal.SIGKILL)  # a real crash of the worker process
    result = run.join()
    final = run.pool.stats()
    assert final["failures"] >= 1 and final["retries"] >= 1, final
    assert result.psi_sha256 == reference.psi_sha256


def test_node_removed_mid_run_gives_identical_psi(cluster, reference, tmp_path):
    local, nodes = cluster
    extra = local.add_node(num_cpus=1, num_gpus=1)  # the one to lose; the module's two nodes stay
    run = Background(Driver(tiny_config(tmp_path, "node-removed", max_workers=3), progress=False))
    run.wait_for(lambda s: s["live_workers"] == 3 and s["units_done"] >= 4, what="3 workers and generation 1 done")
    local.remove_node(extra, allow_graceful=False)
    result = run.join()
    assert run.pool.stats()["failures"] >= 1
    assert result.psi_sha256 == reference.psi_sha256


def test_node_added_mid_run_grows_the_pool_and_gives_identical_psi(cluster, reference, tmp_path):
    local, _ = cluster
    # max_workers 3 but room for only 2 until the third GPU node joins.
    run = Background(Driver(tiny_config(tmp_path, "node-added", max_workers=3), progress=False))
    joined = threading.Event()
    pool_run = run.pool.run

    def run_after_join(units, method="run"):
        # Generations here last well under a second, less than a new worker needs to start (import JAX, load data):
        # let the pool finish starting the workers there is room for before each generation, 2 before the node joins
        # and 3 after (without the first wait, generation 1 could finish on one worker while the second still starts).
        run.pool.warm_up(3 if joined.is_set() else 2, timeout_s=120)
        return pool_run(units, method)

    run.pool.run = run_after_join
    run.wait_for(lambda s: s["live_workers"] == 2 and s["units_done"] >= 1, what="2 workers running")
    node = local.add_node(num_cpus=1, num_gpus=1)
    joined.set()
    try:
        result = run.join()
        live = [r["live_workers"] for r in history(result)]
        assert live[0] == 2 and live[-1] == 3, live
        stats = run.pool.stats()
        # 3 workers, no more: one started for each worker lost (none, unless this machine's Ray lost one).
        assert stats["workers_started"] - stats["failures"] == 3, stats
        assert result.psi_sha256 == reference.psi_sha256
    finally:
        local.remove_node(node)


def test_driver_stopped_and_resumed_gives_identical_psi(cluster, reference, tmp_path):
    cfg = tiny_config(tmp_path, "resumed")
    first = Background(Driver(cfg, progress=False), stop_after=2).join()
    assert first.generations == 2
    # A fresh driver (as after a crash of the job) finds the checkpoint and goes on.
    second = Background(Driver(cfg, progress=False)).join()
    assert second.generations == GENERATIONS
    assert [r["generation"] for r in history(second)] == list(range(GENERATIONS))
    assert second.psi_sha256 == reference.psi_sha256


def test_corrupt_last_checkpoint_is_skipped_on_resume(cluster, reference, tmp_path, caplog):
    cfg = tiny_config(tmp_path, "corrupt")
    Background(Driver(cfg, progress=False), stop_after=3).join()
    ckpt_dir = os.path.join(str(tmp_path), "corrupt", "checkpoints")
    last = sorted(os.listdir(ckpt_dir))[-1]
    with open(os.path.join(ckpt_dir, last), "r+b") as f:  # flip bytes in the middle of the newest checkpoint
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00garbage\x00")
    with caplog.at_level("WARNING"):
        result = Background(Driver(cfg, progress=False)).join()
    assert any("corrupt" in r.getMessage().lower() or "skip" in r.getMessage().lower() for r in caplog.records)
    assert result.psi_sha256 == reference.psi_sha256


class PoisonWorker(MetaWorker):
    """A worker whose '+' candidate diverges (NaN loss) on every task with an even seed."""

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        out = super().run(payload)
        if payload["task_seed"] % 2 == 0:
            out["loss"] = out["loss"].copy()
            out["loss"][0] = np.nan
        return out


def test_nan_candidates_rank_worst_and_do_not_break_the_run(cluster, tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    driver = Driver(tiny_config(tmp_path, "nan"), progress=False)
    pool = driver.make_pool()
    pool_cls = type(pool)
    poisoned = pool_cls(PoisonWorker, args=pool.args, resources=pool.resources, min_workers=1, max_workers=2,
                        unit_timeout_s=120.0, max_unit_retries=2)  # fmt: skip
    pool.shutdown()
    try:
        result = driver.run(pool=poisoned)
    finally:
        poisoned.shutdown()
    rows = history(result)
    assert sum(r["nonfinite_candidates"] for r in rows) > 0
    assert all(np.isfinite(r["grad_norm"]) for r in rows)
    import jax

    import l3rs

    psi, _, _ = l3rs.load_psi(result.psi_uri)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(psi))


def test_weight_decay_toward_psi0_pulls_the_run_toward_its_start(cluster, tmp_path):
    """``nes.weight_decay_toward = "psi0"``: the driver passes ψ₀ as NES's anchor. With weight_decay · learning_rate =
    1, one generation gives ψ₁ = ψ₀ + α (m̂/(√v̂ + ε) − 1/α · (ψ₀ − ψ₀)) = ψ₀ + α · sign(g) (Adam's first step), within
    α of ψ₀ everywhere; decay toward the origin would give ψ₁ = α · sign(g), nowhere near ψ₀."""
    import l3rs
    from l3rs.meta.runner import initial_meta

    lr = 0.02
    cfg = tiny_config(tmp_path, "anchor").replace(
        nes={"generations": 1, "learning_rate": lr, "weight_decay": 1 / lr, "weight_decay_toward": "psi0"}
    )
    result = Background(Driver(cfg, progress=False)).join()
    start = np.asarray(l3rs.meta_to_vector(initial_meta(cfg)))
    trained = np.asarray(l3rs.meta_to_vector(l3rs.load_psi(result.psi_uri)[0]))
    assert 0 < np.abs(trained - start).max() <= lr * (1 + 1e-5)
    assert np.abs(start).max() > 10 * lr  # so the origin's pull would have shown


@pytest.mark.parametrize("family", ["fc_lopt", "velo"])
def test_other_learned_optimizer_families_meta_train_through_the_same_service(cluster, tmp_path, family):
    """Issue 5/6: FC-LOpt and VeLO (ft) are meta-trained by the same driver, pool and workers as L3RS; their artifact
    says which family it holds, loads as an optax optimizer and moved away from ψ₀."""
    import jax
    import jax.numpy as jnp

    import l3rs
    from l3rs.meta.runner import initial_meta
    from l3rs.models import create, init_variables

    cfg = tiny_config(tmp_path, f"family-{family}").replace(nes={"generations": 2}, optimizer={"family": family})
    result = Background(Driver(cfg, progress=False)).join()
    rows = history(result)
    assert [r["generation"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["fitness_mean"]) and r["nonfinite_candidates"] == 0 for r in rows)
    psi, config, meta = l3rs.load_psi(result.psi_uri)
    assert config.family == family and meta["optimizer"]["family"] == family
    start = np.asarray(l3rs.meta_to_vector(initial_meta(cfg)))
    trained = np.asarray(l3rs.meta_to_vector(psi))
    assert trained.shape == start.shape and np.abs(trained - start).max() > 0
    params = init_variables(create("small_cnn", num_classes=3), jax.random.key(0), (16, 16, 1))["params"]
    tx = l3rs.load(result.psi_uri, total_steps=40, params=params)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params, value=jnp.float32(1.1))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
