"""NES (l3rs.meta.nes): shaping, sampling, the ascent step, schedules, NaN handling, config errors."""

import dataclasses
import pickle

import numpy as np
import pytest

from l3rs.meta import nes


def cfg(**kw) -> nes.NESConfig:
    base = dict(population_size=8, sigma=0.1, learning_rate=0.05, decay_every=500)
    base.update(kw)
    return nes.NESConfig(**base)


# ------------------------------------------------------------------------------------------ centered ranks
def test_centered_ranks_hand_computed():
    np.testing.assert_array_equal(nes.centered_ranks(np.array([1.0, 2.0, 3.0])), [-0.5, 0.0, 0.5])
    np.testing.assert_array_equal(
        nes.centered_ranks(np.array([10.0, -5.0, 0.0, 7.0, 3.0])), [0.5, -0.5, -0.25, 0.25, 0]
    )


def test_centered_ranks_ties_get_average_rank():
    # ranks [1.5, 1.5, 3, 0] / 3 - 0.5
    np.testing.assert_allclose(nes.centered_ranks(np.array([2.0, 2.0, 5.0, -1.0])), [0.0, 0.0, 0.5, -0.5])
    np.testing.assert_array_equal(nes.centered_ranks(np.full(4, 3.0)), np.zeros(4))


def test_centered_ranks_nonfinite_rank_worst_and_tie():
    # The docstring example: NaN, +inf and -inf are all below every finite value and tie with one another.
    np.testing.assert_array_equal(nes.centered_ranks(np.array([3.0, np.nan, 1.0, 1.0])), [0.5, -0.5, 0.0, 0.0])
    s = nes.centered_ranks(np.array([np.inf, -1e30, np.nan, -np.inf, 0.0]))
    # ranks: the three non-finite share 0,1,2 -> 1; -1e30 -> 3; 0.0 -> 4; /4 - 0.5
    np.testing.assert_array_equal(s, [-0.25, 0.25, -0.25, -0.25, 0.5])
    assert s.sum() == 0.0


def test_centered_ranks_order_independent_and_bounded():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 5, 31).astype(float)
    f[[3, 9]] = np.nan
    perm = rng.permutation(31)
    s = nes.centered_ranks(f)
    np.testing.assert_array_equal(nes.centered_ranks(f[perm]), s[perm])
    assert s.min() >= -0.5 and s.max() <= 0.5 and abs(s.sum()) < 1e-12
    assert nes.centered_ranks(np.array([4.0])).tolist() == [0.0]
    with pytest.raises(ValueError, match="fitness"):
        nes.centered_ranks(np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------------- ask
def test_ask_antithetic_pairs():
    c = cfg(population_size=6, sigma=0.3)
    state = nes.init(c, np.linspace(-1, 1, 5))
    eps, cand = nes.ask(c, state, seed=7)
    assert eps.shape == (3, 5) and cand.shape == (6, 5)
    assert eps.dtype == np.float32 and cand.dtype == np.float32
    sigma = np.float32(0.3)
    np.testing.assert_array_equal(cand[0::2], state.mean + sigma * eps)
    np.testing.assert_array_equal(cand[1::2], state.mean - sigma * eps)
    np.testing.assert_allclose(cand[0::2] + cand[1::2], np.broadcast_to(2 * state.mean, (3, 5)), atol=1e-6)


def test_ask_is_a_pure_function_of_seed_and_generation():
    c = cfg()
    state = nes.init(c, np.zeros(16))
    e1, c1 = nes.ask(c, state, seed=3)
    e2, c2 = nes.ask(c, state, seed=3)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(c1, c2)
    # Documented recipe: the noise is default_rng([seed, generation]).
    expected = np.random.default_rng([3, 0]).standard_normal((4, 16), dtype=np.float32)
    np.testing.assert_array_equal(e1, expected)
    # Through pickle / the checkpoint dict (a resume) the same noise comes back.
    resumed = nes.state_from_dict(pickle.loads(pickle.dumps(nes.state_to_dict(state))))
    np.testing.assert_array_equal(nes.ask(c, resumed, seed=3)[1], c1)
    assert not np.array_equal(nes.ask(c, state, seed=4)[0], e1)
    assert not np.array_equal(nes.ask(c, state._replace(generation=1), seed=3)[0], e1)


def test_ask_rejects_bad_seed():
    c = cfg()
    state = nes.init(c, np.zeros(3))
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="seed"):
            nes.ask(c, state, seed=bad)


# ---------------------------------------------------------------------------------------------------- tell
def test_tell_hand_computed_single_pair():
    c = cfg(population_size=2, sigma=0.5, learning_rate=0.1)
    state = nes.init(c, np.array([1.0, -1.0]))
    eps = np.array([[1.0, 2.0]], np.float32)
    new, info = nes.tell(c, state, eps, np.array([3.0, 1.0]))
    # shaped [0.5, -0.5] -> g = (0.5 - -0.5) * eps / (2 * 0.5) = eps
    assert info["grad_norm"] == pytest.approx(np.sqrt(5.0))
    # First Adam step: m̂ = g, v̂ = g², so the step is lr * g / (|g| + eps_adam) ≈ lr * sign(g).
    np.testing.assert_allclose(new.mean, [1.1, -0.9], rtol=1e-6)
    np.testing.assert_allclose(new.m, 0.1 * eps[0], rtol=1e-6)
    np.testing.assert_allclose(new.v, 0.001 * eps[0] ** 2, rtol=1e-6)
    assert new.generation == 1 and state.generation == 0  # pure: the input state is untouched
    np.testing.assert_array_equal(state.mean, np.array([1.0, -1.0], np.float32))
    assert info["fitness_max"] == 3.0 and info["fitness_min"] == 1.0 and info["fitness_mean"] == 2.0
    assert info["num_nonfinite"] == 0 and info["sigma"] == 0.5 and info["learning_rate"] == 0.1
    assert not info["skipped"]


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_tell_maximises_fitness(direction):
    # f(x) = direction * x[0]: a few steps must move mean[0] the same way.
    c = cfg(population_size=32, sigma=0.1, learning_rate=0.01)
    state = nes.init(c, np.zeros(4))
    for _ in range(5):
        eps, cand = nes.ask(c, state, seed=0)
        state, _ = nes.tell(c, state, eps, direction * cand[:, 0].astype(np.float64))
    assert np.sign(state.mean[0]) == direction
    assert abs(state.mean[0]) > 0.04  # ~5 steps of lr=0.01 along a consistent gradient


def test_nes_converges_on_quadratic():
    rng = np.random.default_rng(1)
    target = rng.normal(size=20).astype(np.float32)
    c = cfg(population_size=32, sigma=0.1, learning_rate=0.05, decay_every=100)
    state = nes.init(c, np.zeros(20))
    start = float(np.linalg.norm(state.mean - target))
    for _ in range(400):
        eps, cand = nes.ask(c, state, seed=5)
        fitness = -np.sum((cand.astype(np.float64) - target) ** 2, axis=1)  # f(x) = -||x - x*||²
        state, info = nes.tell(c, state, eps, fitness)
    final = float(np.linalg.norm(state.mean - target))
    assert start > 2.0
    assert final < 0.02 * start, (start, final)
    assert state.generation == 400 and info["sigma"] == pytest.approx(0.1 * 0.5 ** (399 / 100))


def test_decay_schedule_values():
    c = cfg(sigma=0.2, learning_rate=0.01, decay_every=500)
    assert nes.sigma_at(c, 0) == 0.2
    assert nes.sigma_at(c, 500) == pytest.approx(0.1)
    assert nes.sigma_at(c, 1000) == pytest.approx(0.05)
    assert nes.sigma_at(c, 250) == pytest.approx(0.2 / np.sqrt(2))  # smooth, not stepwise
    assert nes.learning_rate_at(c, 1500) == pytest.approx(0.01 / 8)
    assert nes.sigma_at(cfg(decay_factor=1.0), 10_000) == 0.1
    # ask uses σ_t of the state's generation.
    state = nes.init(c, np.zeros(3))._replace(generation=500)
    eps, cand = nes.ask(c, state, seed=0)
    np.testing.assert_array_equal(cand[0::2], np.float32(0.1) * eps)


def test_nan_candidates_never_poison_the_mean():
    c = cfg(population_size=8)
    state = nes.init(c, np.ones(6))
    for gen in range(10):
        eps, cand = nes.ask(c, state, seed=2)
        fitness = -np.sum(cand.astype(np.float64) ** 2, axis=1)
        fitness[gen % 8] = np.nan
        fitness[(gen + 3) % 8] = np.inf
        fitness[(gen + 5) % 8] = -np.inf
        state, info = nes.tell(c, state, eps, fitness)
        assert info["num_nonfinite"] == 3
        assert np.isfinite(info["fitness_mean"])
        assert np.all(np.isfinite(state.mean)) and np.all(np.isfinite(state.m)) and np.all(np.isfinite(state.v))


def test_nan_candidate_ranks_worst():
    # Candidate 0 diverged, candidate 1 is fine: the step moves away from eps_0 (towards candidate 1).
    c = cfg(population_size=2, learning_rate=0.1)
    state = nes.init(c, np.zeros(1))
    new, _ = nes.tell(c, state, np.array([[1.0]], np.float32), np.array([np.nan, -123.0]))
    assert new.mean[0] < 0


def test_all_nonfinite_generation_is_skipped():
    c = cfg(population_size=4)
    state = nes.init(c, np.arange(3.0))
    eps, _ = nes.ask(c, state, seed=0)
    fitness = np.array([-1.0, -2.0, -3.0, -0.5])
    state, _ = nes.tell(c, state, eps, fitness)
    eps, _ = nes.ask(c, state, seed=0)
    new, info = nes.tell(c, state, eps, np.full(4, np.nan))
    assert info["skipped"] and np.isnan(info["fitness_mean"]) and info["num_nonfinite"] == 4
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.m, state.m)
    assert new.generation == state.generation + 1


def test_weight_decay_shrinks_mean():
    c = cfg(population_size=2, learning_rate=0.1, weight_decay=0.5)
    state = nes.init(c, np.array([4.0]))
    new, _ = nes.tell(c, state, np.array([[1.0]], np.float32), np.array([1.0, 1.0]))  # tie: zero gradient
    np.testing.assert_allclose(new.mean, [4.0 - 0.1 * 0.5 * 4.0], rtol=1e-6)


def test_weight_decay_pulls_toward_the_anchor():
    c = cfg(population_size=2, learning_rate=0.1, weight_decay=0.5)
    state = nes.init(c, np.array([4.0, -1.0]))
    eps, tie = np.array([[1.0, 1.0]], np.float32), np.array([1.0, 1.0])  # tie: zero gradient
    new, _ = nes.tell(c, state, eps, tie, anchor=np.array([2.0, -1.0]))
    np.testing.assert_allclose(new.mean, [4.0 - 0.1 * 0.5 * (4.0 - 2.0), -1.0], rtol=1e-6)  # at the anchor: stays
    origin, _ = nes.tell(c, state, eps, tie, anchor=np.zeros(2))
    default, _ = nes.tell(c, state, eps, tie)
    np.testing.assert_array_equal(origin.mean, default.mean)  # anchor=None is the origin


def test_tell_seeded_passes_the_anchor_as_tell_does():
    c = cfg(population_size=8, weight_decay=0.3)
    state = nes.init(c, np.random.default_rng(1).normal(size=20))
    anchor = np.random.default_rng(2).normal(size=20)
    fitness = np.random.default_rng(3).normal(size=8)
    eps, _ = nes.ask(c, state, seed=5)
    by_matrix, _ = nes.tell(c, state, eps, fitness, anchor=anchor)
    by_seed, _ = nes.tell_seeded(c, state, 5, fitness, anchor=anchor)
    np.testing.assert_array_equal(by_matrix.mean, by_seed.mean)
    assert not np.array_equal(by_seed.mean, nes.tell_seeded(c, state, 5, fitness)[0].mean)


@pytest.mark.parametrize("anchor", [np.zeros(3), np.array([0.0, np.inf])], ids=["shape", "nonfinite"])
def test_a_bad_anchor_is_named(anchor):
    c = cfg(population_size=2, weight_decay=0.1)
    state = nes.init(c, np.zeros(2))
    with pytest.raises(ValueError, match="^anchor:"):
        nes.tell(c, state, np.ones((1, 2), np.float32), np.array([1.0, 2.0]), anchor=anchor)


def test_tell_is_deterministic_and_state_round_trips():
    c = cfg(population_size=16)
    state = nes.init(c, np.random.default_rng(0).normal(size=50))
    eps, cand = nes.ask(c, state, seed=11)
    fitness = -np.abs(cand).sum(axis=1).astype(np.float64)
    a, _ = nes.tell(c, state, eps, fitness)
    b, _ = nes.tell(c, nes.state_from_dict(nes.state_to_dict(state)), eps.copy(), fitness.copy())
    for x, y in zip(a[:3], b[:3], strict=True):
        assert x.dtype == np.float32 and x.tobytes() == y.tobytes()
    assert a.generation == b.generation == 1


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("population_size", 7),
        ("population_size", 0),
        ("population_size", 8.0),
        ("sigma", 0.0),
        ("sigma", -0.1),
        ("sigma", float("nan")),
        ("learning_rate", 0),
        ("decay_every", 0),
        ("decay_factor", 0.0),
        ("decay_factor", 1.5),
        ("adam_b1", 1.0),
        ("adam_b2", -0.1),
        ("adam_eps", 0.0),
        ("weight_decay", -1e-3),
    ],
)
def test_validate_names_the_bad_field(field, value):
    bad = dataclasses.replace(cfg(), **{field: value})
    with pytest.raises(ValueError, match=rf"^{field}:"):
        bad.validate()
    with pytest.raises(ValueError, match=rf"^{field}:"):
        nes.init(bad, np.zeros(2))


def test_bad_inputs_are_named():
    c = cfg(population_size=4)
    with pytest.raises(ValueError, match="mean0"):
        nes.init(c, np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="mean0"):
        nes.init(c, np.zeros(0))
    state = nes.init(c, np.zeros(3))
    eps, _ = nes.ask(c, state, seed=0)
    with pytest.raises(ValueError, match="fitness"):
        nes.tell(c, state, eps, np.zeros(3))
    with pytest.raises(ValueError, match="eps"):
        nes.tell(c, state, eps[:1], np.zeros(4))
    with pytest.raises(ValueError, match="state.generation"):
        nes.state_from_dict({**nes.state_to_dict(state), "generation": -1})
    with pytest.raises(ValueError, match="state.v"):
        nes.state_from_dict({k: v for k, v in nes.state_to_dict(state).items() if k != "v"})
    with pytest.raises(ValueError, match="state.m"):
        nes.state_from_dict({**nes.state_to_dict(state), "m": np.zeros(3, np.float64)})
