"""VeLO (``l3rs.optim.velo``) and its hyper_v2 checkpoint format (``l3rs.optim.velo_checkpoint``).

The update is checked against ``RefVeLO``, a float64 numpy re-derivation of learned_optimization's
``HyperV2.opt_fn(...).update`` written straight from its source (per-decay loops, ``tile``d factored features,
per-input first-layer matmuls, basis MLPs mixed one array at a time) and sharing no code with the implementation;
ψ₀ with the Adam skip against ``optax.adam``. Checkpoint files are also written the way learned_optimization writes
them (``flax.serialization.to_bytes`` of a flax struct ``ParameterCheckpoint`` holding a ``NamedTuple`` LSTM state).
"""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from l3rs.optim.velo import VeLOConfig, VeLOState, init_velo, velo
from l3rs.optim.velo_checkpoint import load_hyper_v2, save_hyper_v2

# Every kind of tensor VeLO treats differently: a conv kernel (factored; tie between two axes of size 3), a square
# matrix (tie), a vector (full accumulators) and a scalar (treated as a [1]-vector).
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "dense": {"kernel": (6, 6)}, "scale": ()}


def _tree(seed: int, scale: float = 1.0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)

    def make(shape):
        return jnp.asarray(scale * rng.normal(size=shape), dtype)

    return {
        "conv": {k: make(s) for k, s in SHAPES["conv"].items()},
        "dense": {"kernel": make(SHAPES["dense"]["kernel"])},
        "scale": make(SHAPES["scale"]),
    }


def _perturbed(config: VeLOConfig, seed: int, sigma: float) -> dict:
    """ψ₀ plus Gaussian noise on every entry (the learned part is then switched on)."""
    rng = np.random.default_rng(seed + 100)
    theta = init_velo(config, jax.random.key(seed))
    return jax.tree.map(lambda x: jnp.asarray(x + sigma * rng.normal(size=x.shape), jnp.float32), theta)


@functools.partial(jax.jit, static_argnums=0)
def _update_jit(config, theta, k_total, grads, state, params, loss):
    return velo(theta, config, k_total).update(grads, state, params, value=loss)


def _update(config, theta, k_total, grads, state, params, loss):
    """One jitted update; the meta-parameters are an argument, so one compile serves every θ of a config."""
    return _update_jit(config, theta, jnp.float32(k_total), grads, state, params, jnp.float32(loss))


def _init(config, theta, params):
    return velo(theta, config, 10).init(params)


def _run(theta, config, k_total, params_seq, grads_seq, losses):
    """Updates of a run over the given steps (a list of update trees) and the final state."""
    state, out = _init(config, theta, params_seq[0]), []
    for p, g, loss in zip(params_seq, grads_seq, losses, strict=True):
        u, state = _update(config, theta, k_total, g, state, p, loss)
        out.append(u)
    return out, state


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# An independent float64 re-derivation of hyper_v2 (published flags) from learned_optimization's source.
# ----------------------------------------------------------------------------------------------------------------
def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _relu(x):
    return np.maximum(x, 0.0)


def _cliplog(v):
    return 0.5 * np.clip(np.log(1e-8 + np.abs(10.0 * v)), -5, 5)


def _fdims(shape):
    if len(shape) < 2:
        return None
    s = np.argsort(shape)  # numpy's default, as hyper_v2
    return int(s[-2]), int(s[-1])


class RefVeLO:
    def __init__(self, theta, cfg: VeLOConfig, params: list[np.ndarray], k_total: int):
        self.t = jax.tree.map(lambda x: np.asarray(x, np.float64), theta)
        self.cfg = cfg
        self.bm = np.asarray(cfg.momentum_decays)
        self.br = np.asarray(cfg.rms_decays)
        self.ba = np.asarray(cfg.adafactor_decays)
        self.mom = [np.zeros(p.shape + (len(self.bm),)) for p in params]
        self.rms = [np.zeros(p.shape + (len(self.br),)) for p in params]
        self.fac = []
        for p in params:
            fd = _fdims(p.shape)
            per = []
            for _ in self.ba:
                if fd:
                    d1, d0 = fd
                    per.append((np.zeros(np.delete(p.shape, d0)), np.zeros(np.delete(p.shape, d1)), None))
                else:
                    per.append((None, None, np.zeros(p.shape)))
            self.fac.append(per)
        n = len(params)
        self.h = np.tile(self.t["lstm_init_state"]["hidden"], [n, 1])
        self.c = np.tile(self.t["lstm_init_state"]["cell"], [n, 1])
        self.ldec = np.exp(-1.0 / np.logspace(1, np.log10(k_total), 10))
        self.lmeans, self.lmin, self.lit = np.zeros(10), 999999999999.0 * np.ones(10), 0
        self.it, self.k_total = 0, k_total

    def step(self, params, grads, loss):
        d = self.ldec
        cor = self.lmeans / (1 - d ** (self.lit + 1))
        approx_max = loss if self.lit == 0 else cor.max()
        loss = min(abs(approx_max) * 2, loss)
        self.lmeans = self.lmeans * d + loss * (1 - d)
        self.lmin = np.minimum(self.lmin, self.lmeans / (1 - d ** (self.lit + 1)))
        self.lit += 1
        cor = self.lmeans / (1 - d**self.lit)
        lf = np.clip((cor[:-1] - self.lmin[:-1]) / np.maximum(1e-8, cor[1:] - self.lmin[:-1]) - 1, -1, 1)
        if self.lit <= 2:
            lf = lf * 0

        grads = [np.clip(np.asarray(g, np.float64), -1000, 1000) for g in grads]
        params = [np.asarray(p, np.float64) for p in params]
        frac = self.it / self.k_total
        rows = []
        for p, m, r in zip(params, self.mom, self.rms, strict=True):
            nm = 1.0 / np.sqrt(max(1e-9, np.mean(p**2)))
            m2, r2 = m * nm, r * nm
            ax = tuple(range(p.ndim))
            mean_m = m2.mean(axis=ax, keepdims=True)
            feats = {
                "fraction_left": np.tanh((frac - np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1])) * 10),
                "loss_features": lf,
                "var_m": _cliplog(((m2 - mean_m) ** 2).mean(axis=ax)),
                "mean_rms": _cliplog(r2.mean(axis=ax, keepdims=True).reshape(-1)),
                "var_rms": _cliplog(((r2 - mean_m) ** 2).mean(axis=ax)),
                "rank": np.eye(5)[sum(s > 1 for s in p.shape)],
            }
            rows.append(np.concatenate([feats[k] for k in sorted(feats)]))
        x = np.stack(rows)
        rp = self.t["rnn_params"]

        def lin(name, v):
            return v @ rp[name]["w"] + rp[name]["b"]

        _ = _relu(lin("linear", x))  # hyper_v2 computes this and overwrites it
        mix = _relu(lin("linear_1", x))
        x = lin("linear_2", x) + mix.max(axis=0, keepdims=True)
        gates = lin("rnn/linear", np.concatenate([x, self.h], axis=1))
        hs = self.h.shape[1]
        i, gg, f, o = (gates[:, k * hs : (k + 1) * hs] for k in range(4))
        self.c = _sig(f + 1) * self.c + _sig(i) * np.tanh(gg)
        self.h = _sig(o) * np.tanh(self.c)
        controls, lr_mult = lin("rnn_to_controls", self.h), lin("step_size", self.h)[:, 0]

        updates = []
        for ti, (p, g) in enumerate(zip(params, grads, strict=True)):
            self.mom[ti] = self.mom[ti] * self.bm + (1 - self.bm) * g[..., None]
            self.rms[ti] = self.rms[ti] * self.br + (1 - self.br) * g[..., None] ** 2
            fd = _fdims(g.shape)
            fac_g = []
            for j, beta in enumerate(self.ba):
                v_row, v_col, v_full = self.fac[ti][j]
                g2 = g * g + 1e-30
                if fd:
                    d1, d0 = fd
                    v_row = beta * v_row + (1 - beta) * g2.mean(axis=d0)
                    v_col = beta * v_col + (1 - beta) * g2.mean(axis=d1)
                    rd1 = d1 - 1 if d1 > d0 else d1
                    rf = 1 / np.sqrt(np.maximum(v_row / (v_row.mean(axis=rd1, keepdims=True) + 1e-9), 1e-9))
                    cf = 1 / np.sqrt(np.maximum(v_col, 1e-9))
                    fac_g.append(g * np.expand_dims(rf, d0) * np.expand_dims(cf, d1))
                else:
                    v_full = beta * v_full + (1 - beta) * g2
                    fac_g.append(g / np.sqrt(np.maximum(v_full + 1e-9, 1e-9)))
                self.fac[ti][j] = (v_row, v_col, v_full)
            fac_g = np.stack(fac_g, axis=-1)
            m, r = self.mom[ti], self.rms[ti]
            pp, gp = p, g
            if p.ndim == 0:
                pp, gp, m, r, fac_g = p[None], g[None], m[None], r[None], fac_g[None]
            rsq = 1 / np.sqrt(r + 1e-6)
            inps = [gp[..., None], np.clip(gp[..., None], -0.1, 0.1), pp[..., None], m, r, m * rsq, rsq, fac_g]
            inps.append(gp[..., None] * rsq)
            if fd:
                d1, d0 = fd
                v_row = np.stack([a[0] for a in self.fac[ti]], -1)
                v_col = np.stack([a[1] for a in self.fac[ti]], -1)
                reps = [1] * (1 + p.ndim)
                reps[d0] = p.shape[d0]
                row_feat = np.tile(np.expand_dims(v_row, d0), reps)
                reps = [1] * (1 + p.ndim)
                reps[d1] = p.shape[d1]
                col_feat = np.tile(np.expand_dims(v_col, d1), reps)
                inps += [row_feat, col_feat, 1 / np.sqrt(row_feat + 1e-8), 1 / np.sqrt(col_feat + 1e-8)]
                rd1 = d1 - 1 if d1 > d0 else d1
                rf = 1 / np.sqrt(np.maximum(v_row / (v_row.mean(axis=rd1, keepdims=True) + 1e-9), 1e-9))
                cf = 1 / np.sqrt(np.maximum(v_col, 1e-9))
                inps.append(m * np.expand_dims(rf, d0) * np.expand_dims(cf, d1))
            else:
                v = np.stack([a[2] for a in self.fac[ti]], -1)
                if p.ndim == 0:
                    v = v[None]
                inps += [v, v, 1 / np.sqrt(v + 1e-8), 1 / np.sqrt(v + 1e-8), m * v**-0.5]
            ax = tuple(range(pp.ndim))
            inps = [a / np.sqrt(1e-5 + np.mean(a**2, axis=ax, keepdims=True)) for a in inps]
            c = controls[ti]
            gen = {
                k: 100.0 * np.mean(w * c.reshape((-1,) + (1,) * (w.ndim - 1)), axis=0)
                for k, w in self.t["ff_mod_stack"]["~"].items()
            }
            o = sum(a @ gen[f"w0__{k}"] for k, a in enumerate(inps)) + gen["b0"]
            for layer in range(1, self.cfg.ff_hidden_layers + 1):
                o = _relu(o) @ gen[f"w{layer}"] + gen[f"b{layer}"]
            direction, mag = o[..., 0], o[..., 1]
            scale = np.sqrt(np.mean(pp**2) + 1e-9)
            step = direction * (scale * np.exp(mag * self.cfg.exp_mult)) * self.cfg.step_mult * lr_mult[ti]
            updates.append(-step.reshape(p.shape))
        self.it += 1
        return updates


@pytest.mark.parametrize("k_total", [10, 50])  # K ≤ 10: all loss-EMA half-lives equal; 50: distinct
def test_update_matches_hyper_v2_rederivation(k_total):
    config = VeLOConfig(adam_skip=False)
    theta = _perturbed(config, seed=1, sigma=0.05)
    params_seq = [_tree(10 + t) for t in range(5)]
    grads_seq = [_tree(20 + t, scale=0.3 * (t + 1)) for t in range(5)]
    losses = (2.0, 1.5, 1.7, 1.2, 1.4)  # loss features are on from the 3rd step; a new minimum at the 4th
    ours, _ = _run(theta, config, k_total, params_seq, grads_seq, losses)
    ref = RefVeLO(theta, config, jax.tree.leaves(params_seq[0]), k_total)
    for t in range(5):
        expected = ref.step(jax.tree.leaves(params_seq[t]), jax.tree.leaves(grads_seq[t]), losses[t])
        got = jax.tree.leaves(ours[t])
        for e, g in zip(expected, got, strict=True):
            assert np.max(np.abs(e)) > 0
            np.testing.assert_allclose(np.asarray(g), e, rtol=2e-3, atol=2e-3 * np.max(np.abs(e)))


# ----------------------------------------------------------------------------------------------------------------
# The family interface
# ----------------------------------------------------------------------------------------------------------------
def test_meta_shapes_sizes_and_template():
    config = VeLOConfig()
    theta = config.init(_tree(0), jax.random.key(0))
    assert config.lstm_input_size == 30 and config.ff_input_size == 30  # same counts as the published VeLO
    rnn = theta["rnn_params"]
    assert rnn["rnn/linear"]["w"].shape == (64, 128)
    assert rnn["linear"]["w"].shape == (30, 32)
    assert rnn["rnn_to_controls"]["w"].shape == (32, 8)
    ff = theta["ff_mod_stack"]["~"]
    assert [ff[f"w0__{i}"].shape[1] for i in range(14)] == [1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3]
    assert ff["w1"].shape == (8, 4, 4) and ff["w2"].shape == (8, 4, 3) and ff["b2"].shape == (8, 3)
    assert theta["lstm_init_state"]["hidden"].shape == (1, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(theta))
    assert ravel_pytree(theta)[0].size == 12930

    template = config.template(("a/kernel", "b/bias"))
    assert jax.tree.structure(template) == jax.tree.structure(theta)
    assert jax.tree.map(np.shape, template) == jax.tree.map(np.shape, theta)
    assert jax.tree.structure(config.template(())) == jax.tree.structure(theta)  # model-agnostic

    published = VeLOConfig.published()
    assert ravel_pytree(published.template(()))[0].size == 2_320_385
    assert "adam_skip" not in published.template(()) and "adam_skip" not in VeLOConfig(adam_skip=False).init(
        None, jax.random.key(0)
    )


def test_state_shapes_and_size():
    config = VeLOConfig()
    params = _tree(0)
    state = config.build(config.init(params, jax.random.key(0)), 10).init(params)
    assert isinstance(state, VeLOState)
    # Decays on a leading axis.
    assert state.mom["conv"]["kernel"].shape == (3, 3, 3, 2, 4)
    assert state.rms["dense"]["kernel"].shape == (1, 6, 6)
    # conv kernel (3, 3, 2, 4): largest axis 3 (4), second largest axis 1 (the later of the two 3s).
    assert state.fac_row["conv"]["kernel"].shape == (3, 3, 3, 2)
    assert state.fac_col["conv"]["kernel"].shape == (3, 3, 2, 4)
    assert state.fac_full["conv"]["kernel"].shape == (0,)
    assert state.fac_full["conv"]["bias"].shape == (3, 4) and state.fac_row["conv"]["bias"].shape == (0,)
    assert state.fac_full["scale"].shape == (3,) and state.mom["scale"].shape == (3,)
    assert state.lstm_hidden.shape == (4, 32) and state.loss_mean.shape == (10,)

    # A model dominated by weight matrices: ≈ 4× the params (3 momenta + 1 rms; paper Table 1: 4.0×).
    big = {"kernel": jnp.zeros((784, 32)), "bias": jnp.zeros(32), "head": jnp.zeros((32, 10))}
    state = config.build(config.init(big, jax.random.key(0)), 10).init(big)

    def nbytes(tree: Any) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    n = 784 * 32 + 32 + 320
    expected = 4 * (4 * n + 3 * 32 + 3 * (784 + 32) + 3 * (32 + 10) + 2 * 3 * 32 + 10 + 10) + 2 * 4
    assert nbytes(state) == expected
    assert 4.0 < nbytes(state) / nbytes(big) < 4.3


def test_psi0_is_adam():
    config = VeLOConfig()
    params = _tree(0)
    target = _tree(5)
    theta = config.init(params, jax.random.key(3))

    def loss_fn(p):
        return sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True))

    def train(step_fn, state):
        p, curve, first = params, [], None
        for _ in range(20):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, state = step_fn(g, state, p, loss)
            first = u if first is None else first
            p = optax.apply_updates(p, u)
            curve.append(float(loss))
        return first, np.asarray(curve + [float(loss_fn(p))])

    first, ours = train(lambda g, s, p, loss: _update(config, theta, 20, g, s, p, loss), _init(config, theta, params))
    adam = optax.adam(3e-3)
    first_adam, theirs = train(jax.jit(lambda g, s, p, loss: adam.update(g, s, p)), adam.init(params))
    # The first update equals Adam(3e-3)'s; 20 steps on a quadratic go down exactly like Adam's.
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(first_adam), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)
    assert ours[-1] < 0.95 * ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_one_compile_for_every_k():
    config = VeLOConfig()
    params, grads = _tree(0), _tree(1, scale=0.1)
    theta = _perturbed(config, 2, 0.05)
    traces = []

    @jax.jit
    def two_steps(k_total):
        traces.append(1)
        tx = velo(theta, config, k_total)
        s = tx.init(params)
        u, s = tx.update(grads, s, params, value=1.0)
        u, s = tx.update(grads, s, params, value=0.9)
        return u

    u10, u37 = two_steps(10), two_steps(37)
    assert len(traces) == 1
    assert _all_finite(u10) and _all_finite(u37)
    # K is a feature: different horizons give different steps.
    assert not np.allclose(np.asarray(u10["dense"]["kernel"]), np.asarray(u37["dense"]["kernel"]))


def test_vmap_over_flat_meta_vectors_matches_single_runs():
    config = VeLOConfig()
    params_seq = [_tree(10 + t) for t in range(3)]
    grads_seq = [_tree(20 + t, scale=0.2) for t in range(3)]
    # Well-separated losses: VeLO's loss features divide differences of loss EMAs, and with nearly equal losses
    # they amplify the last-ulp differences between two compiles to ~1% of the step.
    losses = (2.0, 1.0, 0.5)
    unravel = ravel_pytree(config.template(()))[1]
    base = ravel_pytree(config.init(None, jax.random.key(0)))[0]
    vectors = base[None] + 0.05 * jax.random.normal(jax.random.key(1), (3, base.size))

    # K traced in both runs (a constant K is folded at compile time, with last-ulp differences in the loss-EMA
    # decays; the loss features are ill-conditioned when the half-lives are close, as they are for small K).
    init = jax.jit(jax.vmap(lambda v: velo(unravel(v), config, 40).init(params_seq[0])))
    step = jax.jit(
        jax.vmap(
            lambda v, k, s, g, p, loss: velo(unravel(v), config, k).update(g, s, p, value=loss),
            in_axes=(0, None, 0, None, None, None),
        )
    )
    state, batched = init(vectors), []
    for p, g, loss in zip(params_seq, grads_seq, losses, strict=True):
        u, state = step(vectors, jnp.float32(40), state, g, p, jnp.float32(loss))
        batched.append(u)
    for i in range(3):
        single, _ = _run(unravel(vectors[i]), config, 40, params_seq, grads_seq, losses)
        for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s), rtol=1e-5, atol=1e-8)


def test_nan_gradient_gives_zero_update_and_clean_state():
    config = VeLOConfig()
    theta = _perturbed(config, 3, 0.05)
    params = _tree(0)
    _, state = _update(config, theta, 10, _tree(1, scale=0.1), _init(config, theta, params), params, 1.0)
    bad = _tree(2, scale=0.1)
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[1, 2].set(jnp.nan)
    bad["scale"] = jnp.full((), jnp.inf, jnp.float32)
    u, new_state = _update(config, theta, 10, bad, state, params, 0.9)
    assert np.all(np.asarray(u["dense"]["kernel"]) == 0) and float(u["scale"]) == 0.0
    assert np.any(np.asarray(u["conv"]["kernel"]) != 0)
    assert _all_finite(u) and _all_finite(new_state)
    for field in ("mom", "rms", "fac_row", "fac_col", "fac_full"):
        before, after = getattr(state, field), getattr(new_state, field)
        np.testing.assert_array_equal(after["dense"]["kernel"], before["dense"]["kernel"])
        np.testing.assert_array_equal(after["scale"], before["scale"])
    assert not np.array_equal(new_state.mom["conv"]["kernel"], state.mom["conv"]["kernel"])


@pytest.mark.parametrize("bad_loss", [np.nan, np.inf])
def test_non_finite_loss_never_enters_loss_features(bad_loss):
    config = VeLOConfig()
    theta = _perturbed(config, 3, 0.05)
    params = _tree(0)
    state = _init(config, theta, params)
    for t, loss in enumerate((2.0, 1.7, 1.8, 1.5)):
        _, state = _update(config, theta, 10, _tree(30 + t, scale=0.1), state, params, loss)
    u, after = _update(config, theta, 10, _tree(40, scale=0.1), state, params, bad_loss)
    assert _all_finite(u) and _all_finite(after)
    for field in ("loss_mean", "loss_min", "loss_count"):
        np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
    assert int(after.count) == 5


def test_bf16_params_keep_their_dtype():
    config = VeLOConfig()
    theta = _perturbed(config, 5, 0.05)
    params = _tree(0, dtype=jnp.bfloat16)
    grads = _tree(1, scale=0.1, dtype=jnp.bfloat16)
    u, state = _update(config, theta, 10, grads, _init(config, theta, params), params, 1.0)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mom))
    assert _all_finite(u) and any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def test_beyond_horizon_stays_finite():
    config = VeLOConfig(adam_skip=False)
    theta = _perturbed(config, 6, 0.05)
    target = _tree(5)

    @jax.jit
    def value_and_grad(p):
        return jax.value_and_grad(
            lambda q: sum(
                jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(target), strict=True)
            )
        )(p)

    p = _tree(0)
    s = _init(config, theta, p)
    for _ in range(30):  # 6× past K = 5
        loss, g = value_and_grad(p)
        u, s = _update(config, theta, 5, g, s, p, loss)
        assert _all_finite(u)
        p = optax.apply_updates(p, u)
    assert _all_finite(p) and _all_finite(s) and int(s.count) == 30


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lstm_hidden_size": 0}, "lstm_hidden_size"),
        ({"lstm_hidden_size": 2.5}, "lstm_hidden_size"),
        ({"ff_hidden_size": True}, "ff_hidden_size"),
        ({"ff_hidden_layers": -1}, "ff_hidden_layers"),
        ({"param_inits": "8"}, "param_inits"),
        ({"momentum_decays": ()}, "momentum_decays"),
        ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
        ({"momentum_decays": 0.9}, "momentum_decays"),
        ({"rms_decays": (0.9, 0.99)}, "rms_decays"),
        ({"adafactor_decays": ("0.9",)}, "adafactor_decays"),
        ({"adafactor_decays": (0.9, 0.99)}, "adafactor_decays"),
        ({"exp_mult": 0.0}, "exp_mult"),
        ({"step_mult": -1e-3}, "step_mult"),
        ({"init_lr": float("nan")}, "init_lr"),
        ({"eps": 0}, "eps"),
        ({"adam_skip": 1}, "adam_skip"),
        ({"learned_step_init": float("inf")}, "learned_step_init"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^optimizer\.{field}:"):
        VeLOConfig(**kwargs)


def test_config_dict_round_trip():
    config = VeLOConfig(lstm_hidden_size=16, momentum_decays=[0.8, 0.95], adafactor_decays=[0.9], init_lr=1e-3)
    assert config.momentum_decays == (0.8, 0.95)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["family"] == "velo"
    assert VeLOConfig.from_dict(d) == config
    assert VeLOConfig.published() == VeLOConfig(lstm_hidden_size=512, param_inits=256, adam_skip=False)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden'\]"):
        VeLOConfig.from_dict({"family": "velo", "hidden": 3})
    with pytest.raises(ValueError, match=r"optimizer\.family"):
        VeLOConfig.from_dict({"family": "l3rs"})
    with pytest.raises(ValueError, match=r"meta-parameter \['lstm_init_state'\]\['cell'\] has shape \(1, 16\)"):
        velo(VeLOConfig(lstm_hidden_size=16).init(None, jax.random.key(0)), VeLOConfig(), 10)


# ----------------------------------------------------------------------------------------------------------------
# hyper_v2 checkpoint files
# ----------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class ParameterCheckpoint:  # learned_optimization.outer_trainers.gradient_learner.ParameterCheckpoint's fields
    params: Any
    gen_id: str
    step: int


class LSTMState(NamedTuple):  # haiku.LSTMState's fields
    hidden: Any
    cell: Any


def _as_learned_optimization_theta(theta: dict) -> dict:
    out = jax.tree.map(np.asarray, dict(theta))
    out["lstm_init_state"] = LSTMState(**out["lstm_init_state"])
    return out


def test_save_load_round_trip_is_exact(tmp_path):
    config = VeLOConfig(lstm_hidden_size=16, param_inits=4, momentum_decays=(0.8, 0.95), adafactor_decays=(0.9,))
    theta = _perturbed(config, 7, 0.1)
    path = tmp_path / "velo.msgpack"
    save_hyper_v2(path, theta, config, step=12)
    loaded, loaded_config = load_hyper_v2(path)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(theta)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(theta), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The file itself: a ParameterCheckpoint state dict holding the Haiku layout.
    raw = flax.serialization.msgpack_restore(path.read_bytes())
    assert set(raw) == {"params", "gen_id", "step"} and raw["step"] == 12
    assert set(raw["params"]) == {"lstm_init_state", "rnn_params", "ff_mod_stack", "adam_skip"}
    assert set(raw["params"]["rnn_params"]) == {
        "linear",
        "linear_1",
        "linear_2",
        "rnn/linear",
        "rnn_to_controls",
        "step_size",
    }
    assert raw["params"]["rnn_params"]["rnn/linear"]["w"].shape == (32, 64)
    assert set(raw["params"]["ff_mod_stack"]) == {"~"}
    assert set(raw["params"]["lstm_init_state"]) == {"hidden", "cell"}

    # Identical updates (with the default config, whose compiled update the other tests share).
    default = VeLOConfig()
    theta = _perturbed(default, 9, 0.05)
    save_hyper_v2(path, theta, default)
    loaded, loaded_config = load_hyper_v2(path)
    assert loaded_config == default
    params_seq = [_tree(10 + t) for t in range(4)]
    grads_seq = [_tree(20 + t, scale=0.2) for t in range(4)]
    losses = (1.0, 0.8, 0.9, 0.7)
    ours, _ = _run(theta, default, 10, params_seq, grads_seq, losses)
    again, _ = _run(loaded, loaded_config, 10, params_seq, grads_seq, losses)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("wrapper", ["parameter_checkpoint", "tuple", "legacy_namedtuple"])
def test_loads_files_written_like_learned_optimization(tmp_path, wrapper):
    config = VeLOConfig(lstm_hidden_size=16, param_inits=4, adam_skip=False)
    theta = _perturbed(config, 8, 0.1)
    lo_theta = _as_learned_optimization_theta(theta)
    if wrapper == "parameter_checkpoint":
        data = flax.serialization.to_bytes(ParameterCheckpoint(lo_theta, "gen_5620", 5620))
    elif wrapper == "tuple":
        data = flax.serialization.to_bytes((lo_theta, "", 0))
    else:  # flax before 2022 wrote namedtuples as {"name", "fields", "values"}
        sd = flax.serialization.to_state_dict(ParameterCheckpoint(lo_theta, "gen", 1))
        init = sd["params"]["lstm_init_state"]
        sd["params"]["lstm_init_state"] = {
            "name": "LSTMState",
            "fields": {"0": "hidden", "1": "cell"},
            "values": {"0": init["hidden"], "1": init["cell"]},
        }
        data = flax.serialization.msgpack_serialize(sd)
    path = tmp_path / "params"
    path.write_bytes(data)
    loaded, loaded_config = load_hyper_v2(path)
    assert loaded_config == config  # inferred from the shapes
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(theta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rewrite(path, edit):
    raw = flax.serialization.msgpack_restore(path.read_bytes())
    edit(raw["params"])
    path.write_bytes(flax.serialization.msgpack_serialize(raw))


def test_bad_files_give_errors_naming_the_key(tmp_path):
    config = VeLOConfig(lstm_hidden_size=16, param_inits=4)
    path = tmp_path / "velo.msgpack"
    save_hyper_v2(path, config.init(None, jax.random.key(0)), config)

    def wrong_shape(p):
        p["rnn_params"]["step_size"]["w"] = np.zeros((16, 2), np.float32)

    _rewrite(path, wrong_shape)
    with pytest.raises(
        ValueError, match=r"\['rnn_params'\]\['step_size'\]\['w'\] has shape \(16, 2\), expected \(16, 1\)"
    ):
        load_hyper_v2(path)

    save_hyper_v2(path, config.init(None, jax.random.key(0)), config)
    _rewrite(path, lambda p: p["ff_mod_stack"]["~"].pop("w1"))
    with pytest.raises(ValueError, match=r"missing key params\['ff_mod_stack'\]\['~'\]\['w1'\]"):
        load_hyper_v2(path)

    save_hyper_v2(path, config.init(None, jax.random.key(0)), config)
    _rewrite(path, lambda p: p["rnn_params"].update(extra={"w": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected key\(s\) params\['rnn_params'\]\['extra'\]\['w'\]"):
        load_hyper_v2(path)

    # Without our recorded config the sizes are inferred, which needs the LSTM state.
    lo_theta = _as_learned_optimization_theta(VeLOConfig(lstm_hidden_size=16, adam_skip=False).template(()))
    sd = flax.serialization.to_state_dict(ParameterCheckpoint(lo_theta, "gen", 1))
    del sd["params"]["lstm_init_state"]["hidden"]
    path.write_bytes(flax.serialization.msgpack_serialize(sd))
    with pytest.raises(ValueError, match=r"missing key params\['lstm_init_state'\]\['hidden'\]"):
        load_hyper_v2(path)

    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a flax msgpack checkpoint|not a hyper_v2 checkpoint"):
        load_hyper_v2(path)

    with pytest.raises(ValueError, match=r"save_hyper_v2: missing key params\['adam_skip'\]\['log_lr'\]"):
        save_hyper_v2(path, VeLOConfig(adam_skip=False).init(None, jax.random.key(0)), VeLOConfig())


def test_published_size_checkpoint_loads_and_steps(tmp_path):
    published = VeLOConfig.published()
    theta = published.init(None, jax.random.key(0))
    path = tmp_path / "params"
    data = flax.serialization.to_bytes(ParameterCheckpoint(_as_learned_optimization_theta(theta), "g", 1))
    path.write_bytes(data)
    loaded, config = load_hyper_v2(path)
    assert config == published
    assert ravel_pytree(loaded)[0].size == 2_320_385
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    state = _init(config, loaded, params)
    for loss in (1.0, 0.9):
        u, state = _update(config, loaded, 100, grads, state, params, loss)
        params = optax.apply_updates(params, u)
    assert _all_finite(u) and _all_finite(state)
    assert np.any(np.asarray(u["w"]) != 0)
    assert state.lstm_hidden.shape == (2, 512)
