"""FC-LOpt: a black-box per-parameter learned optimizer in the style of small_fc_lopt, as an optax transformation.

This is the baseline issue 5 asks for ("a meta-trained black-box learned optimizer, small_fc_lopt-style"): the
black-box family of paper §3 (Metz et al. 2020a, 2022; small_fc_lopt is from Metz et al. 2022, "Practical tradeoffs
between memory, compute, and performance in learned optimizers", arXiv:2203.11860), where one small MLP, shared by
every parameter of the model, computes each parameter's step from that parameter's own features. L3RS (§4) instead
only chooses a per-layer step size and mixing of hand-designed directions (Eq. 2).

For every scalar parameter w with (finite) gradient g, at step k = 0, 1, ... of K (t = k + 1):

    accumulators    m_i ← β_i m_i + (1 − β_i) g             β_i ∈ momentum_decays
                    v_j ← γ_j v_j + (1 − γ_j) g²            γ_j ∈ rms_decays
                    m̂_i = m_i / (1 − β_i^t),  r_j = √(v_j / (1 − γ_j^t))          (bias-corrected)
    features        w, g, m̂_i, r_j, m̂_i / (r_j + ε), 1 / (r_j + ε)
                    each divided by its root-mean-square over the parameter's tensor, x / √(mean_tensor(x²) + δ),
                    so tensors of very different scales share one MLP; then the time features, the same for every
                    parameter: tanh(10 (k/K − α)) for α ∈ time_anchors and tanh(log(K β)) for β ∈ horizon_betas
                    (K may be a traced scalar; they saturate for k > K)
    MLP             (d, s) = MLP_θ(features)                 ReLU, hidden_layers × hidden_size, 2 outputs
    step            Δw = −init_lr · (a + step_mult · d) · exp(exp_mult · s)
                    a = m̂_{adam_b1} / (√v̂_{adam_b2} + ε)   the Adam direction (a = 0 when adam_skip is off)

small_fc_lopt's own step is ``d · exp(exp_mult · s) · step_mult``. The Adam skip connection a, with the MLP's last
layer initialised to zero, makes ψ₀ (the optimizer θ₀ builds) exactly ``optax.adam(init_lr)`` (b1 = adam_b1,
b2 = adam_b2, eps = ε), while the earlier layers are initialised normally so that NES perturbations of the last layer
move the output from the first generation. With ``adam_skip=False`` the last layer is initialised normally, as in
the reference, and ψ₀ is a random optimizer (for ablations only).

Differences from the reference (learned_optimization's ``AdafacMLPLOpt``): the accumulator decays are fixed (not
meta-learned) so that Adam's m and v are two of the accumulators and the state stays (|momentum_decays| +
|rms_decays|) × params (5× by default; Adam: 2×); no Adafactor-style factored accumulators; time features are
relative to the horizon K (as L3RS's, §4.1) instead of absolute step counts.

Cost: all leaves are processed as one concatenated vector in a feature-major [features, N] layout, so the MLP is a
handful of matmuls per step whatever the number of layers. The time features are folded into the first layer's
bias, so they cost nothing per parameter. On the small CNN (≈ 24k parameters, one CPU core) one update with the
defaults (one hidden layer of 32) costs ≈ 0.7–0.9 ms, about a third of it the per-tensor normalisation (two hidden
layers ≈ 1.9 ms; optax.adam ≈ 0.03–0.1 ms; a whole training step ≈ 7 ms).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l3rs.optim.family import config_from_dict

__all__ = [
    "FCLoptConfig",
    "FCLoptState",
    "MetaParams",
    "fc_lopt",
    "init_fc_lopt",
    "template_fc_lopt",
]

MetaParams = dict[str, list[dict[str, jax.Array]]]
"""θ: ``{"mlp": [{"w": [in, out], "b": [out]}, ...]}``, float32. The first layer's ``w`` has
``config.num_features`` rows: the per-parameter features first, then the time features."""

# The magnitude head enters as exp(exp_mult · s); the exponent is clipped so that a wild candidate diverges (and
# ranks last) instead of producing inf · 0 = NaN.
_LOG_SCALE_MAX = 20.0
# δ of the per-tensor second-moment normalisation. Small: the normalisation should make features scale-free, and
# 0 · rsqrt(δ) = 0 keeps all-zero tensors (e.g. freshly initialised biases) at zero.
_NORM_EPS = 1e-12


def _default_anchors() -> tuple[float, ...]:
    # The 11 relative-time anchors of L3RS (§4.1), so both optimizers see the same time information.
    return tuple(float(a) for a in np.linspace(0.0, 1.0, 11))


def _default_betas() -> tuple[float, ...]:
    # L3RS's 4 absolute-horizon scales (§4.1): tanh(log(K β)) tells the optimizer how long the run is.
    return tuple(float(b) for b in np.logspace(-4.0, -1.0, 4))


@dataclasses.dataclass(frozen=True)
class FCLoptConfig:
    """FC-LOpt: a small_fc_lopt-style per-parameter MLP optimizer (see the module docstring for the formula).

    Attributes:
      hidden_size: width of the MLP's hidden layers (small_fc_lopt: 32).
      hidden_layers: number of hidden layers (small_fc_lopt: 1; 0 makes the MLP linear). Each extra layer of 32 costs
        about as much per step as the whole default MLP.
      momentum_decays: decays β_i of the gradient EMAs (features m̂_i). Must contain ``adam_b1`` when ``adam_skip``.
      rms_decays: decays γ_j of the squared-gradient EMAs (features r_j). Must contain ``adam_b2`` when ``adam_skip``.
      time_anchors: α of the relative-time features tanh(10(k/K − α)).
      horizon_betas: β of the horizon features tanh(log(K β)).
      init_lr: the learning rate of the Adam skip connection, and the unit of every step: ψ₀ is Adam(init_lr).
      step_mult: scale of the MLP's direction output d, in units of init_lr.
      exp_mult: scale of the MLP's magnitude output s (step × exp(exp_mult · s)); small_fc_lopt: 0.001, with which
        s only matters once it reaches O(100) (NES steps of σ ≈ 0.03 on θ barely move it; d does the work).
      adam_skip: add the Adam direction to the step and initialise the MLP's last layer to zero (ψ₀ = Adam).
      adam_b1, adam_b2: the Adam direction's decays (fixed, not meta-learned).
      eps: Adam's ε, also in the features m̂/(r + ε) and 1/(r + ε).
    """

    family: ClassVar[str] = "fc_lopt"
    label: ClassVar[str] = "FC-LOpt"

    hidden_size: int = 32
    hidden_layers: int = 1
    momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    rms_decays: tuple[float, ...] = (0.999,)
    time_anchors: tuple[float, ...] = dataclasses.field(default_factory=_default_anchors)
    horizon_betas: tuple[float, ...] = dataclasses.field(default_factory=_default_betas)
    init_lr: float = 3e-3
    step_mult: float = 1.0
    exp_mult: float = 1e-3
    adam_skip: bool = True
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        # Accept lists (TOML, JSON): sequences become tuples.
        for name in ("momentum_decays", "rms_decays", "time_anchors", "horizon_betas"):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
                raise ValueError(f"optimizer.{name}: expected a list of numbers, got {value!r}.")
            for v in value:
                _check_number(name, v)
            object.__setattr__(self, name, tuple(float(v) for v in value))
        self._validate()
        # Plain Python numbers (e.g. from numpy), so that to_dict() is JSON and equal configs compare equal.
        for name in ("hidden_size", "hidden_layers"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("init_lr", "step_mult", "exp_mult", "adam_b1", "adam_b2", "eps"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _validate(self) -> None:
        for name in ("hidden_size", "hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"optimizer.{name}: expected an integer, got {value!r}.")
        if self.hidden_size < 1:
            raise ValueError(f"optimizer.hidden_size: must be at least 1, got {self.hidden_size}.")
        if self.hidden_layers < 0:
            raise ValueError(f"optimizer.hidden_layers: must be at least 0, got {self.hidden_layers}.")
        for name in ("init_lr", "step_mult", "exp_mult", "adam_b1", "adam_b2", "eps"):
            _check_number(name, getattr(self, name))
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optimizer.{name}: must be finite, got {getattr(self, name)}.")
        if not isinstance(self.adam_skip, bool):
            raise ValueError(f"optimizer.adam_skip: expected true or false, got {self.adam_skip!r}.")
        for name in ("momentum_decays", "rms_decays"):
            decays = getattr(self, name)
            if not decays:
                raise ValueError(f"optimizer.{name}: at least one decay is required.")
            if any(not 0.0 <= b < 1.0 for b in decays):
                raise ValueError(f"optimizer.{name}: each decay must lie in [0, 1), got {decays}.")
            if len(set(decays)) != len(decays):
                raise ValueError(f"optimizer.{name}: duplicate decays in {decays}.")
        if any(not math.isfinite(a) for a in self.time_anchors):
            raise ValueError(f"optimizer.time_anchors: must be finite, got {self.time_anchors}.")
        if any(not (math.isfinite(b) and b > 0) for b in self.horizon_betas):
            raise ValueError(f"optimizer.horizon_betas: must be positive and finite, got {self.horizon_betas}.")
        if not self.init_lr > 0:
            raise ValueError(f"optimizer.init_lr: must be positive, got {self.init_lr}.")
        if not self.step_mult > 0:
            raise ValueError(f"optimizer.step_mult: must be positive, got {self.step_mult}.")
        if self.exp_mult < 0:
            raise ValueError(f"optimizer.exp_mult: must be non-negative, got {self.exp_mult}.")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: must be positive, got {self.eps}.")
        for name, decays in (("adam_b1", "momentum_decays"), ("adam_b2", "rms_decays")):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"optimizer.{name}: must lie in [0, 1), got {value}.")
            if self.adam_skip and value not in getattr(self, decays):
                raise ValueError(
                    f"optimizer.{name}: {value} must be one of {decays} {getattr(self, decays)} when adam_skip is "
                    f"on (the Adam direction reuses that accumulator)."
                )

    # ------------------------------------------------------------------------------------------------------------
    @property
    def num_tensor_features(self) -> int:
        """Per-parameter features, normalised per tensor: w, g, m̂_i, r_j, m̂_i/(r_j+ε), 1/(r_j+ε) (12 by default)."""
        n_m, n_r = len(self.momentum_decays), len(self.rms_decays)
        return 2 + n_m + n_r + n_m * n_r + n_r

    @property
    def num_time_features(self) -> int:
        return len(self.time_anchors) + len(self.horizon_betas)

    @property
    def num_features(self) -> int:
        """Length of the MLP's input (27 by default)."""
        return self.num_tensor_features + self.num_time_features

    def layer_sizes(self) -> tuple[int, ...]:
        """Widths of the MLP from input to output: (num_features, hidden_size × hidden_layers, 2)."""
        return (self.num_features, *([self.hidden_size] * self.hidden_layers), 2)

    @property
    def num_meta_params(self) -> int:
        """Length of the flat θ vector NES perturbs (962 by default)."""
        sizes = self.layer_sizes()
        return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for artifacts and TOML round trips), including ``"family"``."""
        d: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, recorded: bool = False) -> FCLoptConfig:
        """``cls(**d)``; ``recorded`` (a dict an artifact wrote) changes nothing: no field of this family is newer than
        its artifacts."""
        return config_from_dict(cls, d)

    def init(self, params: Any, key: jax.Array) -> MetaParams:
        """θ₀ (model-agnostic: ``params`` is not used). With ``adam_skip`` it is Adam(init_lr)."""
        return init_fc_lopt(self, params, key)

    def template(self, layer_paths: tuple[str, ...]) -> MetaParams:
        """A θ of the right structure (zeros); FC-LOpt is model-agnostic, so ``layer_paths`` is not used."""
        del layer_paths
        return template_fc_lopt(self)

    def build(self, meta_params: MetaParams, total_steps: int | jax.Array) -> optax.GradientTransformationExtraArgs:
        return fc_lopt(meta_params, self, total_steps)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"optimizer.{name}: expected a number, got {value!r} ({type(value).__name__}).")


# ----------------------------------------------------------------------------------------------------------------
# θ
# ----------------------------------------------------------------------------------------------------------------
def template_fc_lopt(config: FCLoptConfig) -> MetaParams:
    """θ of the right structure with all entries zero (for restoring artifacts)."""
    sizes = config.layer_sizes()
    return {
        "mlp": [
            {"w": jnp.zeros((i, o), jnp.float32), "b": jnp.zeros((o,), jnp.float32)}
            for i, o in zip(sizes[:-1], sizes[1:], strict=True)
        ]
    }


def init_fc_lopt(config: FCLoptConfig, params: Any, key: jax.Array) -> MetaParams:
    """θ₀: hidden layers ~ N(0, 1/fan_in) (the reference's scale), zero biases, and with ``adam_skip`` a zero output
    layer, so that ψ₀ steps exactly like ``optax.adam(config.init_lr)``. ``params`` is not used."""
    del params
    sizes = config.layer_sizes()
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        if i == len(sizes) - 2 and config.adam_skip:
            w = jnp.zeros((fan_in, fan_out), jnp.float32)
        else:
            w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
        layers.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return {"mlp": layers}


# ----------------------------------------------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------------------------------------------
class FCLoptState(NamedTuple):
    """Optimizer state. All parameters are concatenated, in ``jax.tree.leaves(params)`` order, into N entries.

    Attributes:
      count: number of updates applied so far (k).
      momenta: [len(momentum_decays), N] float32 raw (not bias-corrected) gradient EMAs.
      second_moments: [len(rms_decays), N] float32 raw squared-gradient EMAs.
    """

    count: jax.Array
    momenta: jax.Array
    second_moments: jax.Array


def _flat_f32(leaves: list[jax.Array]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def _per_segment(values: jax.Array, sizes: list[int]) -> jax.Array:
    """[R, L] per-tensor values → [R, N], each column repeated over its tensor's entries."""
    return jnp.concatenate(
        [jnp.broadcast_to(values[:, i : i + 1], (values.shape[0], s)) for i, s in enumerate(sizes)], axis=1
    )


def _normalize_per_tensor(x: jax.Array, sizes: list[int]) -> jax.Array:
    """x [R, N] → x / √(mean_tensor(x²) + δ), row by row and tensor by tensor (small_fc_lopt's normaliser)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    mean_sq = jnp.stack(
        [
            jnp.sum(jnp.square(x[:, a:b]), axis=1) / max(b - a, 1)
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        ],
        axis=1,
    )  # [R, L]
    return x * _per_segment(jax.lax.rsqrt(mean_sq + _NORM_EPS), sizes)


def fc_lopt(
    meta_params: MetaParams, config: FCLoptConfig, total_steps: int | jax.Array
) -> optax.GradientTransformationExtraArgs:
    """The FC-LOpt optimizer for meta-parameters θ.

    Args:
      meta_params: θ from :func:`init_fc_lopt` (or unravelled from a perturbed flat vector, also under jit/vmap).
      config: the :class:`FCLoptConfig` θ was built for.
      total_steps: K, the planned number of updates: a Python int or a traced scalar (one compile serves every K).

    Returns:
      A transformation with ``update(grads, state, params, *, value=None)``. ``params`` is required (w is a
      feature); the loss ``value`` is accepted and not used. A tensor whose gradient has a non-finite entry gets a
      zero update and its accumulators are left unchanged. Updates have the params' dtype (computed in float32).
    """
    mom_decays = np.asarray(config.momentum_decays, np.float32)
    rms_decays = np.asarray(config.rms_decays, np.float32)
    # 1 − β rounded from float64, as optax computes it (so ψ₀ matches optax.adam to the last bit where possible).
    mom_mix = (1.0 - np.asarray(config.momentum_decays, np.float64)).astype(np.float32)
    rms_mix = (1.0 - np.asarray(config.rms_decays, np.float64)).astype(np.float32)
    anchors = np.asarray(config.time_anchors, np.float32)
    betas = np.asarray(config.horizon_betas, np.float32)
    n_tensor = config.num_tensor_features
    i_b1 = config.momentum_decays.index(config.adam_b1) if config.adam_skip else -1
    i_b2 = config.rms_decays.index(config.adam_b2) if config.adam_skip else -1
    eps = config.eps
    layers = meta_params["mlp"]

    def init_fn(params: Any) -> FCLoptState:
        n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
        return FCLoptState(
            count=jnp.zeros([], jnp.int32),
            momenta=jnp.zeros((len(mom_decays), n), jnp.float32),
            second_moments=jnp.zeros((len(rms_decays), n), jnp.float32),
        )

    def time_features(count: jax.Array) -> jax.Array:
        k = count.astype(jnp.float32)
        big_k = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        return jnp.concatenate([jnp.tanh(10.0 * (k / big_k - anchors)), jnp.tanh(jnp.log(big_k * betas))])

    def mlp(features: jax.Array, shared: jax.Array) -> jax.Array:
        """features [F_tensor, N], shared [F_time] → [2, N]. The shared (time) inputs are folded into the bias."""
        first = layers[0]
        bias = first["b"] + shared @ first["w"][n_tensor:]
        h = first["w"][:n_tensor].T @ features + bias[:, None]
        for layer in layers[1:]:
            h = layer["w"].T @ jax.nn.relu(h) + layer["b"][:, None]
        return h

    def update_fn(grads: Any, state: FCLoptState, params: Any = None, *, value: Any = None, **extra_args: Any):
        del value, extra_args  # FC-LOpt has no loss features
        if params is None:
            raise ValueError("FC-LOpt.update needs params (w is a feature): update(grads, state, params).")
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        sizes = [int(np.prod(g.shape)) for g in g_leaves]
        n = sum(sizes)
        if state.momenta.shape[-1] != n:
            raise ValueError(
                f"FC-LOpt.update: the state was initialised for {state.momenta.shape[-1]} parameters, the gradients "
                f"have {n}; call init on the same params."
            )
        if n == 0:
            return grads, state._replace(count=state.count + 1)

        # A tensor with a non-finite gradient is skipped: zero update, accumulators unchanged.
        finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in g_leaves])
        ok = _per_segment(finite[None, :], sizes)  # [1, N]
        g = jnp.where(ok, _flat_f32(g_leaves)[None, :], 0.0)  # [1, N]
        w = _flat_f32(p_leaves)[None, :]

        b1, b2 = mom_decays[:, None], rms_decays[:, None]
        m = jnp.where(ok, b1 * state.momenta + mom_mix[:, None] * g, state.momenta)
        v = jnp.where(ok, b2 * state.second_moments + rms_mix[:, None] * jnp.square(g), state.second_moments)
        t = (state.count + 1).astype(jnp.float32)
        m_hat = m / (1.0 - b1**t)
        r = jnp.sqrt(v / (1.0 - b2**t))
        inv_r = 1.0 / (r + eps)
        features = jnp.concatenate(
            [w, g, m_hat, r, (m_hat[:, None, :] * inv_r[None, :, :]).reshape(-1, n), inv_r], axis=0
        )  # [F_tensor, N]
        out = mlp(_normalize_per_tensor(features, sizes), time_features(state.count))  # [2, N]

        direction = config.step_mult * out[0]
        if config.adam_skip:  # Adam's m̂/(√v̂ + ε), exactly as optax.scale_by_adam computes it
            direction = direction + m_hat[i_b1] / (r[i_b2] + eps)
        scale = jnp.exp(jnp.minimum(config.exp_mult * out[1], _LOG_SCALE_MAX))
        step = jnp.where(ok[0], -config.init_lr * direction * scale, 0.0)

        offsets = np.concatenate([[0], np.cumsum(sizes)])
        updates = [
            step[a:b].reshape(p.shape).astype(p.dtype)
            for a, b, p in zip(offsets[:-1], offsets[1:], p_leaves, strict=True)
        ]
        new_state = FCLoptState(count=state.count + 1, momenta=m, second_moments=v)
        return jax.tree.unflatten(treedef, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
