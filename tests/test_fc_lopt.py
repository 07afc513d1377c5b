"""FC-LOpt (the small_fc_lopt-style black-box baseline): ψ₀ = Adam, the update formula against an independent NumPy
implementation, jit/vmap with K traced, non-finite inputs, dtypes, config and serialization round trips, and a real
flax CNN on sklearn's digits.
"""

from __future__ import annotations

import functools
import json
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

from l3rs.models import create, init_variables
from l3rs.optim.fc_lopt import FCLoptConfig, FCLoptState, fc_lopt, init_fc_lopt, template_fc_lopt


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _params() -> dict:
    """A small tree with a matrix, a vector and a scalar leaf."""
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)},
        "scale": jnp.asarray(0.5, jnp.float32),
    }


def _grads(seed: int, params: dict, scale: float = 1.0) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return jax.tree.map(lambda p: scale * jax.random.normal(next(keys), p.shape, jnp.float32), params)


def _perturb(theta, scale: float, seed: int = 1):
    vec, unravel = ravel_pytree(theta)
    return unravel(vec + scale * jax.random.normal(jax.random.key(seed), vec.shape, jnp.float32))


def _regression():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
    y = x @ jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) + 0.5
    params = {"w": jnp.zeros((5, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}

    def loss(p):
        return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))

    return params, loss


def _run(tx, params, loss, steps: int):
    """``steps`` steps of ``tx`` in a fori_loop (traceable: usable under jit and vmap) → (params, losses)."""

    def body(i, carry):
        p, s, losses = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=value)
        return optax.apply_updates(p, u), s, losses.at[i].set(value)

    p, _, losses = jax.lax.fori_loop(0, steps, body, (params, tx.init(params), jnp.zeros((steps,), jnp.float32)))
    return p, losses


@functools.partial(jax.jit, static_argnums=(0, 1))
def _update(config: FCLoptConfig, total_steps: int, theta, grads, state, params, value=None):
    """One jitted update (θ is an argument, so one compile serves every θ of a config)."""
    return fc_lopt(theta, config, total_steps).update(grads, state, params, value=value)


def _assert_tree_close(a, b, **kw) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **kw)


def _numpy_step(theta, config: FCLoptConfig, big_k: float, grads, params, moments, k: int):
    """One FC-LOpt step written from the module docstring's formula, per tensor, in float64 NumPy.

    moments: per leaf (m [n, n_m], v [n, n_r]) raw EMAs; returns (updates per leaf, new moments).
    """
    layers = [(np.asarray(lay["w"], np.float64), np.asarray(lay["b"], np.float64)) for lay in theta["mlp"]]
    beta_m = np.asarray(config.momentum_decays)
    beta_v = np.asarray(config.rms_decays)
    eps, t = config.eps, k + 1
    time = np.concatenate(
        [
            np.tanh(10.0 * (k / big_k - np.asarray(config.time_anchors))),
            np.tanh(np.log(big_k * np.asarray(config.horizon_betas))),
        ]
    )
    updates, new_moments = [], []
    for g, w, (m, v) in zip(grads, params, moments, strict=True):
        g = np.asarray(g, np.float64).ravel()
        w = np.asarray(w, np.float64).ravel()
        m = beta_m * m + (1 - beta_m) * g[:, None]
        v = beta_v * v + (1 - beta_v) * g[:, None] ** 2
        m_hat = m / (1 - beta_m**t)
        r = np.sqrt(v / (1 - beta_v**t))
        columns = [w, g, *m_hat.T, *r.T]
        columns += [m_hat[:, i] / (r[:, j] + eps) for i in range(len(beta_m)) for j in range(len(beta_v))]
        columns += [1 / (r[:, j] + eps) for j in range(len(beta_v))]
        x = np.stack(columns, axis=1)
        x = x / np.sqrt(np.mean(x**2, axis=0) + 1e-12)
        h = np.concatenate([x, np.broadcast_to(time, (len(g), len(time)))], axis=1)
        for i, (lw, lb) in enumerate(layers):
            h = h @ lw + lb
            if i < len(layers) - 1:
                h = np.maximum(h, 0.0)
        d, s = h[:, 0], h[:, 1]
        adam = 0.0
        if config.adam_skip:
            i, j = config.momentum_decays.index(config.adam_b1), config.rms_decays.index(config.adam_b2)
            adam = m_hat[:, i] / (r[:, j] + eps)
        step = -config.init_lr * (adam + config.step_mult * d) * np.exp(config.exp_mult * s)
        updates.append(step)
        new_moments.append((m, v))
    return updates, new_moments


# ----------------------------------------------------------------------------------------------------------------
# ψ₀ = Adam(init_lr)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "adam"),
    [
        (FCLoptConfig(), optax.adam(3e-3)),
        (FCLoptConfig(hidden_layers=2), optax.adam(3e-3)),
        (FCLoptConfig(hidden_layers=0), optax.adam(3e-3)),
        (
            FCLoptConfig(momentum_decays=(0.5, 0.95), rms_decays=(0.99, 0.9), adam_b1=0.95, adam_b2=0.99, init_lr=1e-2),
            optax.adam(1e-2, b1=0.95, b2=0.99),
        ),
    ],
    ids=["default", "two_hidden", "linear", "other_decays"],
)
def test_psi0_updates_equal_adam(config, adam):
    params = _params()
    theta = config.init(params, jax.random.key(0))
    tx = config.build(theta, 10)
    state, adam_state = tx.init(params), adam.init(params)
    update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
    for step in range(3):  # the first update, and two more
        grads = _grads(step, params)
        updates, state = update(grads, state, params, value=1.0)
        expected, adam_state = adam_update(grads, adam_state, params)
        _assert_tree_close(updates, expected, rtol=1e-5, atol=1e-9)
        params = optax.apply_updates(params, updates)


def test_psi0_trains_like_adam_on_regression():
    params, loss = _regression()
    config = FCLoptConfig()
    theta = config.init(params, jax.random.key(0))
    final, losses = jax.jit(lambda: _run(config.build(theta, 20), params, loss, 20))()
    final_adam, losses_adam = jax.jit(lambda: _run(optax.with_extra_args_support(optax.adam(3e-3)), params, loss, 20))()
    losses, losses_adam = np.asarray(losses), np.asarray(losses_adam)
    assert losses[-1] < 0.9 * losses[0]
    assert np.all(np.diff(losses) < 0)
    np.testing.assert_allclose(losses, losses_adam, rtol=1e-4)
    _assert_tree_close(final, final_adam, rtol=1e-4, atol=1e-7)


def test_learned_part_moves_the_step():
    """The hidden layers are not zero at init: perturbing only the output layer changes the step (NES can move it)."""
    params = _params()
    config = FCLoptConfig()
    theta = config.init(params, jax.random.key(0))
    last = theta["mlp"][-1]
    moved = {"mlp": [*theta["mlp"][:-1], {"w": last["w"] + 0.01, "b": last["b"]}]}
    grads = _grads(0, params)

    @jax.jit
    def first_update(theta):
        tx = config.build(theta, 10)
        return tx.update(grads, tx.init(params), params)[0]

    base, other = first_update(theta), first_update(moved)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        assert np.all(np.isfinite(np.asarray(b)))
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-7


# ----------------------------------------------------------------------------------------------------------------
# The formula, against NumPy
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        FCLoptConfig(rms_decays=(0.99, 0.999), exp_mult=0.5, step_mult=2.0),
        FCLoptConfig(hidden_layers=2, hidden_size=8, adam_skip=False, momentum_decays=(0.3, 0.8)),
    ],
    ids=["adam_skip", "no_skip"],
)
def test_update_matches_numpy_reference(config):
    params = _params()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.3)
    big_k = 7
    tx = config.build(theta, big_k)
    state = tx.init(params)
    leaves = jax.tree.leaves(params)
    moments = [
        (np.zeros((x.size, len(config.momentum_decays))), np.zeros((x.size, len(config.rms_decays)))) for x in leaves
    ]
    update = jax.jit(tx.update)
    for k in range(4):
        grads = _grads(k, params, scale=0.1 * (k + 1))
        updates, state = update(grads, state, params)
        expected, moments = _numpy_step(
            theta, config, big_k, jax.tree.leaves(grads), jax.tree.leaves(params), moments, k
        )
        assert int(state.count) == k + 1
        for got, want, p in zip(jax.tree.leaves(updates), expected, leaves, strict=True):
            assert got.shape == p.shape
            np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=2e-4, atol=1e-8)
        np.testing.assert_allclose(state.momenta, np.concatenate([m for m, _ in moments]).T, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(
            state.second_moments, np.concatenate([v for _, v in moments]).T, rtol=1e-5, atol=1e-12
        )
        params = optax.apply_updates(params, updates)
        leaves = jax.tree.leaves(params)


# ----------------------------------------------------------------------------------------------------------------
# jit with K traced, vmap over flat meta-parameter vectors
# ----------------------------------------------------------------------------------------------------------------
def test_one_compile_serves_every_horizon():
    params, loss = _regression()
    config = FCLoptConfig()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.1)
    traces = []

    @jax.jit
    def train(theta, total_steps):
        traces.append(total_steps)  # runs once per compilation
        return _run(fc_lopt(theta, config, total_steps), params, loss, 8)

    final_10, losses_10 = train(theta, 10)
    final_37, losses_37 = train(theta, 37)
    assert len(traces) == 1
    assert np.all(np.isfinite(losses_10)) and np.all(np.isfinite(losses_37))
    # K is read as data: the time features differ, so the trajectories do.
    assert not np.allclose(ravel_pytree(final_10)[0], ravel_pytree(final_37)[0], rtol=0, atol=1e-7)


def test_vmap_over_flat_meta_param_vectors_equals_single_runs():
    params, loss = _regression()
    config = FCLoptConfig()
    vec0, unravel = ravel_pytree(config.init(params, jax.random.key(0)))
    assert vec0.dtype == jnp.float32 and vec0.shape == (config.num_meta_params,)
    vecs = vec0 + 0.05 * jax.random.normal(jax.random.key(3), (3, vec0.shape[0]), jnp.float32)

    def run(vec, total_steps):
        final, losses = _run(fc_lopt(unravel(vec), config, total_steps), params, loss, 6)
        return ravel_pytree(final)[0], losses

    batched = jax.jit(jax.vmap(run, in_axes=(0, None)))(vecs, 6)
    single = jax.jit(run)
    for i in range(vecs.shape[0]):
        final, losses = single(vecs[i], 6)
        np.testing.assert_allclose(batched[0][i], final, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batched[1][i], losses, rtol=1e-5)
    assert not np.allclose(batched[0][0], batched[0][1], rtol=0, atol=1e-7)  # the candidates differ
    # A batch of tasks with different horizons K (one per candidate) in the same call.
    horizons = jnp.asarray([5, 9, 40], jnp.int32)
    per_k = jax.jit(jax.vmap(run))(vecs, horizons)
    for i in range(vecs.shape[0]):
        final, losses = single(vecs[i], int(horizons[i]))
        np.testing.assert_allclose(per_k[0][i], final, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(per_k[1][i], losses, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_only_that_tensor(bad):
    params = _params()
    config = FCLoptConfig()
    tx = config.build(_perturb(config.init(params, jax.random.key(0)), 0.1), 10)
    update = jax.jit(tx.update)
    _, state = update(_grads(0, params), tx.init(params), params)

    clean = _grads(1, params)
    poisoned = jax.tree.map(lambda g: g, clean)
    poisoned["dense"]["kernel"] = clean["dense"]["kernel"].at[1, 2].set(bad)
    updates, new_state = update(poisoned, state, params, value=1.0)
    reference, _ = update(clean, state, params, value=1.0)

    np.testing.assert_array_equal(updates["dense"]["kernel"], np.zeros((4, 3), np.float32))
    # The other tensors are untouched by the bad one: their updates equal those of a clean step.
    np.testing.assert_array_equal(updates["dense"]["bias"], reference["dense"]["bias"])
    np.testing.assert_array_equal(updates["scale"], reference["scale"])
    assert np.all(np.isfinite(np.asarray(updates["dense"]["bias"]))) and np.isfinite(float(updates["scale"]))
    # The state stays finite, and the bad tensor's accumulators did not move (bias [3] comes first in
    # jax.tree.leaves order, so the kernel is entries 3..14).
    for x in (new_state.momenta, new_state.second_moments):
        assert np.all(np.isfinite(np.asarray(x)))
    kernel = slice(3, 15)
    np.testing.assert_array_equal(new_state.momenta[:, kernel], state.momenta[:, kernel])
    np.testing.assert_array_equal(new_state.second_moments[:, kernel], state.second_moments[:, kernel])
    assert not np.array_equal(new_state.momenta[:, :3], state.momenta[:, :3])


def test_nan_loss_is_ignored():
    params = _params()
    config = FCLoptConfig()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.1)
    grads, state = _grads(0, params), config.build(theta, 10).init(params)
    with_nan, _ = _update(config, 10, theta, grads, state, params, value=jnp.nan)
    with_loss, _ = _update(config, 10, theta, grads, state, params, value=2.5)
    _assert_tree_close(with_nan, with_loss, rtol=0, atol=0)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(with_nan))


def test_bfloat16_params_keep_their_dtype():
    params = _params()
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    config = FCLoptConfig()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.1)
    tx = config.build(theta, 10)
    state16, state32 = tx.init(params_bf16), tx.init(params)
    for step in range(3):
        grads16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(step, params))
        updates16, state16 = _update(config, 10, theta, grads16, state16, params_bf16)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates16))
        assert state16.momenta.dtype == jnp.float32
        # The same step in float32 from the same (bf16-representable) values agrees to bf16 precision.
        updates32, state32 = _update(
            config,
            10,
            theta,
            jax.tree.map(lambda x: x.astype(jnp.float32), grads16),
            state32,
            jax.tree.map(lambda x: x.astype(jnp.float32), params_bf16),
        )
        _assert_tree_close(updates16, updates32, rtol=2e-2, atol=1e-6)
        params_bf16 = optax.apply_updates(params_bf16, updates16)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params_bf16)
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params_bf16))


def test_steps_beyond_the_horizon_stay_finite():
    params, loss = _regression()
    config = FCLoptConfig()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.1)
    final, losses = jax.jit(lambda: _run(config.build(theta, 5), params, loss, 40))()  # 8× past K
    assert np.all(np.isfinite(np.asarray(losses)))
    assert np.all(np.isfinite(np.asarray(ravel_pytree(final)[0])))


def test_random_perturbations_give_finite_updates():
    params = _params()
    config = FCLoptConfig()
    theta0 = config.init(params, jax.random.key(0))
    for seed in range(5):
        theta = _perturb(theta0, 0.1, seed=seed)
        state = config.build(theta, 20).init(params)
        for step in range(5):
            grads = _grads(step, params, scale=10.0 ** (step - 2))
            updates, state = _update(config, 20, theta, grads, state, params)
            assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
            params = optax.apply_updates(params, updates)


def test_without_adam_skip_the_init_is_a_random_optimizer():
    params = _params()
    config = FCLoptConfig(adam_skip=False, momentum_decays=(0.5, 0.99))  # no 0.9 needed without the skip
    theta = config.init(params, jax.random.key(0))
    assert np.any(np.asarray(theta["mlp"][-1]["w"]) != 0)
    updates, _ = _update(config, 10, theta, _grads(0, params), config.build(theta, 10).init(params), params)
    flat = np.asarray(ravel_pytree(updates)[0])
    assert np.all(np.isfinite(flat)) and np.any(flat != 0)


def test_update_needs_params_and_matching_state():
    params = _params()
    config = FCLoptConfig()
    tx = config.build(config.init(params, jax.random.key(0)), 10)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(_grads(0, params), tx.init(params))
    with pytest.raises(ValueError, match="initialised for 16 parameters"):
        tx.update({"w": jnp.ones((3,))}, tx.init(params), {"w": jnp.ones((3,))})
    updates, state = tx.update({}, tx.init({}), {})  # nothing to train: nothing to do
    assert updates == {} and int(state.count) == 1


# ----------------------------------------------------------------------------------------------------------------
# State, meta-parameters, config
# ----------------------------------------------------------------------------------------------------------------
def test_state_size_and_flax_serialization_round_trip():
    params = _params()
    config = FCLoptConfig()
    theta = _perturb(config.init(params, jax.random.key(0)), 0.1)
    tx = config.build(theta, 10)
    state = tx.init(params)
    assert isinstance(state, FCLoptState)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert state_bytes == 5 * param_bytes + 4  # 4 momenta + 1 second moment, float32, and the int32 count
    for step in range(2):
        _, state = _update(config, 10, theta, _grads(step, params), state, params)
    restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    assert isinstance(restored, FCLoptState)
    _assert_tree_close(restored, state, rtol=0, atol=0)
    grads = _grads(5, params)
    _assert_tree_close(
        _update(config, 10, theta, grads, restored, params)[0],
        _update(config, 10, theta, grads, state, params)[0],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "config", [FCLoptConfig(), FCLoptConfig(hidden_layers=0, time_anchors=(), horizon_betas=())], ids=str
)
def test_template_matches_init(config):
    theta = config.init(_params(), jax.random.key(0))
    template = config.template(())
    assert jax.tree.structure(template) == jax.tree.structure(theta)
    assert [x.shape for x in jax.tree.leaves(template)] == [x.shape for x in jax.tree.leaves(theta)]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(theta) + jax.tree.leaves(template))
    vec, _ = ravel_pytree(theta)
    assert vec.shape == ravel_pytree(template)[0].shape == (config.num_meta_params,)
    assert theta["mlp"][0]["w"].shape == (config.num_features, *theta["mlp"][0]["b"].shape)
    # An artifact restored onto the template is θ again.
    restored = flax.serialization.from_state_dict(template, flax.serialization.to_state_dict(theta))
    _assert_tree_close(restored, theta, rtol=0, atol=0)
    _assert_tree_close(template, template_fc_lopt(config), rtol=0, atol=0)
    _assert_tree_close(theta, init_fc_lopt(config, None, jax.random.key(0)), rtol=0, atol=0)


def test_default_sizes():
    config = FCLoptConfig()
    assert config.family == "fc_lopt" and config.label == "FC-LOpt"
    assert config.num_tensor_features == 12  # w, g, 4 m̂, 1 r, 4 m̂/r, 1/r
    assert config.num_features == 12 + 11 + 4
    assert config.layer_sizes() == (27, 32, 2)
    assert config.num_meta_params == 27 * 32 + 32 + 32 * 2 + 2


def test_config_dict_round_trip():
    config = FCLoptConfig(hidden_layers=2, momentum_decays=[0.9, 0.99], time_anchors=[0.0, 0.5, 1.0], exp_mult=0.0)
    assert config.momentum_decays == (0.9, 0.99)  # lists from TOML/JSON become tuples
    d = config.to_dict()
    assert d["family"] == "fc_lopt"
    again = FCLoptConfig.from_dict(json.loads(json.dumps(d)))
    assert again == config
    assert FCLoptConfig.from_dict({k: v for k, v in d.items() if k != "family"}) == config
    assert FCLoptConfig.from_dict({}) == FCLoptConfig()
    numpy_numbers = FCLoptConfig(hidden_size=np.int64(8), init_lr=np.float32(0.5), rms_decays=np.asarray([0.999]))
    assert json.loads(json.dumps(numpy_numbers.to_dict()))["hidden_size"] == 8
    assert FCLoptConfig.from_dict(numpy_numbers.to_dict()) == numpy_numbers
    with pytest.raises(ValueError, match=r"optimizer: unknown field\(s\) \['hidden'\]; known: \["):
        FCLoptConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="optimizer.family"):
        FCLoptConfig.from_dict({"family": "l3rs"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("hidden_size", 2.5),
        ("hidden_size", True),
        ("hidden_layers", -1),
        ("momentum_decays", ()),
        ("momentum_decays", (0.9, 1.0)),
        ("momentum_decays", (0.9, 0.9)),
        ("momentum_decays", "0.9"),
        ("momentum_decays", (0.9, "0.5")),
        ("rms_decays", (-0.1, 0.999)),
        ("time_anchors", (math.nan,)),
        ("time_anchors", 0.5),
        ("horizon_betas", (0.0,)),
        ("init_lr", 0.0),
        ("init_lr", "3e-3"),
        ("init_lr", math.inf),
        ("step_mult", 0.0),
        ("exp_mult", -1.0),
        ("adam_skip", 1),
        ("adam_b1", 1.0),
        ("adam_b1", 0.95),  # not one of momentum_decays
        ("adam_b2", 0.99),  # not one of rms_decays
        ("eps", 0.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^optimizer\.{field}: "):
        FCLoptConfig(**{field: value})


# ----------------------------------------------------------------------------------------------------------------
# A real flax model
# ----------------------------------------------------------------------------------------------------------------
def test_small_cnn_on_digits():
    """ψ₀ fine-tunes the library's CNN exactly like Adam(3e-3) inside one jitted loop (flat θ and K as data), and
    a θ perturbed at scale 0.1 trains it with finite losses."""
    digits = load_digits()
    images = jax.image.resize(
        jnp.asarray(digits.images[:64, :, :, None] / 16.0, jnp.float32), (64, 28, 28, 1), "linear"
    )
    labels = jnp.asarray(digits.target[:64])
    model = create("small_cnn", num_classes=10)
    params = init_variables(model, jax.random.key(0), (28, 28, 1))["params"]

    def loss(p):
        logits = model.apply({"params": p}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    config = FCLoptConfig()
    vec0, unravel = ravel_pytree(config.init(params, jax.random.key(0)))
    train = jax.jit(lambda vec, total_steps: _run(fc_lopt(unravel(vec), config, total_steps), params, loss, 15)[1])
    losses = np.asarray(train(vec0, 15))
    adam = np.asarray(jax.jit(lambda: _run(optax.with_extra_args_support(optax.adam(3e-3)), params, loss, 15)[1])())
    np.testing.assert_allclose(losses, adam, rtol=1e-3)
    assert losses[-1] < 0.8 * losses[0]
    perturbed = np.asarray(train(vec0 + 0.1 * jax.random.normal(jax.random.key(1), vec0.shape), 10))
    assert np.all(np.isfinite(perturbed))
    assert not np.allclose(perturbed, losses)
