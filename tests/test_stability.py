"""L3RS stability options (issue 11 part 3): each option's math against hand-computed values, its refusal of bad
values (naming the field), and its round trip through artifacts (old dicts without the fields load as before).

Features are read black-box through a ψ whose MLP routes one feature x_i to the λ-logit (``test_edge_cases``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _paper import paper_config
from test_edge_cases import _runner, _selector, _tree  # the selector ψ and a jitted runner

import l3rs
from l3rs.config import ConfigError, config_from_dict

EPS = 1e-8
G = 3  # γ ∈ {0, .9, .99}; feature index: EMA_γ0 of log‖w‖ = 0, of log‖g‖ = G, loss = 2G, relative time = 3G …
ALPHAS = np.linspace(0.0, 1.0, 11)
BETAS = np.logspace(-4.0, -1.0, 4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


def _features_seen(config, indices, grads, losses, params=None, total_steps=20):
    """λ per step and layer for selector ψs on ``indices``: log λ = the feature (lambda_skip=False)."""
    params = _tree(0) if params is None else params
    out = {}
    for i in indices:
        init, update = _runner(_selector(config, params, i), config, total_steps)
        state, rows = init(params), []
        for g, loss in zip(grads, losses, strict=True):
            _, state = update(g, state, params, jnp.float32(loss))
            rows.append(np.log(np.asarray(state.step_norm, np.float64)))
        out[i] = np.asarray(rows)  # [steps, layers]
    return out


# ----------------------------------------------------------------------------------------------------------
# Config: validation, serialisation, old artifacts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"feature_scale": "scale_free"}, "optimizer.feature_scale"),
        ({"past_horizon": "wrap"}, "optimizer.past_horizon"),
        ({"lambda_max_adam_ratio": 1.0}, "optimizer.lambda_max_adam_ratio"),
        ({"lambda_max_adam_ratio": 0.5}, "optimizer.lambda_max_adam_ratio"),
        ({"lambda_max_adam_ratio": float("inf")}, "optimizer.lambda_max_adam_ratio"),
        ({"lambda_max_adam_ratio": "10"}, "optimizer.lambda_max_adam_ratio"),
        ({"lambda_max_adam_ratio": True}, "optimizer.lambda_max_adam_ratio"),
        ({"absolute_time_k_max": 0.5}, "optimizer.absolute_time_k_max"),
        ({"absolute_time_k_max": "100"}, "optimizer.absolute_time_k_max"),
        ({"lambda_skip": "yes"}, "optimizer.lambda_skip"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        paper_config(**kwargs)


def test_bad_value_in_a_run_config_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"optimizer\.lambda_max_adam_ratio"):
        config_from_dict({"optimizer": {"lambda_max_adam_ratio": 0.0}}).validate()


def test_options_round_trip_through_to_dict_and_artifacts(tmp_path):
    config = paper_config(
        feature_scale="log_relative", lambda_max_adam_ratio=10.0, past_horizon="decay", absolute_time_k_max=100
    )
    d = json.loads(json.dumps(config.to_dict()))
    assert d["feature_scale"] == "log_relative" and d["lambda_max_adam_ratio"] == 10.0
    assert l3rs.L3RSConfig.from_dict(d) == config
    params = _tree(0)
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    from l3rs.artifact import load_psi, save_artifact

    save_artifact(str(tmp_path / "psi"), psi, config, {"k_range": [10, 100]})
    _, loaded, _ = load_psi(str(tmp_path / "psi"))
    assert loaded == config


def test_old_artifacts_without_the_fields_load_with_the_original_behaviour():
    with open(os.path.join(ROOT, "tests", "data", "psi_v0_fmnist", "metadata.json")) as f:
        old = json.load(f)["optimizer"]
    assert "feature_scale" not in old
    config = l3rs.L3RSConfig.from_dict(old, recorded=True)
    assert (config.feature_scale, config.lambda_max_adam_ratio) == ("absolute", None)
    assert (config.past_horizon, config.absolute_time_k_max, config.lambda_skip) == ("extrapolate", None, True)


# ----------------------------------------------------------------------------------------------------------
# The bound on λ in Adam-equivalent steps
# ----------------------------------------------------------------------------------------------------------
def _constant_logit_psi(config, params, log_ratio):
    """ψ₀ with the output layer's weights zeroed: z_λ = log(init_lr) + log_ratio exactly (μ = mixing0)."""
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    mlp = list(psi.mlp)
    last = dict(mlp[-1])
    last["w"] = jnp.zeros_like(last["w"])
    last["b"] = last["b"].at[-1].add(jnp.float32(log_ratio))
    mlp[-1] = last
    return psi.replace(mlp=mlp)


@pytest.mark.parametrize("c_max", [3.0, 10.0])
def test_lambda_bound_matches_hand_computed_squashing(c_max):
    """First step: Adam's direction is −g/(|g| + ε); λ = lr₀‖d‖·c·σ(log r − log(c − 1)) for unbounded ratio r."""
    config = paper_config(lambda_max_adam_ratio=c_max)
    params, grads = _tree(0), _tree(1, 0.1)
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm_d = np.array([_norm(x / (np.abs(x) + 1e-8)) for x in g])
    for r in (1e-3, 1.0, 100.0, 1e6):
        init, update = _runner(_constant_logit_psi(config, params, np.log(r)), config)
        u, state = update(grads, init(params), params, jnp.float32(1.0))
        ratio = c_max / (1.0 + np.exp(-(np.log(r) - np.log(c_max - 1.0))))
        want = config.init_lr * (norm_d + EPS) * ratio
        np.testing.assert_allclose(np.asarray(state.step_norm), want, rtol=2e-5)
        for x, nd in zip(jax.tree.leaves(u), norm_d, strict=True):
            assert _norm(x) <= c_max * config.init_lr * (nd + EPS) * (1 + 1e-5)  # ‖Δθ‖ ≤ λ < c·lr₀‖d_adam‖
        if r == 1.0:  # ψ₀'s own step is unchanged by the bound
            np.testing.assert_allclose(np.asarray(state.step_norm), config.init_lr * (norm_d + EPS), rtol=2e-5)


def test_paper_lambda_exp_z_without_the_skip():
    """lambda_skip=False is §4.1's λ = exp(z_{P+1}): with a constant logit, λ = init_lr whatever ‖d‖ is."""
    config = paper_config(lambda_skip=False)
    params = _tree(0)
    init, update = _runner(_constant_logit_psi(config, params, np.log(2.0)), config)
    _, state = update(_tree(1, 5.0), init(params), params, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(state.step_norm), 2.0 * config.init_lr, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Scale-free features
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["relative", "log_relative"])
def test_relative_features_match_hand_computed_values(scale):
    config = paper_config(lambda_skip=False, feature_scale=scale)
    params = _tree(0)
    grads = [_tree(1, 0.1), _tree(2, 0.3), _tree(3, 0.05)]
    losses = [1.6, 0.8, 0.05]
    p_i = 3 * G + 11 + 4  # log‖d_1‖ (Adam) is the first feature after the time features
    seen = _features_seen(config, [0, G, 2 * G, p_i], grads, losses, params=params)
    ng = np.array([[_norm(x) for x in jax.tree.leaves(g)] for g in grads])
    np.testing.assert_allclose(seen[0], 0.0, atol=1e-6)  # params fixed here: log‖w‖ − log‖w₀‖ = 0
    np.testing.assert_allclose(seen[G], np.log(ng + EPS) - np.log(ng[0] + EPS), atol=2e-5)  # γ = 0: raw
    want_loss = [x / (1.6 + EPS) if scale == "relative" else np.log(x) - np.log(1.6 + EPS) for x in losses]
    np.testing.assert_allclose(seen[2 * G][:, 0], want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen[p_i][0], 0.0, atol=1e-6)  # log‖d‖ relative to its first value


def test_relative_features_do_not_change_with_the_loss_and_gradient_scale():
    """Multiply every loss by 20 and every gradient by 1e-3: the relative features, hence the updates, stay put
    (up to the ε inside the norms and Adam)."""
    config = paper_config(feature_scale="relative")
    params = _tree(0)
    psi = l3rs.init_psi(config, params, jax.random.key(3))
    vec = l3rs.psi_to_vector(psi)
    psi = l3rs.vector_to_psi(vec + jnp.asarray(0.3 * np.random.default_rng(0).normal(size=vec.shape)), psi)
    grads = [_tree(1 + t, 0.1) for t in range(3)]
    runs = []
    for lscale, gscale in ((1.0, 1.0), (20.0, 1e-3)):
        init, update = _runner(psi, config)
        state = init(params)
        for t, g in enumerate(grads):
            _, state = update(
                jax.tree.map(lambda x, s=gscale: x * s, g), state, params, jnp.float32(lscale * (1.5 - t / 3))
            )
        runs.append(np.asarray(state.step_norm) / np.asarray([_norm(x) for x in jax.tree.leaves(params)]))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Past the horizon
# ----------------------------------------------------------------------------------------------------------
def test_clamp_holds_the_relative_time_features_at_the_last_planned_step():
    horizon, steps = 3, 6
    grads, losses = [_tree(5, 0.1)] * steps, [1.0] * steps
    for mode in ("extrapolate", "clamp"):
        config = paper_config(lambda_skip=False, past_horizon=mode)
        seen = _features_seen(config, [3 * G + 10], grads, losses, total_steps=horizon)[3 * G + 10][:, 0]  # α = 1
        ks = np.arange(steps, dtype=np.float64)
        k_eff = ks if mode == "extrapolate" else np.minimum(ks, horizon - 1)
        np.testing.assert_allclose(seen, np.tanh(10.0 * (k_eff / horizon - 1.0)), atol=1e-6)


def test_decay_scales_lambda_by_k_over_k_plus_one_past_the_horizon():
    horizon, steps = 3, 6
    params = _tree(0)
    psi = _constant_logit_psi(paper_config(), params, 0.0)
    lams = {}
    for mode in ("clamp", "decay"):
        config = paper_config(past_horizon=mode)
        init, update = _runner(psi, config, horizon)
        state, rows = init(params), []
        for _ in range(steps):
            _, state = update(_tree(5, 0.1), state, params, jnp.float32(1.0))
            rows.append(np.asarray(state.step_norm, np.float64))
        lams[mode] = np.asarray(rows)
    ks = np.arange(steps)
    want = np.minimum(1.0, horizon / (ks + 1.0))
    np.testing.assert_allclose(
        lams["decay"] / lams["clamp"], np.broadcast_to(want[:, None], lams["clamp"].shape), rtol=1e-5
    )


def test_absolute_time_features_see_at_most_absolute_time_k_max():
    config = paper_config(lambda_skip=False, absolute_time_k_max=100)
    idx = [3 * G + 11 + j for j in range(4)]
    for horizon, k_seen in ((50, 50), (500, 100)):
        seen = _features_seen(config, idx, [_tree(5, 0.1)], [1.0], total_steps=horizon)
        got = np.array([seen[i][0, 0] for i in idx])
        np.testing.assert_allclose(got, np.tanh(np.log(k_seen * BETAS)), atol=1e-6)


def test_options_keep_one_compile_for_every_horizon():
    config = paper_config(
        feature_scale="relative", lambda_max_adam_ratio=10.0, past_horizon="decay", absolute_time_k_max=100
    )
    params = _tree(0)
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    traces = []

    @jax.jit
    def run(k):
        traces.append(1)
        tx = l3rs.l3rs(psi, config, k)
        u, _ = tx.update(_tree(1, 0.1), tx.init(params), params, value=jnp.float32(1.0))
        return u

    for k in (5, 50, 500):
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(run(jnp.int32(k))))
    assert len(traces) == 1
    assert dataclasses.replace(config, past_horizon="clamp") != config


# ----------------------------------------------------------------------------------------------------------
# Meta-training tasks cut short of the horizon the optimizer is told
# ----------------------------------------------------------------------------------------------------------
def _dist(p: float):
    from l3rs.meta.tasks import TaskDistribution

    return TaskDistribution("sklearn_digits", "meta_train", num_classes=3, batch_size=16, eval_batch_size=32,
                            k_min=5, k_max=40, truncation_prob=p)  # fmt: skip


def test_truncation_draws_run_lengths_from_their_own_stream():
    from l3rs.meta.tasks import _header, task_header

    seeds = range(400)
    told = {s: _header(np.random.default_rng(s), _dist(0.0))[1] for s in seeds}
    assert all(task_header(s, _dist(0.0))[1] == told[s] for s in seeds)  # p = 0: exactly the old tasks
    for p in (0.5, 1.0):
        runs = {s: task_header(s, _dist(p))[1] for s in seeds}
        assert all(min(5, told[s]) <= runs[s] <= told[s] for s in seeds)
        assert all(_header(np.random.default_rng(s), _dist(p))[1] == told[s] for s in seeds)  # K told unchanged
        cut = np.mean([runs[s] < told[s] for s in seeds])
        # P(cut) = p·(1 − E[1/(told − 5 + 1)]) ≈ 0.9p for K ~ U[5, 40]; generous bounds, fixed seeds.
        assert 0.75 * p < cut <= p + 0.05, (p, cut)


@pytest.mark.parametrize("p", [-0.1, 1.5, "half", True])
def test_bad_truncation_prob_is_refused(p):
    with pytest.raises(ValueError, match="truncation_prob"):
        _dist(p)
    with pytest.raises(ConfigError, match=r"task\.truncation_prob"):
        config_from_dict({"task": {"truncation_prob": p}}).validate()


def test_a_truncated_task_runs_k_steps_with_the_optimizer_told_its_horizon():
    """Cosine Adam told K = 30 but cut after 8 steps equals a plain optax loop of 8 steps of that schedule."""
    import optax

    from l3rs import models
    from l3rs.data import normalize
    from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, cosine_schedule
    from l3rs.meta.tasks import load_task_pool, sample_task

    dist = _dist(1.0)
    pool = load_task_pool(dist)
    seed = next(s for s in range(100) if (t := sample_task(s, dist, pool)).told_steps >= t.num_steps + 10)
    task = sample_task(seed, dist, pool)
    module = models.create("small_cnn", num_classes=3, features=(8, 16))
    variables = models.init_variables(module, jax.random.key(0), (16, 16, 1))
    loop = InnerLoop(module, variables, pool, adam_optimizer_fn("cosine"), num_classes=3)
    got = float(jax.device_get(loop.run_arrays(jnp.float32(1e-2), task))["loss"])
    params = models.fresh_head(variables["params"], jax.random.key(task.head_seed), 3)
    tx = optax.adam(cosine_schedule(jnp.float32(1e-2), jnp.int32(task.told_steps)))
    state = tx.init(params)

    def loss_fn(p, x, y):
        logits = module.apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, state, x, y):
        u, state = tx.update(jax.grad(loss_fn)(params, normalize(x), y), state, params)
        return optax.apply_updates(params, u), state

    for i in range(task.num_steps):
        params, state = step(params, state, pool.train_images[task.train_idx[i]], task.train_y[i])
    want = float(loss_fn(params, normalize(pool.eval_images[task.eval_idx]), task.eval_y))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    untruncated = float(jax.device_get(loop.run_arrays(jnp.float32(1e-2), task, num_steps=task.num_steps))["loss"])
    assert abs(untruncated - got) > 1e-4  # told K = steps run: a different schedule
    assert loop.compiles == 1


def test_use_time_options_on_a_trained_psi(tmp_path):
    """``l3rs.load(..., options=)`` and jobs/stability/with_options.py change only the use-time options; ψ and its
    checksum stay, the derived artifact says where it came from, and structural fields are refused by name."""
    import subprocess
    import sys

    from l3rs.artifact import load_psi, save_artifact

    params = _tree(0)
    config = paper_config()
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    save_artifact(str(tmp_path / "psi"), psi, config, {"run_name": "r"})
    tx = l3rs.load(str(tmp_path / "psi"), total_steps=500, options={"absolute_time_k_max": 100})
    assert hasattr(tx, "init") and hasattr(tx, "update")
    with pytest.raises(ValueError, match="hidden_sizes.*absolute_time_k_max"):
        l3rs.load(str(tmp_path / "psi"), total_steps=10, options={"hidden_sizes": (8,)})
    with pytest.raises(ValueError, match="absolute_time_k_max"):
        l3rs.load(str(tmp_path / "psi"), total_steps=10, options={"absolute_time_k_max": 0})
    script = os.path.join(ROOT, "jobs", "stability", "with_options.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "psi"), str(tmp_path / "capped"),
                          "absolute_time_k_max=100", "past_horizon=clamp"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    got, derived, meta = load_psi(str(tmp_path / "capped"))
    assert (derived.absolute_time_k_max, derived.past_horizon) == (100, "clamp")
    assert dataclasses.replace(derived, absolute_time_k_max=None, past_horizon="extrapolate") == config
    _, _, src_meta = load_psi(str(tmp_path / "psi"))
    assert meta["sha256"] == src_meta["sha256"] and meta["derived_from"]["sha256"] == src_meta["sha256"]
    assert meta["label"] == "L3RS (r, absolute_time_k_max=100, past_horizon=clamp)"
    assert not os.path.isabs(meta["derived_from"]["artifact"])
    args = [sys.executable, script, str(tmp_path / "psi"), str(tmp_path / "capped"), "past_horizon=clamp"]
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 2 and "already there" in again.stderr


def test_resuming_a_run_that_predates_the_options_keeps_their_original_values(tmp_path):
    """A run saved before the stability fields existed ran with their original behaviour: resuming it under today's
    defaults is refused, naming the field; with the original values it resumes."""
    from l3rs.config import Config
    from l3rs.service.preflight import PreflightError, check_resume, resume_differences

    cfg = Config()
    saved = json.loads(json.dumps(cfg.to_dict()))
    for key in ("feature_scale", "lambda_max_adam_ratio", "past_horizon", "absolute_time_k_max"):
        saved["optimizer"].pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    names = [name for name, _, _ in resume_differences(cfg, str(tmp_path))]
    assert names == ["optimizer.lambda_max_adam_ratio"]  # today's default bound; its features are the original ones
    with pytest.raises(PreflightError, match="optimizer.lambda_max_adam_ratio"):
        check_resume(cfg, str(tmp_path))
    original = cfg.replace(optimizer={"lambda_max_adam_ratio": "none"})
    assert resume_differences(original, str(tmp_path)) == []
    scale_free = cfg.replace(optimizer={"feature_scale": "log_relative", "lambda_max_adam_ratio": "none"})
    assert [name for name, _, _ in resume_differences(scale_free, str(tmp_path))] == ["optimizer.feature_scale"]
