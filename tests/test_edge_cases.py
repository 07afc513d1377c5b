"""L3RS edge cases (issue 12): zero and non-finite gradients skip a layer, a non-finite loss skips the loss EMA, and
none of it changes the default path's numerics for finite non-zero gradients (bit for bit against main's code).

The skipped-step semantics are those of the ``l3rs.optim.l3rs`` module docstring; the features the MLP sees are
read black-box through a ψ whose MLP routes one feature x_i to the λ-logit (λ = exp(x_i) with ``lambda_skip=False``).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _paper import paper_config

import l3rs

sys.path.insert(0, os.path.dirname(__file__))
import _l3rs_golden as golden  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "l3rs_golden_updates.npz")
GAMMAS = np.array([0.0, 0.9, 0.99])
K = 20
SHAPES = {"a": {"kernel": (3, 4), "bias": (4,)}, "b": {"kernel": (4, 2)}}
PATHS = ("a/bias", "a/kernel", "b/kernel")


def _tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: {n: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for n, s in v.items()} for m, v in SHAPES.items()
    }


def _selector(config: l3rs.L3RSConfig, params: dict, i: int) -> l3rs.Psi:
    """A ψ whose MLP computes z = (0, …, 0, x_i) exactly: μ uniform and, with lambda_skip=False, λ = exp(x_i)."""
    template = l3rs.init_psi(config, params, jax.random.key(0))
    p_dirs = config.num_directions
    sizes = (config.num_features, *config.hidden_sizes, p_dirs + 1)
    mlp = []
    for j, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = np.zeros((fan_in, fan_out), np.float32)
        if j == 0:
            w[i, 0], w[i, 1] = 1.0, -1.0
        elif j < len(sizes) - 2:
            w[0, 0], w[1, 1] = 1.0, 1.0
        else:
            w[0, p_dirs], w[1, p_dirs] = 1.0, -1.0
        mlp.append({"w": jnp.asarray(w), "b": jnp.zeros((fan_out,), jnp.float32)})
    return template.replace(mlp=mlp)


_JITS: dict = {}


def _runner(psi, config, total_steps=K):
    """(init, update) for this config, jitted once per config with ψ as a traced argument."""
    key = (config, total_steps)
    if key not in _JITS:
        tx = lambda psi: l3rs.l3rs(psi, config, total_steps)  # noqa: E731
        _JITS[key] = (
            jax.jit(lambda psi, p: tx(psi).init(p)),
            jax.jit(lambda psi, g, s, p, v: tx(psi).update(g, s, p, value=v)),
        )
    init, update = _JITS[key]
    return (lambda p: init(psi, p)), (lambda g, s, p, v: update(psi, g, s, p, v))


def _leaf(tree: dict, path: str) -> np.ndarray:
    mod, name = path.split("/")
    return np.asarray(tree[mod][name])


def _zero(tree: dict, path: str, value: float = 0.0) -> dict:
    mod, name = path.split("/")
    out = jax.tree.map(lambda x: x, tree)
    out[mod][name] = jnp.full_like(out[mod][name], value) if value == 0.0 else out[mod][name].at[0, 1].set(value)
    return out


def _adam_state(state):
    return state.base_states[0][0]  # "adam" = chain(scale_by_adam, scale(-1)): its ScaleByAdamState


# ----------------------------------------------------------------------------------------------------------
# The default path is unchanged, bit for bit
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["default", "all_directions", "global"])  # "per_layer_mlp", "no_skip": the script
def test_updates_are_bit_identical_to_main(case):
    """Golden arrays: ``tests/_l3rs_golden.py`` run on main's code before this change (6 jitted steps, one past K)."""
    want = np.load(GOLDEN)
    got = golden.golden_run(case)
    assert set(got) <= set(want.files)
    for key, value in got.items():
        assert np.array_equal(value, want[key]), f"{key}: max |diff| {np.max(np.abs(value - want[key]))}"


def test_inner_loop_is_bit_identical_to_main():
    want = np.load(GOLDEN)
    for key, value in golden.golden_loop().items():
        assert np.array_equal(value, want[key]), key


# ----------------------------------------------------------------------------------------------------------
# Skipped layers
# ----------------------------------------------------------------------------------------------------------
def test_gradient_turning_all_zero_mid_run_freezes_that_layer_and_its_state():
    config = paper_config()
    params = _tree(0)
    psi = l3rs.init_psi(config, params, jax.random.key(1))
    init, update = _runner(psi, config)
    state = init(params)
    for t in range(3):
        u, state = update(_tree(10 + t, 0.1), state, params, jnp.float32(1.0))
        params = jax.tree.map(jnp.add, params, u)
    i = PATHS.index("a/kernel")
    before = state
    for t in range(2):  # a/kernel's gradient is all zero for two steps; momentum must not move it
        u, state = update(_zero(_tree(20 + t, 0.1), "a/kernel"), state, params, jnp.float32(0.5))
        params = jax.tree.map(jnp.add, params, u)
        np.testing.assert_array_equal(_leaf(u, "a/kernel"), 0.0)
        assert np.all(np.abs(_leaf(u, "a/bias")) > 0)  # the others move
        assert float(state.step_norm[i]) == 0.0
    adam0, adam1 = _adam_state(before), _adam_state(state)
    np.testing.assert_array_equal(_leaf(adam1.mu, "a/kernel"), _leaf(adam0.mu, "a/kernel"))
    np.testing.assert_array_equal(_leaf(adam1.nu, "a/kernel"), _leaf(adam0.nu, "a/kernel"))
    assert not np.array_equal(_leaf(adam1.mu, "a/bias"), _leaf(adam0.mu, "a/bias"))
    np.testing.assert_array_equal(state.ema_log_w[i], before.ema_log_w[i])
    np.testing.assert_array_equal(state.ema_log_g[i], before.ema_log_g[i])
    np.testing.assert_array_equal(state.layer_count, [5, 3, 5])
    assert int(state.count) == 5 and int(state.loss_count) == 5
    u, state = update(_tree(30, 0.1), state, params, jnp.float32(0.4))  # gradient back: it moves again
    assert np.linalg.norm(_leaf(u, "a/kernel")) > 0 and int(state.layer_count[i]) == 4


def test_gradient_feature_of_a_skipped_layer_stays_correctly_bias_corrected():
    """After a skip, the layer's log‖g‖ EMA is the §4.1 bias-corrected EMA over the steps it saw (not the calls)."""
    config = paper_config(lambda_skip=False)
    params = _tree(0)
    g_count = len(GAMMAS)
    grads = [_tree(40 + t, 0.1 * (t + 1)) for t in range(4)]
    grads[1] = _zero(grads[1], "b/kernel")
    seen = [np.log(np.linalg.norm(_leaf(g, "b/kernel")) + 1e-8) for g in (grads[0], grads[2], grads[3])]
    i = PATHS.index("b/kernel")
    for j, gamma in enumerate(GAMMAS):
        init, update = _runner(_selector(config, params, g_count + j), config)  # feature: EMA_γ of log‖g‖
        state = init(params)
        for t, g in enumerate(grads):
            _, state = update(g, state, params, jnp.float32(1.0))
            if t == 1:
                assert float(state.step_norm[i]) == 0.0
        a = 0.0
        for x in seen:
            a = gamma * a + (1 - gamma) * x
        want = a / (1 - gamma ** len(seen))
        np.testing.assert_allclose(np.log(float(state.step_norm[i])), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_layer_keeps_its_moments_and_does_not_move(bad):
    config = paper_config()
    params = _tree(0)
    init, update = _runner(l3rs.init_psi(config, params, jax.random.key(1)), config)
    state = init(params)
    _, state = update(_tree(10, 0.1), state, params, jnp.float32(1.0))
    before = state
    u, state = update(_zero(_tree(11, 0.1), "b/kernel", bad), state, params, jnp.float32(1.0))
    np.testing.assert_array_equal(_leaf(u, "b/kernel"), 0.0)
    for name in ("mu", "nu"):
        np.testing.assert_array_equal(_leaf(getattr(_adam_state(state), name), "b/kernel"),
                                      _leaf(getattr(_adam_state(before), name), "b/kernel"))  # fmt: skip
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact))
    assert np.all(np.isfinite(np.asarray(_leaf(u, "a/kernel")))) and np.linalg.norm(_leaf(u, "a/kernel")) > 0


def test_nan_loss_skips_the_loss_ema_and_its_counter():
    """Loss feature (γ = 0.9, 0.99) after losses (2.0, NaN, 1.5, 1.2) is the bias-corrected EMA of (2.0, 1.5, 1.2)."""
    config = paper_config(lambda_skip=False)
    params = _tree(0)
    losses = (2.0, float("nan"), 1.5, 1.2)
    finite = [x for x in losses if np.isfinite(x)]
    for j, gamma in enumerate(GAMMAS):
        init, update = _runner(_selector(config, params, 2 * len(GAMMAS) + j), config)  # feature: loss EMA_γ
        state = init(params)
        for t, loss in enumerate(losses):
            u, state = update(_tree(50 + t, 0.1), state, params, jnp.float32(loss))
            assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))
            if t == 1:
                assert int(state.loss_count) == 1
        a = 0.0
        for x in finite:
            a = gamma * a + (1 - gamma) * x
        want = a / (1 - gamma ** len(finite))
        assert int(state.loss_count) == 3 and int(state.count) == 4
        np.testing.assert_allclose(np.log(np.asarray(state.step_norm)), want, rtol=1e-5)


def test_nan_loss_first_gives_a_zero_loss_feature_until_a_finite_loss():
    config = paper_config(lambda_skip=False)
    params = _tree(0)
    init, update = _runner(_selector(config, params, 2 * len(GAMMAS) + 2), config)
    state = init(params)
    _, state = update(_tree(60, 0.1), state, params, jnp.float32(np.nan))
    np.testing.assert_allclose(np.asarray(state.step_norm), 1.0)  # exp(0)
    _, state = update(_tree(61, 0.1), state, params, jnp.float32(0.7))
    np.testing.assert_allclose(np.log(np.asarray(state.step_norm)), 0.7, rtol=1e-5)  # one finite loss: the loss


def test_all_zero_gradients_from_the_start_never_move_and_stay_finite():
    config = paper_config()
    params = _tree(0)
    init, update = _runner(l3rs.init_psi(config, params, jax.random.key(1)), config)
    state = init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
        u, state = update(zeros, state, params, jnp.float32(1.0))
        assert all(np.array_equal(np.asarray(x), np.zeros_like(x)) for x in jax.tree.leaves(u))
    assert np.all(np.isfinite(np.asarray(state.mixing))) and np.all(np.asarray(state.step_norm) == 0)
    np.testing.assert_array_equal(state.layer_count, [0, 0, 0])
    np.testing.assert_array_equal(_adam_state(state).mu["a"]["kernel"], 0.0)


def test_global_variant_skips_the_features_only_when_every_layer_is_skipped():
    config = paper_config(variant="global")
    params = _tree(0)
    init, update = _runner(l3rs.init_psi(config, params, jax.random.key(1)), config)
    state = init(params)
    u, state = update(_zero(_tree(70, 0.1), "a/kernel"), state, params, jnp.float32(1.0))
    np.testing.assert_array_equal(_leaf(u, "a/kernel"), 0.0)  # the zero layer does not move
    assert np.linalg.norm(_leaf(u, "b/kernel")) > 0 and int(state.layer_count[0]) == 1
    ema = np.asarray(state.ema_log_g)
    u, state = update(jax.tree.map(jnp.zeros_like, params), state, params, jnp.float32(1.0))
    assert int(state.layer_count[0]) == 1 and np.array_equal(np.asarray(state.ema_log_g), ema)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
