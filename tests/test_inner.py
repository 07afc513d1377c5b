"""Tasks and the jitted inner loop: determinism, one compile for every K, agreement with a plain optax loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l3rs import models
from l3rs.data import normalize
from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, cosine_schedule, learned_optimizer_fn
from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task, task_header, task_seed
from l3rs.optim import L3RSConfig, init_psi, psi_to_vector

DIST = TaskDistribution("sklearn_digits", "meta_train", num_classes=3, batch_size=16, eval_batch_size=32, k_min=3,
                        k_max=40)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    pool = load_task_pool(DIST)
    module = models.create("small_cnn", num_classes=3, features=(8, 16))
    variables = models.init_variables(module, jax.random.key(0), (16, 16, 1))
    return module, variables, pool


def test_tasks_are_pure_functions_of_their_seed(setup):
    _, _, pool = setup
    a, b = sample_task(123, DIST, pool), sample_task(123, DIST, pool)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = sample_task(124, DIST, pool)
    assert not np.array_equal(a.train_idx, c.train_idx)
    assert task_header(123, DIST)[1] == a.num_steps and DIST.k_min <= a.num_steps <= DIST.k_max
    # Only the distribution's classes, relabelled 0..N-1 in the task's order.
    assert set(a.classes.tolist()) <= set(range(5, 10)) and len(set(a.classes.tolist())) == 3
    np.testing.assert_array_equal(a.classes[a.train_y], pool.train_labels[a.train_idx])
    np.testing.assert_array_equal(a.classes[a.eval_y], pool.eval_labels[a.eval_idx])
    # Task seeds: distinct per (run, generation, index) and stable.
    seeds = {task_seed(0, g, i) for g in range(50) for i in range(4)}
    assert len(seeds) == 200 and task_seed(0, 3, 1) == task_seed(0, 3, 1)


def reference_adam(module, variables, pool, task, lr, k):
    """The same fine-tuning, written as a plain Python loop of optax.adam (no jit of the whole loop)."""
    params = models.fresh_head(variables["params"], jax.random.key(task.head_seed), 3)
    tx = optax.adam(lr)
    state = tx.init(params)

    def loss_fn(p, x, y):
        logits = module.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    for i in range(k):
        x = normalize(pool.train_images[task.train_idx[i]])
        g = jax.grad(loss_fn)(params, x, task.train_y[i])
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    x = normalize(pool.eval_images[task.eval_idx])
    return float(loss_fn(params, x, task.eval_y))


def test_adam_inner_loop_matches_plain_optax_loop_and_compiles_once(setup):
    module, variables, pool = setup
    loop = InnerLoop(module, variables, pool, adam_optimizer_fn("constant"), num_classes=3)
    for seed, k in ((1, 10), (2, 37), (3, 0)):
        task = sample_task(seed, DIST, pool)
        out = jax.device_get(loop.run_arrays(jnp.float32(3e-3), task, num_steps=k))
        np.testing.assert_allclose(out["loss"], reference_adam(module, variables, pool, task, 3e-3, k), rtol=2e-4)
    assert loop.compiles == 1  # K, task and learning rate are all traced


def test_eval_at_curve_equals_separate_runs(setup):
    module, variables, pool = setup
    loop = InnerLoop(module, variables, pool, adam_optimizer_fn("constant"), num_classes=3)
    task = sample_task(5, DIST, pool)
    curve = jax.device_get(loop.run_arrays(jnp.float32(1e-2), task, num_steps=10, eval_at=[2, 6, 10]))
    for m, k in enumerate((2, 6, 10)):
        single = jax.device_get(loop.run_arrays(jnp.float32(1e-2), task, num_steps=k))
        np.testing.assert_allclose(curve["curve_loss"][m], single["loss"], rtol=1e-5)
        np.testing.assert_allclose(curve["curve_accuracy"][m], single["accuracy"])


def test_cosine_schedule_reaches_zero_at_k():
    sched = cosine_schedule(jnp.float32(0.1), jnp.int32(10))
    np.testing.assert_allclose([sched(jnp.int32(s)) for s in (0, 5, 10, 15)], [0.1, 0.05, 0.0, 0.0], atol=1e-7)


def test_l3rs_inner_loop_head_only_and_divergence(setup):
    module, variables, pool = setup
    config = L3RSConfig()
    psi = init_psi(config, variables["params"], jax.random.key(0))
    vec = np.asarray(psi_to_vector(psi))
    task = sample_task(7, DIST, pool)
    loop = InnerLoop(module, variables, pool, learned_optimizer_fn(config, psi), num_classes=3)
    out = jax.device_get(loop.run_arrays(vec, task, num_steps=8))
    assert np.isfinite(out["loss"]) and 0 <= out["accuracy"] <= 1
    # A candidate whose λ is absurd diverges: the loss is non-finite or huge, but nothing raises.
    wild = vec + 80.0
    bad = jax.device_get(loop.run_arrays(wild, task, num_steps=8))
    assert not np.isfinite(bad["loss"]) or bad["loss"] > 10 * out["loss"]
    # vmapped pair == one at a time.
    pair_loop = InnerLoop(module, variables, pool, learned_optimizer_fn(config, psi), num_classes=3,
                          vmap_candidates=True)  # fmt: skip
    pair = jax.device_get(pair_loop(np.stack([vec, vec * 0.9]), task))
    single = jax.device_get(loop.run_arrays(vec * 0.9, task))
    np.testing.assert_allclose(pair["loss"][1], single["loss"], rtol=1e-4)
    # Head-only: the body of the network does not move, so the loss differs from full fine-tuning.
    head_loop = InnerLoop(module, variables, pool, learned_optimizer_fn(config, psi), num_classes=3,
                          train_scope="head")  # fmt: skip
    head = jax.device_get(head_loop.run_arrays(vec, task, num_steps=8))
    assert np.isfinite(head["loss"]) and head["loss"] != pytest.approx(out["loss"], rel=1e-6)
