"""Meta-training on a task mixture (issue 11, part 2; ``l3rs.meta.mixture``, ``[[task.sources]]``).

- Bad ``[[task.sources]]`` entries are refused with one line naming ``task.sources[i].<field>``.
- Which source a meta-batch slot draws is a pure function of (seed, generation, slot, weights) and follows the weights.
- A run without sources is today's run; a one-source mixture equal to [data]/[model]/[task] gives bit-identical losses.
- A worker holds every source and compiles one inner loop per distinct shape; a source sharing another's loop (θ0
  passed per call, pools merged) gives the losses it gives alone.
- A real 2-source run on the local Ray cluster: units follow the slots' sources, the history reports each source, and a
  run stopped and resumed ends with the ψ of an uninterrupted one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from l3rs.config import Config, ConfigError, config_from_dict, load_config
from l3rs.meta import mixture

TINY_TASK = {"num_classes": 3, "batch_size": 16, "eval_batch_size": 24, "k_min": 4, "k_max": 8}


def tiny_config(storage: str = "runs", name: str = "mix", sources: list | None = None, **sections) -> Config:
    """sklearn_digits 3-way from a random θ0 (the plain run), optionally with task sources."""
    task = dict(TINY_TASK, **({"sources": sources} if sources is not None else {}))
    base = {
        "run": {"name": name, "storage": storage, "checkpoint_every": 1, "seed": 3},
        "data": {"dataset": "sklearn_digits"},
        "model": {"name": "small_cnn", "checkpoint": "random", "options": {"features": [8]}},
        "task": task,
        "nes": {"population_size": 4, "meta_batch_size": 2, "generations": 2},
        "evaluate": {"k_grid": [4, 20]},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return Config().replace(**base)


GLYPHS = {"name": "glyphs", "dataset": "glyphs/small", "num_classes": 5, "weight": 2.0}
DIGITS = {"name": "digits", "dataset": "sklearn_digits", "num_classes": 3, "k_max": 6}


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"weight": 0}, "task.sources[1].weight: must be > 0"),
        ({"weight": -1.5}, "task.sources[1].weight: must be > 0"),
        ({"weight": "heavy"}, "task.sources[1].weight: expected float"),
        ({"colour": "red"}, "task.sources[1].colour: unknown field"),
        ({"num_classes": "5"}, "task.sources[1].num_classes: expected int"),
        ({"dataset": "no_such_dataset_xyz"}, "task.sources[1].dataset:"),
        ({"classes": {"meta_train": [3, 99]}}, "task.sources[1].classes.meta_train:"),
        ({"num_classes": 8}, "task.sources[1].num_classes:"),
        ({"k_min": 9, "k_max": 5}, "task.sources[1].k_min:"),
        ({"batch_size": 0}, "task.sources[1].batch_size: must be a positive number"),
        ({"image_size": "big"}, "task.sources[1].image_size:"),
        ({"name": "glyphs"}, "task.sources[1].name: 'glyphs' is also the name of task.sources[0]"),
        ({"checkpoint": 3}, "task.sources[1].checkpoint: expected str"),
    ],
)
def test_bad_source_fields_are_named(source, field):
    with pytest.raises(ConfigError) as e:
        tiny_config(sources=[GLYPHS, {"name": "second", **source}])
    message = str(e.value)
    assert message.startswith(field), message
    assert "\n" not in message


def test_bad_sources_table_and_fitness_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.sources: expected an array of tables"):
        tiny_config(sources={"dataset": "glyphs"})
    with pytest.raises(ConfigError, match=r"^task\.sources\[0\]: expected a table"):
        tiny_config(sources=["glyphs"])
    with pytest.raises(ConfigError, match=r'^nes\.fitness: must be "loss" or "log_loss"'):
        tiny_config(nes={"fitness": "accuracy"})
    # From TOML, as a user writes it: an array of tables.
    path = tmp_path / "mix.toml"
    path.write_text(
        '[task]\nnum_classes = 3\n[[task.sources]]\ndataset = "sklearn_digits"\nweight = 1\n'
        '[[task.sources]]\ndataset = "glyphs/small"\nweight = 0.0\n'
    )
    with pytest.raises(ConfigError, match=r"^task\.sources\[1\]\.weight: must be > 0, got 0\.0"):
        load_config(path)


def test_sources_inherit_the_run_sections_and_override_their_own_fields(tmp_path):
    cfg = tiny_config(sources=[{"k_max": 6, "weight": 3}, {**GLYPHS, "checkpoint": "somewhere"}])
    sources = mixture.task_sources(cfg)
    assert [(s.index, s.name, s.weight) for s in sources] == [(0, "data", 3.0), (1, "glyphs", 2.0)]
    first, second = (s.config for s in sources)
    # No dataset: [data] as it is, [task] with the source's k_max, model.checkpoint unchanged, no sources of its own.
    assert first.data == cfg.data and first.model == cfg.model and first.task.sources == ()
    assert (first.task.k_min, first.task.k_max, first.task.num_classes) == (4, 6, 3)
    # Its own dataset: that dataset's own spec (none of [data]'s fields), its N-way and θ0.
    assert second.data.dataset == "glyphs/small" and second.data.spec().num_classes == 24
    assert (second.task.num_classes, second.task.k_max, second.model.checkpoint) == (5, 8, "somewhere")
    assert mixture.loop_key(first) != mixture.loop_key(second)  # 16x16 digits vs 28x28 glyphs
    assert mixture.task_sources(tiny_config()) == ()
    # The saved config round-trips (what a worker and a resume read back); resuming with other sources is refused.
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    from l3rs.service.preflight import resume_differences

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    assert resume_differences(tiny_config(), str(run_dir)) == []
    assert [d[0] for d in resume_differences(cfg, str(run_dir))] == ["task.sources"]


# ----------------------------------------------------------------------------------------------------------------
def test_slot_sources_are_deterministic_and_follow_the_weights():
    weights = [3.0, 1.0, 1.0]
    draws = np.asarray([mixture.slot_sources(11, g, 8, weights) for g in range(2500)])  # 20,000 slots
    again = np.asarray([[mixture.slot_source(11, g, j, weights) for j in range(8)] for g in range(2500)])
    assert np.array_equal(draws, again)
    freq = np.bincount(draws.ravel(), minlength=3) / draws.size
    # Binomial standard error at n = 20,000 is <= 0.0035; 0.015 is > 4 of them.
    np.testing.assert_allclose(freq, [0.6, 0.2, 0.2], atol=0.015)
    # Another seed is another draw; the slot draw is not the same for every slot of a generation.
    other = np.asarray([mixture.slot_sources(12, g, 8, weights) for g in range(50)])
    assert not np.array_equal(other, draws[:50])
    assert len({tuple(r) for r in draws[:50]}) > 10
    assert mixture.slot_sources(11, 0, 5, [7.0]) == [0] * 5
    for bad in ([], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            mixture.slot_source(0, 0, 0, bad)


def test_log_loss_fitness_is_scale_free_and_nan_ranks_worst():
    rng = np.random.default_rng(0)
    losses = np.exp(rng.normal(size=(8, 3))) * np.asarray([0.01, 1.0, 30.0])  # three loss scales
    np.testing.assert_array_equal(mixture.fitness(losses, "loss"), -losses.mean(axis=1))
    f = mixture.fitness(losses, "log_loss")
    # Equal to normalising every task by a per-task reference (e.g. θ0's loss) shared by all candidates, up to a
    # constant: the same ranks for NES.
    reference = rng.uniform(0.5, 5.0, size=3)
    relative = -np.log(losses / reference).mean(axis=1)
    np.testing.assert_allclose(f - relative, (f - relative)[0], rtol=0, atol=1e-12)
    # Rescaling one task (another loss scale) leaves log_loss's ranks unchanged; with "loss" it can reorder them.
    scaled = losses * np.asarray([1.0, 1.0, 1e-3])
    assert np.array_equal(np.argsort(mixture.fitness(scaled, "log_loss")), np.argsort(f))
    losses[2, 1], losses[5, 0] = np.nan, np.inf
    losses[6, 0] = 0.0  # underflowed to 0: a very good result, not -inf
    f = mixture.fitness(losses, "log_loss")
    assert np.isnan(f[2]) and np.isnan(f[5]) and np.isfinite(np.delete(f, [2, 5])).all()
    with pytest.raises(ValueError, match="nes.fitness"):
        mixture.fitness(losses, "accuracy")


# ----------------------------------------------------------------------------------------------------------------
def _candidates(cfg: Config, count: int = 2) -> np.ndarray:
    from l3rs.meta.runner import initial_meta
    from l3rs.optim import meta_to_vector

    mean = np.asarray(meta_to_vector(initial_meta(cfg)))
    noise = np.random.default_rng(1).normal(size=(count, mean.size)).astype(np.float32)
    return mean[None] + 0.03 * noise


@pytest.fixture(scope="module")
def plain():
    """The plain run's runner (no sources) and its results on two task seeds: the reference of the mixtures."""
    from l3rs.meta.runner import TaskRunner

    cfg = tiny_config()
    runner = TaskRunner(cfg)
    cands = _candidates(cfg)
    return runner, cands, {seed: runner.evaluate(cands, seed) for seed in (5, 17)}


def _same(a: dict, b: dict) -> bool:
    return np.array_equal(a["loss"], b["loss"]) and np.array_equal(a["accuracy"], b["accuracy"])


def test_one_source_mixture_gives_the_plain_runs_losses_and_units(plain):
    from l3rs.meta.runner import TaskRunner
    from l3rs.service.driver import Driver

    runner, cands, results = plain
    mixed = tiny_config(sources=[{"weight": 1.0}])
    b = TaskRunner(mixed)
    for seed, ref in results.items():
        out = b.evaluate(cands, seed, 0)
        assert _same(ref, out) and ref["num_steps"] == out["num_steps"]
    assert runner.compiles == b.compiles == 1
    # The driver's work units: the same task seeds and costs; the plain run's payload has no "source".
    ua, ub = Driver(runner.cfg)._units(3, None), Driver(mixed)._units(3, None)
    assert [(u.key, u.cost) for u in ua] == [(u.key, u.cost) for u in ub]
    assert all({k: v for k, v in y.payload.items() if k != "source"} == x.payload for x, y in zip(ua, ub, strict=True))
    assert "source" not in ua[0].payload and {u.payload["source"] for u in ub} == {0}
    with pytest.raises(ValueError, match="source: 1"):
        runner.evaluate(cands, 5, 1)


def test_worker_holds_every_source_and_compiles_once_per_shape(plain, tmp_path):
    from flax import serialization

    from l3rs.meta.pretrain import random_variables
    from l3rs.meta.runner import TaskRunner

    runner0, cands, results = plain
    # Another θ0 of the digits model (another seed, and a 7-way head as if pretrained on 7 classes), as a flax
    # msgpack checkpoint.
    theta0 = random_variables("small_cnn", (16, 16, 1), 7, seed=99, module=runner0.cfg.model.create(7))
    ckpt = tmp_path / "theta0.msgpack"
    ckpt.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(theta0)))
    classes = {"pretrain": "4:6", "meta_train": "0:4", "meta_test": "6:10"}
    other = {
        "name": "digits-other",
        "dataset": "sklearn_digits",
        "classes": classes,
        "k_max": 12,
        "checkpoint": str(ckpt),
    }
    # "digits-other" and "data" (the plain run's own sections) share one loop (16x16, 3-way): "data" second in the
    # merged pool, its batch rows padded from 8 to 12, its θ0 passed per call (both θ0 given the 3-way head's
    # shape); glyphs (28x28, 5-way) has its own.
    cfg = tiny_config(sources=[GLYPHS, other, {"weight": 0.5}])
    runner = TaskRunner(cfg)
    assert len(runner.loops) == 2
    glyphs, digits_other = runner.evaluate(cands, 40, 0), runner.evaluate(cands, 41, 1)
    for seed, ref in results.items():  # what the plain run gives, bit for bit
        assert _same(ref, runner.evaluate(cands, seed, 2))
    assert runner.compiles == 2
    assert np.isfinite(glyphs["loss"]).all() and np.isfinite(digits_other["loss"]).all()
    assert 4 <= glyphs["num_steps"] <= 8 and 4 <= digits_other["num_steps"] <= 12


def test_preflight_names_a_sources_missing_checkpoint(tmp_path):
    from l3rs.service.preflight import PreflightError, check_checkpoint

    cfg = tiny_config(sources=[DIGITS, {**GLYPHS, "checkpoint": str(tmp_path / "nothing-here")}])
    with pytest.raises(PreflightError, match=r"^task\.sources\[1\]\.checkpoint: "):
        check_checkpoint(cfg)
    check_checkpoint(tiny_config(sources=[DIGITS, GLYPHS]))  # random θ0 everywhere: nothing to refuse


# ----------------------------------------------------------------------------------------------------------------
def test_two_source_run_on_ray_resumes_to_the_same_psi(ray_connected, tmp_path):
    from l3rs.service.driver import Driver

    # Both members of a pair in one vmapped call (candidates_per_call = 2): θ0 per call goes through vmap too.
    workers = {"min_workers": 1, "max_workers": 1, "resources": {"CPU": 1.0}, "unit_timeout_s": 120.0,
               "candidates_per_call": 2}  # fmt: skip
    # Digits resized to the glyphs' 28x28, both 3-way: one compiled loop per worker for the two sources (their pools
    # merged, digits' batch rows padded from 6 to 8).
    sources = [{**GLYPHS, "num_classes": 3}, {**DIGITS, "image_size": [28, 28]}]
    cfg = tiny_config(str(tmp_path), "mix-ref", sources=sources, workers=workers, nes={"fitness": "log_loss"})
    driver = Driver(cfg, progress=False)
    pool = driver.make_pool()  # one worker pool for the three runs (they hold the same sources)
    try:
        ref = driver.run(pool=pool)
        # Stopped after one generation, and resumed by a fresh driver (as after a crash of the job).
        resumed_cfg = cfg.replace(run={"name": "mix-resumed"})
        assert Driver(resumed_cfg, progress=False).run(stop_after=1, pool=pool).generations == 1
        resumed = Driver(resumed_cfg, progress=False).run(pool=pool)
        info = [w["info"] for w in pool.stats()["workers"] if w["info"]]
    finally:
        pool.shutdown()
    assert resumed.generations == ref.generations == 2
    assert resumed.psi_sha256 == ref.psi_sha256
    assert info and all(i["inner_loops"] == 1 for i in info)
    with open(os.path.join(ref.run_dir, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["generation"] for r in rows] == [0, 1]
    for row in rows:  # each slot went to the source the mixture drew for it
        drawn = driver.slot_sources(row["generation"])
        assert {k: v["tasks"] for k, v in row["sources"].items()} == {
            "glyphs": drawn.count(0),
            "digits": drawn.count(1),
        }
        assert all(v["loss_mean"] is None or np.isfinite(v["loss_mean"]) for v in row["sources"].values())
    with open(os.path.join(ref.psi_uri, "metadata.json")) as f:
        meta = json.load(f)
    assert [s["name"] for s in meta["task_sources"]] == ["glyphs", "digits"]


def test_merged_pools_and_placed_tasks():
    from l3rs.meta.tasks import Task, TaskPool

    def pool(n: int, m: int, value: int) -> TaskPool:
        return TaskPool(np.full((n, 2, 2, 1), value, np.uint8), np.arange(n, dtype=np.int32),
                        np.full((m, 2, 2, 1), value, np.uint8), np.arange(m, dtype=np.int32))  # fmt: skip

    a, b = pool(5, 3, 1), pool(4, 2, 2)
    assert mixture.merge_pools([a]) == (a, [(0, 0)])  # alone: the pool itself, no copy
    merged, offsets = mixture.merge_pools([a, b])
    assert offsets == [(0, 0), (5, 3)] and merged.train_images.shape == (9, 2, 2, 1)
    task = Task(0, np.arange(2), 2, 0, np.ones((3, 4), np.int32), np.zeros((3, 4), np.int32),
                np.asarray([0, 1], np.int32), np.asarray([0, 1], np.int32))  # fmt: skip
    assert mixture.place_task(task, (0, 0), 3) is task
    placed = mixture.place_task(task, offsets[1], 6)
    assert placed.train_idx.shape == (6, 4) and (placed.train_idx[:3] == 6).all() and (placed.train_idx[3:] == 0).all()
    assert (merged.train_images[placed.train_idx[:3]] == 2).all() and (merged.eval_images[placed.eval_idx] == 2).all()
    with pytest.raises(ValueError, match="rows"):
        mixture.place_task(task, (0, 0), 2)
    bare = mixture.labels_only(b)
    assert bare.train_images.shape == (0, 2, 2, 1) and bare.train_images.base is None
    assert np.array_equal(bare.train_labels, b.train_labels)
