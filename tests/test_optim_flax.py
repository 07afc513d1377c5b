"""L3RS on the library's flax CNN (LayerNorm after each conv): ψ₀ trains it, head-only training, checkpoints.

Data: sklearn's digits (8×8, 10 classes) upsampled to the model's 28×28 input, one fixed batch; no downloads.
"""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import l3rs
from l3rs.models import create, init_variables

STEPS = 40
BATCH = 128


@pytest.fixture(scope="module")
def task():
    digits = load_digits()
    images = jnp.asarray(digits.images[:BATCH, :, :, None] / 16.0, jnp.float32)
    images = jax.image.resize(images, (BATCH, 28, 28, 1), "linear")
    model = create("small_cnn", num_classes=10)
    params = init_variables(model, jax.random.key(0), (28, 28, 1))["params"]
    return model, params, (images, jnp.asarray(digits.target[:BATCH]))


def _loss_fn(model):
    def loss(params, images, labels):
        logits = model.apply({"params": params}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def _stepper(model, tx, batch):
    """A jitted training step (forward, backward, update, apply): (params, state) → (params, state, loss)."""
    loss = _loss_fn(model)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params, *batch)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state, value

    return step


def _train(step, params, state, steps):
    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, state, losses


def test_psi0_trains_the_default_cnn(task):
    model, params, batch = task
    paths = l3rs.layer_paths(params)
    assert {"norm0/scale", "norm0/bias", "head/kernel"} <= set(paths)  # norm layers are L3RS layers too
    config = l3rs.L3RSConfig()
    tx = l3rs.l3rs(l3rs.init_psi(config, params, jax.random.key(0)), config, total_steps=STEPS)
    _, state, losses = _train(_stepper(model, tx, batch), params, tx.init(params), STEPS)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    stats = l3rs.layer_stats(state)
    assert stats["mixing"].shape == (len(paths), 2) and stats["step_norm"].shape == (len(paths),)
    assert bool(jnp.all(stats["step_norm"] > 0))


def test_psi0_first_cnn_step_is_adam_3e_3(task):
    """ψ₀ ≈ Adam(3e-3) on a real model too, where zero-initialised biases give extreme log‖w‖ features."""
    model, params, batch = task
    config = l3rs.L3RSConfig(directions=("adam",))
    tx = l3rs.l3rs(l3rs.init_psi(config, params, jax.random.key(0)), config, total_steps=STEPS)

    @jax.jit
    def first_updates(params):
        value, grads = jax.value_and_grad(_loss_fn(model))(params, *batch)
        adam, _ = optax.adam(3e-3).update(grads, optax.adam(3e-3).init(params), params)
        return tx.update(grads, tx.init(params), params, value=value)[0], adam

    updates, adam = first_updates(params)
    for path, u, a in zip(l3rs.layer_paths(params), jax.tree.leaves(updates), jax.tree.leaves(adam), strict=True):
        assert float(jnp.vdot(u, a) / (jnp.linalg.norm(u) * jnp.linalg.norm(a))) > 1 - 1e-5, path
        assert float(jnp.linalg.norm(u) / jnp.linalg.norm(a)) == pytest.approx(1.0, abs=0.1), path


def test_head_only_fine_tuning_with_multi_transform(task):
    model, params, batch = task
    config = l3rs.L3RSConfig()
    psi = l3rs.init_psi(config, params, jax.random.key(0))  # ψ built for the whole model, used on the head
    labels = {name: "train" if name == "head" else "freeze" for name in params}
    tx = optax.multi_transform(
        {"train": l3rs.l3rs(psi, config, total_steps=STEPS), "freeze": optax.set_to_zero()}, labels
    )
    new_params, _, losses = _train(_stepper(model, tx, batch), params, tx.init(params), 15)
    assert losses[-1] < losses[0]
    for name in params:
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(new_params[name]), strict=True)
        )
        assert changed == (name == "head"), name


def test_checkpoint_mid_training_resumes_identically(task):
    model, params, batch = task
    config = l3rs.L3RSConfig()
    tx = l3rs.l3rs(l3rs.init_psi(config, params, jax.random.key(0)), config, total_steps=10)
    step = _stepper(model, tx, batch)
    params, state, _ = _train(step, params, tx.init(params), 5)
    blob = flax.serialization.to_bytes({"params": params, "opt": state})
    template = {"params": jax.tree.map(jnp.zeros_like, params), "opt": tx.init(params)}
    restored = flax.serialization.from_bytes(template, blob)
    a, _, losses_a = _train(step, params, state, 5)
    b, _, losses_b = _train(step, restored["params"], restored["opt"], 5)
    assert losses_a == losses_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
