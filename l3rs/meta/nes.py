"""Natural Evolution Strategies (Salimans et al., 2017) as pure functions over flat float32 numpy vectors.

The meta-training outer loop of the paper (§2, §5): candidates ψ ± σ_t ε with antithetic sampling,
centered-rank fitness shaping, an Adam *ascent* step on the mean, and a smooth exponential decay of both the
meta learning rate and σ (paper §5: "by 0.5 every 500 generations"). evosax-style ``init`` / ``ask`` /
``tell`` over a :class:`NESState` that holds only numpy arrays and ints, so it pickles, ships to Ray and
checkpoints trivially. No JAX, no Ray.

Sign convention — read this once. **Fitness is maximised.** The driver passes fitness = −mean eval loss over
the meta-batch, the paper's F(ψ) = −(1/b) Σ_i L^M_ψ(T_i) (§2). evosax's strategies *minimise* their fitness
argument, and passing a fitness there (or a loss here) silently trains towards the worst candidates
(evosax#72).

Reproducibility. The noise of a generation is a pure function of ``(seed, generation)`` and the noise mode
(:attr:`NESConfig.noise`), so the same candidates come back on any machine with the same NumPy version, in any
process, and after a resume from a checkpoint; workers rebuild their own candidates. ``tell`` reduces over the
population with a fixed-order float64 loop rather than a BLAS matrix product, so the new mean does not depend on
the BLAS build or thread count.

Noise modes and memory (issue 14). Pair i's noise ε_i (float32 [D]) is

- ``"sequential"`` (default; what every run before issue 14 used): row i of
  ``np.random.default_rng([seed, generation]).standard_normal((pop // 2, D), dtype=np.float32)``. NumPy's
  Generator yields the same stream drawn at once or row by row, so the rows can be drawn one at a time
  (:func:`noise_rows`, :func:`tell_seeded`: O(D) memory, bit-identical to the matrix). But row i alone costs
  O(i·D) time to reach (:func:`pair_noise`), so a worker rebuilding its own pair pays up to a whole
  generation's noise. Pick it for small populations and to reproduce existing runs (``docs/demo/psi``).
- ``"per_pair"``: ``np.random.default_rng([seed, generation, i]).standard_normal(D, dtype=np.float32)``, one
  stream per pair: O(D) time and memory for any pair, anywhere, independent rows, no table. Pick it for large
  populations with a ψ of up to ~10^5 floats, or where a worker cannot spare the table's 128 MiB. Drawing a row
  (~10 ns a float) dominates the driver's ``tell`` at D in the millions (18 s per generation at population
  1024, D = 2.3M). A different stream: it does not reproduce runs made with ``"sequential"``.
- ``"table"``: the shared noise table of Salimans et al. (2017, §2.1): ``T = max(2**25, 8·D)`` float32 normals
  drawn once per process from ``default_rng([seed, 2**32 − 1])`` (:func:`noise_table`, 128 MiB up to D ≈ 4.2M,
  cached), and ε_i = ``table[o_i : o_i + D]`` at the offset ``o_i = default_rng([seed, generation,
  i]).integers(0, T − D + 1)``. O(D) time per pair with no RNG work beyond the offset, so ``tell`` costs only the
  float64 accumulation, done block by block over D (1.2 s instead of 18 s per generation at population 1024,
  D = 2.3M, one core: ``benchmarks/driver_scale.py``). Rows of one generation overlap (slices of one table), as
  in Salimans et al. Pick it for a ψ in the millions with hundreds of workers, where the driver's ``tell`` is
  the bottleneck; it costs the table's memory once on the driver and in every worker process.

Only :func:`ask` (kept for small problems and tests) materialises a population × D matrix; the driver uses
:func:`pair_noise` / :func:`perturb` on the workers and :func:`tell_seeded` on the driver, O(D) memory each.

Usage::

    cfg = NESConfig(population_size=32, sigma=0.01, learning_rate=0.01, decay_every=500)
    state = init(cfg, psi0)
    for _ in range(generations):
        eps, candidates = ask(cfg, state, seed)
        fitness = -np.array([mean_eval_loss(c) for c in candidates])  # maximised; NaN allowed
        state, info = tell(cfg, state, eps, fitness)

At scale, without the [pop, D] matrices (the same numbers for the same noise mode)::

    sigma = sigma_at(cfg, state.generation)
    for i in range(cfg.num_pairs):  # on the workers, each from (seed, generation, i) and the shared mean
        pair = perturb(state.mean, sigma, pair_noise(cfg.noise, seed, state.generation, i, state.mean.size))
    state, info = tell_seeded(cfg, state, seed, fitness)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "NESConfig",
    "NESState",
    "NOISE_MODES",
    "init",
    "ask",
    "tell",
    "tell_seeded",
    "pair_noise",
    "noise_table",
    "noise_rows",
    "perturb",
    "pair_candidates",
    "iter_candidates",
    "centered_ranks",
    "sigma_at",
    "learning_rate_at",
    "state_to_dict",
    "state_from_dict",
]

NOISE_MODES = ("sequential", "per_pair", "table")
TABLE_MIN_SIZE = 1 << 25  # floats in a noise table: 128 MiB of float32
_TABLE_TAG = 0xFFFFFFFF  # the table's stream: [seed, _TABLE_TAG], a generation no run reaches
_TABLES: dict[tuple[int, int], np.ndarray] = {}  # this process's table (one at a time)


@dataclasses.dataclass(frozen=True)
class NESConfig:
    """Hyperparameters of the NES outer loop.

    Attributes:
      population_size: number of candidates per generation; even (antithetic pairs), >= 2.
      sigma: initial standard deviation σ_0 of the Gaussian perturbations.
      learning_rate: initial meta learning rate α_0 of the Adam ascent step on the mean.
      decay_every: generations per factor ``decay_factor`` of smooth exponential decay (paper: 500).
      decay_factor: x_t = x_0 · decay_factor ** (t / decay_every) for x ∈ {σ, α} (paper: 0.5);
        1 disables the decay.
      adam_b1, adam_b2, adam_eps: Adam's moment decay rates and denominator epsilon.
      weight_decay: decoupled (AdamW-style) weight decay on the mean, scaled by the decayed learning rate. It pulls
        the mean toward the ``anchor`` given to :func:`tell` (the origin by default; the driver passes ψ₀ under
        ``nes.weight_decay_toward = "psi0"``, a regulariser toward the untrained optimizer).
      noise: how pair i's noise is drawn, one of :data:`NOISE_MODES` (see the module docstring):
        ``"sequential"`` (default, reproduces earlier runs) or ``"per_pair"`` (O(D) per pair anywhere: for scale).
    """

    population_size: int
    sigma: float
    learning_rate: float
    decay_every: float
    decay_factor: float = 0.5
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    noise: str = "sequential"

    def validate(self) -> NESConfig:
        """Raises ValueError naming the offending field; returns ``self`` so it can be chained."""
        p = self.population_size
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 2 or p % 2:
            raise ValueError(f"population_size: must be an even integer >= 2 (antithetic pairs), got {p!r}.")
        for name in ("sigma", "learning_rate", "decay_every", "adam_eps"):
            _check_positive(name, getattr(self, name))
        if not _is_real(self.decay_factor) or not 0.0 < self.decay_factor <= 1.0:
            raise ValueError(f"decay_factor: must lie in (0, 1], got {self.decay_factor!r}.")
        for name in ("adam_b1", "adam_b2"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must lie in [0, 1), got {value!r}.")
        if not _is_real(self.weight_decay) or self.weight_decay < 0.0:
            raise ValueError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay!r}.")
        _check_noise_mode(self.noise)
        return self

    @property
    def num_pairs(self) -> int:
        return self.population_size // 2


class NESState(NamedTuple):
    """The whole NES state: plain numpy arrays and an int.

    Attributes:
      mean: current meta-parameters ψ_t, float32 [D].
      m, v: Adam's first and second moment estimates of the (ascent) gradient, float32 [D].
      generation: number of completed ``tell`` steps t: the decay clock and Adam's bias-correction step.
    """

    mean: np.ndarray
    m: np.ndarray
    v: np.ndarray
    generation: int


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) and math.isfinite(x)


def _check_positive(name: str, value: Any) -> None:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}.")


def _decay(config: NESConfig, generation: int) -> float:
    # Paper §5: smooth exponential decay by `decay_factor` every `decay_every` generations.
    return float(config.decay_factor) ** (generation / float(config.decay_every))


def sigma_at(config: NESConfig, generation: int) -> float:
    """σ_t = σ_0 · decay_factor ** (t / decay_every)."""
    return float(config.sigma) * _decay(config, generation)


def learning_rate_at(config: NESConfig, generation: int) -> float:
    """α_t = α_0 · decay_factor ** (t / decay_every)."""
    return float(config.learning_rate) * _decay(config, generation)


def init(config: NESConfig, mean0: np.ndarray) -> NESState:
    """Generation-0 state at ``mean0`` (any shape, flattened to float32 [D]); Adam moments zero."""
    config.validate()
    mean = np.array(mean0, dtype=np.float32, copy=True).reshape(-1)
    if mean.size == 0:
        raise ValueError("mean0: must have at least one element.")
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean0: must be finite, found {int((~np.isfinite(mean)).sum())} non-finite entries.")
    zeros = np.zeros_like(mean)
    return NESState(mean=mean, m=zeros, v=zeros.copy(), generation=0)


def _check_noise_mode(mode: Any) -> None:
    if mode not in NOISE_MODES:
        raise ValueError(f"noise: must be one of {', '.join(repr(m) for m in NOISE_MODES)}, got {mode!r}.")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}.")


def noise_table(seed: int, dim: int) -> np.ndarray:
    """The ``"table"`` mode's read-only float32 table of ``max(TABLE_MIN_SIZE, 8·dim)`` N(0, 1) draws of run
    ``seed``: drawn on first use in a process (~0.4 s), then cached (the last one only)."""
    _check_seed(seed)
    key = (int(seed), max(TABLE_MIN_SIZE, 8 * int(dim)))
    table = _TABLES.get(key)
    if table is None:
        _TABLES.clear()
        table = np.random.default_rng([key[0], _TABLE_TAG]).standard_normal(key[1], dtype=np.float32)
        table.setflags(write=False)
        _TABLES[key] = table
    return table


def pair_noise(mode: str, seed: int, generation: int, pair: int, dim: int) -> np.ndarray:
    """ε of antithetic pair ``pair`` in generation ``generation``: float32 [dim] ~ N(0, I), a pure function of its
    arguments.

    ``"per_pair"``: O(dim) time and memory. ``"table"``: a read-only view into :func:`noise_table`.
    ``"sequential"``: row ``pair`` of the generation's matrix stream, drawn row by row, so O(dim) memory but
    O((pair + 1)·dim) time; bit-identical to ``ask``'s ``eps[pair]``.
    """
    _check_noise_mode(mode)
    _check_seed(seed)
    if mode == "per_pair":
        return np.random.default_rng([int(seed), int(generation), int(pair)]).standard_normal(dim, dtype=np.float32)
    if mode == "table":
        table = noise_table(seed, dim)
        offset = int(np.random.default_rng([int(seed), int(generation), int(pair)]).integers(0, table.size - dim + 1))
        return table[offset : offset + dim]
    rng = np.random.default_rng([int(seed), int(generation)])
    for _ in range(int(pair)):
        rng.standard_normal(dim, dtype=np.float32)  # the rows before ours: the stream is sequential
    return rng.standard_normal(dim, dtype=np.float32)


def noise_rows(mode: str, seed: int, generation: int, num_pairs: int, dim: int) -> Iterator[np.ndarray]:
    """ε_0, ε_1, … ε_{num_pairs−1} one at a time: O(dim) memory, O(num_pairs·dim) time in either mode."""
    _check_noise_mode(mode)
    _check_seed(seed)
    if mode != "sequential":
        for i in range(num_pairs):
            yield pair_noise(mode, seed, generation, i, dim)
        return
    rng = np.random.default_rng([int(seed), int(generation)])  # row by row = the matrix, bit for bit
    for _ in range(num_pairs):
        yield rng.standard_normal(dim, dtype=np.float32)


def perturb(mean: np.ndarray, sigma: float, eps: np.ndarray) -> np.ndarray:
    """The antithetic pair ``[mean + σ ε, mean − σ ε]``, float32 [2, D], in exactly ``ask``'s float32 arithmetic
    (σ rounded to float32 first), so a worker rebuilding its pair gets ``ask``'s candidates bit for bit."""
    scaled = np.float32(sigma) * np.asarray(eps, dtype=np.float32)
    out = np.empty((2, scaled.shape[0]), dtype=np.float32)
    out[0] = mean + scaled
    out[1] = mean - scaled
    return out


def pair_candidates(mean: np.ndarray, sigma: float, mode: str, seed: int, generation: int, pair: int) -> np.ndarray:
    """Candidates ``2·pair`` and ``2·pair + 1`` of a generation, rebuilt from the generation's mean, its σ_t
    (:func:`sigma_at`) and the noise coordinates: what a worker does with a unit; float32 [2, D], bit-identical to
    the same rows of ``ask``'s candidates. O(D) memory; time O(D) (``"per_pair"``) or O((pair + 1)·D)."""
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    return perturb(mean, sigma, pair_noise(mode, seed, generation, pair, mean.shape[0]))


def iter_candidates(config: NESConfig, state: NESState, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, [candidate 2i, candidate 2i+1])`` for every pair, lazily: ``ask``'s candidates without the [pop, D]
    matrices (O(D) memory)."""
    _check_state(state)
    sigma = sigma_at(config, state.generation)
    rows = noise_rows(config.noise, seed, int(state.generation), config.num_pairs, state.mean.shape[0])
    for i, eps in enumerate(rows):
        yield i, perturb(state.mean, sigma, eps)


def _noise(seed: int, generation: int, num_pairs: int, dim: int) -> np.ndarray:
    # The noise is a pure function of (seed, generation): reproducible across processes, machines and resumes.
    rng = np.random.default_rng([seed, generation])
    return rng.standard_normal((num_pairs, dim), dtype=np.float32)


def ask(config: NESConfig, state: NESState, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples the antithetic population of generation ``state.generation``.

    Args:
      config: the NES config.
      state: the current state; only ``mean`` and ``generation`` are read.
      seed: the run's seed, a non-negative int. The noise is drawn as ``config.noise`` says (module docstring).

    Materialises [pop, D]: for large populations or ψ use :func:`iter_candidates` / :func:`tell_seeded`.

    Returns:
      ``(eps, candidates)``: eps float32 [pop/2, D] ~ N(0, I); candidates float32 [pop, D] with
      ``candidates[2i] = mean + σ_t eps[i]`` and ``candidates[2i+1] = mean − σ_t eps[i]``.
    """
    _check_seed(seed)
    _check_state(state)
    if config.noise == "sequential":
        eps = _noise(int(seed), int(state.generation), config.num_pairs, state.mean.shape[0])
    else:
        rows = noise_rows(config.noise, seed, int(state.generation), config.num_pairs, state.mean.shape[0])
        eps = np.stack(list(rows))
    scaled = np.float32(sigma_at(config, state.generation)) * eps
    candidates = np.empty((config.population_size, state.mean.shape[0]), dtype=np.float32)
    candidates[0::2] = state.mean + scaled
    candidates[1::2] = state.mean - scaled
    return eps, candidates


def centered_ranks(fitness: np.ndarray) -> np.ndarray:
    """Centered-rank fitness shaping (Salimans et al., 2017): ranks mapped linearly onto [-0.5, 0.5].

    The worst candidate gets −0.5 and the best +0.5 (higher fitness = better). Every non-finite fitness
    (NaN, ±inf) counts as worse than any finite one. Ties — including all non-finite values, which tie with
    one another — get the average of the ranks they span, so the result does not depend on candidate order,
    the shaped values always sum to zero, and an antithetic pair with equal fitness (e.g. both diverged)
    contributes nothing to the gradient.

    Example: ``[3., nan, 1., 1.]`` → ranks ``[3, 0, 1.5, 1.5]`` → ``[0.5, -0.5, 0., 0.]``.

    Returns:
      float64 array of the same shape; all zeros for a single candidate.
    """
    x = np.asarray(fitness, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"fitness: must be a 1-D array, got shape {x.shape}.")
    n = x.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.float64)
    x = np.where(np.isfinite(x), x, -np.inf)  # every non-finite value ties at the bottom
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each group's first member
    ranks = (first + (counts - 1) / 2.0)[inverse.reshape(-1)]
    return ranks / (n - 1) - 0.5


def tell(
    config: NESConfig,
    state: NESState,
    eps: np.ndarray,
    fitness: np.ndarray,
    *,
    anchor: np.ndarray | None = None,
) -> tuple[NESState, dict[str, Any]]:
    """One NES step: shape the fitness, estimate the gradient, take an Adam *ascent* step on the mean.

    Args:
      config: the NES config.
      state: the state ``ask`` was called with.
      eps: the noise ``ask`` returned, [pop/2, D].
      fitness: [pop], to be MAXIMISED (the driver passes −mean eval loss), in candidate order. NaN/inf
        allowed: such candidates rank worst (:func:`centered_ranks`) and never make the mean non-finite.
      anchor: where ``weight_decay`` pulls the mean, finite [D]; ``None`` (default) is the origin.

    The gradient estimate of E[F(ψ + σ_t ε)] (Salimans et al. 2017, averaged over all ``pop`` candidates) is

        g = 1/(pop σ_t) Σ_i (s_{2i} − s_{2i+1}) ε_i        (s: shaped fitness, i over antithetic pairs)

    followed by an Adam ascent step with bias correction at step t+1 and the decayed learning rate α_t:

        mean ← mean + α_t (m̂ / (√v̂ + adam_eps) − weight_decay · (mean − anchor))

    If no candidate has a finite fitness the generation carries no information: the mean and Adam's moments
    stay unchanged and only the generation advances (``info["skipped"]``), so the next ``ask`` draws fresh
    noise.

    Returns:
      ``(new_state, info)``; info holds ``fitness_mean``, ``fitness_max``, ``fitness_min`` (over finite
      values, NaN if none), ``num_nonfinite``, the ``sigma`` and ``learning_rate`` of this generation,
      ``grad_norm``, ``update_norm`` and ``skipped``.
    """
    _check_state(state)
    pairs, dim = config.num_pairs, state.mean.shape[0]
    eps = np.asarray(eps)
    if eps.shape != (pairs, dim):
        raise ValueError(f"eps: expected shape {(pairs, dim)} (population_size // 2, D), got {eps.shape}.")
    return _tell(config, state, fitness, lambda diff, grad: _accumulate(enumerate(eps), diff, grad), anchor)


def tell_seeded(
    config: NESConfig,
    state: NESState,
    seed: int,
    fitness: np.ndarray,
    *,
    anchor: np.ndarray | None = None,
) -> tuple[NESState, dict[str, Any]]:
    """:func:`tell` that regenerates the noise of ``(seed, state.generation)`` pair by pair instead of taking the
    [pop/2, D] matrix: O(D) memory, the same float64 accumulation in the same order, so the new state is bit-identical
    to ``tell(config, state, *ask(config, state, seed)[:1], fitness)``. In ``"per_pair"`` mode a pair whose shaped
    fitness difference is zero is not drawn at all (nor in ``"table"`` mode).
    """
    _check_seed(seed)
    _check_state(state)
    mode, generation, dim = config.noise, int(state.generation), state.mean.shape[0]

    def accumulate(diff: np.ndarray, grad: np.ndarray) -> None:
        if mode == "table":
            _accumulate_table(noise_table(seed, dim), seed, generation, diff, grad)
        elif mode == "per_pair":  # random access: draw only the pairs that count
            _accumulate(
                ((i, pair_noise(mode, seed, generation, i, dim)) for i in range(len(diff)) if diff[i]), diff, grad
            )
        else:  # every row is drawn: the stream is sequential
            _accumulate(enumerate(noise_rows(mode, seed, generation, len(diff), dim)), diff, grad)

    return _tell(config, state, fitness, accumulate, anchor)


def _accumulate(rows: Iterator[tuple[int, np.ndarray]], diff: np.ndarray, grad: np.ndarray) -> None:
    # Fixed-order float64 accumulation (no BLAS reduction): bit-identical on every machine and thread count.
    for i, row in rows:  # ascending i
        if diff[i] != 0.0:
            grad += diff[i] * row.astype(np.float64)


_TABLE_BLOCK = 1 << 16  # float64 gradient block that stays in cache while every pair's slice is added to it


def _accumulate_table(table: np.ndarray, seed: int, generation: int, diff: np.ndarray, grad: np.ndarray) -> None:
    # The same additions as _accumulate over the rows table[o_i : o_i + D] (every element sees diff_i · ε_i added in
    # ascending i), so bit-identical to it, but block by block over D: each block of the gradient stays in cache.
    dim = grad.shape[0]
    pairs = [(i, int(np.random.default_rng([seed, generation, i]).integers(0, table.size - dim + 1)))
             for i in range(diff.shape[0]) if diff[i] != 0.0]  # fmt: skip
    for start in range(0, dim, _TABLE_BLOCK):
        stop = min(start + _TABLE_BLOCK, dim)
        block = grad[start:stop]
        for i, offset in pairs:
            block += diff[i] * table[offset + start : offset + stop].astype(np.float64)


def _tell(
    config: NESConfig,
    state: NESState,
    fitness: np.ndarray,
    accumulate: Callable[[np.ndarray, np.ndarray], None],
    anchor: np.ndarray | None,
) -> tuple[NESState, dict[str, Any]]:
    pop, dim = config.population_size, state.mean.shape[0]
    fitness = np.asarray(fitness, dtype=np.float64)
    if fitness.shape != (pop,):
        raise ValueError(f"fitness: expected shape {(pop,)} (population_size,), got {fitness.shape}.")
    if anchor is not None:
        anchor = np.asarray(anchor, dtype=np.float64)
        if anchor.shape != (dim,):
            raise ValueError(f"anchor: expected shape {(dim,)} (the mean's), got {anchor.shape}.")
        if not np.all(np.isfinite(anchor)):
            raise ValueError(f"anchor: must be finite, found {int((~np.isfinite(anchor)).sum())} non-finite entries.")

    t = int(state.generation)
    sigma, lr = sigma_at(config, t), learning_rate_at(config, t)
    finite = np.isfinite(fitness)
    info: dict[str, Any] = {
        "generation": t,
        "fitness_mean": float(fitness[finite].mean()) if finite.any() else float("nan"),
        "fitness_max": float(fitness[finite].max()) if finite.any() else float("nan"),
        "fitness_min": float(fitness[finite].min()) if finite.any() else float("nan"),
        "num_nonfinite": int((~finite).sum()),
        "sigma": sigma,
        "learning_rate": lr,
    }
    if not finite.any():
        info.update(grad_norm=0.0, update_norm=0.0, skipped=True)
        return state._replace(generation=t + 1), info

    shaped = centered_ranks(fitness)
    diff = shaped[0::2] - shaped[1::2]  # antithetic pair differences, [pairs]
    grad = np.zeros(dim, dtype=np.float64)
    accumulate(diff, grad)  # grad = Σ_i diff_i ε_i, in float64, in a fixed order
    grad /= pop * sigma

    b1, b2 = float(config.adam_b1), float(config.adam_b2)
    m = b1 * state.m.astype(np.float64) + (1.0 - b1) * grad
    v = b2 * state.v.astype(np.float64) + (1.0 - b2) * grad * grad
    m_hat = m / (1.0 - b1 ** (t + 1))
    v_hat = v / (1.0 - b2 ** (t + 1))
    mean64 = state.mean.astype(np.float64)
    direction = m_hat / (np.sqrt(v_hat) + float(config.adam_eps))
    if config.weight_decay:  # decoupled, toward the anchor (the origin when None)
        direction = direction - float(config.weight_decay) * (mean64 if anchor is None else mean64 - anchor)
    new_mean = (mean64 + lr * direction).astype(np.float32)  # ascent: fitness is maximised
    info.update(
        grad_norm=float(np.linalg.norm(grad)),
        update_norm=float(np.linalg.norm(new_mean.astype(np.float64) - mean64)),
        skipped=False,
    )
    new_state = NESState(mean=new_mean, m=m.astype(np.float32), v=v.astype(np.float32), generation=t + 1)
    return new_state, info


def _check_state(state: NESState) -> None:
    for name in ("mean", "m", "v"):
        a = getattr(state, name)
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1:
            raise ValueError(
                f"state.{name}: must be a float32 numpy vector, got {type(a).__name__} "
                f"{getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}."
            )
        if a.shape != state.mean.shape:
            raise ValueError(f"state.{name}: shape {a.shape} differs from state.mean's {state.mean.shape}.")
    g = state.generation
    if isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 0:
        raise ValueError(f"state.generation: must be a non-negative integer, got {g!r}.")


def state_to_dict(state: NESState) -> dict[str, Any]:
    """A checkpointable dict: ``{"mean", "m", "v"}`` float32 arrays and ``"generation"`` int."""
    _check_state(state)
    return {"mean": state.mean, "m": state.m, "v": state.v, "generation": int(state.generation)}


def state_from_dict(d: dict[str, Any]) -> NESState:
    """Inverse of :func:`state_to_dict` (bit-exact); raises ValueError naming a missing or malformed field."""
    for key in ("mean", "m", "v", "generation"):
        if key not in d:
            raise ValueError(f"state.{key}: missing from the NES state dict (keys: {sorted(d)}).")
    state = NESState(
        mean=np.array(d["mean"], copy=True),
        m=np.array(d["m"], copy=True),
        v=np.array(d["v"], copy=True),
        generation=int(d["generation"]) if isinstance(d["generation"], int | np.integer) else d["generation"],
    )
    _check_state(state)
    return state
