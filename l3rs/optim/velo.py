"""VeLO (Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up") as an optax transformation.

This is the ``hyper_v2`` architecture of google/learned_optimization (``research/general_lopt/hyper_v2.py``), the
one the published VeLO weights belong to, written anew in plain JAX (no Haiku) behind our family interface
(:mod:`l3rs.optim.family`). Our paper compares against it in §4.2 / Table 1 and §5 ("VeLO (og)", "VeLO (ft)").

Per step, for a model whose params pytree has n leaves ("tensors"):

1. **Per-tensor LSTM (the hypernetwork).** Each tensor gets a feature vector (30 entries with the published
   sizes): 9 fraction-of-training features tanh(10(k/K − t)), t ∈ {0.03 … 1.1}; 9 loss features from 10 loss EMAs
   whose half-lives are log-spaced in [10, K] (bias-corrected, relative to their running minimum, clipped to
   [−1, 1], zero for the first 2 steps); the clipped log of the mean rms, the variances of the momenta and of the rms
   (of the accumulators *before* this step, after scaling by 1/rms(param)); a one-hot of the tensor's rank (number
   of axes > 1). The n feature rows are mixed (``linear_1`` → ReLU → max over tensors, added to ``linear_2``; the
   published ``linear`` is computed and discarded by the original, so it is a stored but unused weight here), fed
   to an LSTM (forget-gate bias +1, gates i, g, f, o), whose output gives per tensor ``param_inits`` mixing
   coefficients c (``rnn_to_controls``) and a step multiplier (``step_size``).
2. **Per-parameter MLP.** The tensor's MLP weights are a mixture of ``param_inits`` basis MLPs:
   W = 100 · mean_j(c_j · W_j) (likewise the biases). Its inputs per parameter (30 with the published sizes; every
   input normalised to unit second moment over the tensor): g, clip(g, ±0.1), θ, the momenta (β ∈ {0.9, 0.99,
   0.999}), the rms (β = 0.999), m/√rms, 1/√rms, the Adafactor-preconditioned gradient, g/√rms, and — factored over
   the two largest axes for tensors with ≥ 2 axes, or the full second moment otherwise — the row and column
   accumulators, their reciprocal square roots, and the factored-preconditioned momenta. Gradients are clipped to
   ±1000 before any accumulator sees them.
3. **Output.** With the MLP's outputs (direction d, magnitude a, unused third):
   step = step_size · d · exp(a · exp_mult) · step_mult · rms(θ), and θ ← θ − step.

Our additions (all off for the published weights, i.e. ``VeLOConfig.published()``):

- ``adam_skip`` (default on, required by the family spec "ψ₀ ≈ Adam(init_lr)"): the update becomes
  −(exp(log_lr) · m̂/(√v̂ + ε) + step), with m, v the first momentum and rms accumulators VeLO already keeps (β1 = 0.9,
  β2 = 0.999, i.e. Adam's) bias-corrected, ``log_lr`` a meta-parameter starting at log(init_lr), and the learned
  part starting at zero (``step_size`` weights 0, bias ``learned_step_init`` = 0), so ψ₀ is exactly Adam(init_lr).
- Robustness the service needs: a tensor with a non-finite gradient gets a zero update and its accumulators are left
  untouched; a non-finite loss leaves the loss accumulators untouched; exp(a · exp_mult) is capped at e^50; any
  tensor whose update is still non-finite gets a zero update.
- K (``total_steps``) may be traced: it enters only the fraction-of-training features (which saturate: for k > K
  they are all ≈ +1 but one, i.e. "training is over"; nothing breaks) and the loss-EMA half-lives.

Choices where hyper_v2 has flags: we implement what its defaults and the pretrained VeLO (as ported by PyLO) use:
``mix_layers=True``, all input features on, ``param_scale_mult=True``, ``precondition_output=False``, the LSTM state
carried forward (``use_bugged_next_lstm_state=False``), loss EMAs over the real horizon K
(``use_bugged_loss_features=False``), no validation-mode feature. The original's feature quirks are kept on purpose
(the published weights expect them): the rms statistics are scaled by 1/rms(θ) not its square, and the "variance" of
the rms is taken around the *momenta's* mean (so it has one entry per momentum decay).

Verification (we cannot download the published weights here): the update is tested against a float64 numpy
re-derivation of hyper_v2's ``update`` written from its source (``tests/test_velo.py``), i.e. against our reading of
the code, not against learned_optimization running with the published file; the checkpoint layout is what the source
implies (details in :mod:`l3rs.optim.velo_checkpoint`). Known numerical property of the original kept here: the loss
features divide differences of nearly equal float32 loss EMAs, so two compiles of the same step (e.g. vmapped or
not) can differ at ~1e-3 of the step once they are on (from the 3rd step) when the losses barely change; one
compiled program is deterministic.

Meta-parameters: a dict laid out exactly like hyper_v2's Haiku ``theta`` (so :mod:`l3rs.optim.velo_checkpoint` can
read and write the published file format), plus ``{"adam_skip": {"log_lr": ()}}`` when ``adam_skip``::

    lstm_init_state: {hidden: [1, H], cell: [1, H]}
    rnn_params:      {linear, linear_1, linear_2: {w: [F_lstm, H], b: [H]}, "rnn/linear": {w: [2H, 4H], b: [4H]},
                      rnn_to_controls: {w: [H, P], b: [P]}, step_size: {w: [H, 1], b: [1]}}
    ff_mod_stack:    {"~": {w0__0 … w0__13: [P, d_i, h], b0: [P, h], w1: [P, h, h], b1: [P, h],
                            w2: [P, h, 3], b2: [P, 3]}}

State (:class:`VeLOState`): momenta (3× params), rms (1×), factored row/column accumulators (small) or, for tensors
with < 2 axes, full ones (3×), the LSTM state (2·H per tensor), the loss EMAs and a step count: ≈ 4× the params'
bytes for a model dominated by weight matrices (paper Table 1: 4.0×).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l3rs.optim.family import config_from_dict, register_family

__all__ = ["VeLOConfig", "VeLOState", "init_velo", "velo", "velo_param_shapes", "factored_dims"]

# Fixed parts of the hyper_v2 architecture (not configurable there either).
FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)  # tanh(10(k/K − t)) features
NUM_LOSS_DECAYS = 10  # loss EMAs with half-lives log-spaced in [10, K]; 9 features
RANK_CLASSES = 5  # one-hot of the number of axes of size > 1
NUM_OUTPUTS = 3  # direction, magnitude, (unused)
CONTROL_SCALE = 100.0  # W = 100 · mean_j(c_j W_j)
GRAD_CLIP = 1000.0
_MAX_LOG_MAGNITUDE = 50.0  # ours: exp(a · exp_mult) ≤ e^50 so a wild candidate cannot overflow to inf
_LOSS_MIN_INIT = 999999999999.0


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@register_family
@dataclasses.dataclass(frozen=True)
class VeLOConfig:
    """Everything that fixes the shape of VeLO's meta-parameters and the meaning of its entries.

    Attributes:
      lstm_hidden_size: H, width of the per-tensor LSTM (published: 512; small default for CPU meta-training).
      ff_hidden_size: width of the per-parameter MLP (published: 4).
      ff_hidden_layers: number of hidden layers of the per-parameter MLP (published: 2).
      param_inits: P, number of basis MLPs the LSTM mixes (published: 256).
      momentum_decays: β of the momentum accumulators (published: 0.9, 0.99, 0.999).
      rms_decays: β of the second-moment accumulators (published: 0.999); 1 entry or one per momentum decay.
      adafactor_decays: β of the factored accumulators (published: 0.9, 0.99, 0.999); 1 entry or one per momentum.
      exp_mult, step_mult: output scales, step = d · exp(a · exp_mult) · step_mult · … (published: 0.001, 0.001).
      init_lr: with ``adam_skip``, ψ₀'s Adam learning rate.
      adam_skip: ours — add the Adam direction m̂/(√v̂+ε) (first momentum / first rms accumulator) with a
        meta-learned learning rate to the output, the learned VeLO part starting at ``learned_step_init``. False
        for the original VeLO (and its published weights).
      learned_step_init: with ``adam_skip``, the initial per-tensor step multiplier of the learned part (the
        ``step_size`` head's bias; its weights start at 0). 0 makes ψ₀ exactly Adam(init_lr).
      eps: ε of the Adam skip.
    """

    family: ClassVar[str] = "velo"
    label: ClassVar[str] = "VeLO"

    lstm_hidden_size: int = 32
    ff_hidden_size: int = 4
    ff_hidden_layers: int = 2
    param_inits: int = 8
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float, ...] = (0.999,)
    adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    exp_mult: float = 0.001
    step_mult: float = 0.001
    init_lr: float = 3e-3
    adam_skip: bool = True
    learned_step_init: float = 0.0
    eps: float = 1e-8

    @classmethod
    def published(cls, **overrides: Any) -> VeLOConfig:
        """The sizes of the published VeLO checkpoint (LSTM 512, 256 basis MLPs), without our Adam skip."""
        return cls(**{"lstm_hidden_size": 512, "param_inits": 256, "adam_skip": False, **overrides})

    def __post_init__(self) -> None:
        for name in ("momentum_decays", "rms_decays", "adafactor_decays"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise ValueError(f"optimizer.{name}: expected a list of numbers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        for name, lo in (("lstm_hidden_size", 1), ("ff_hidden_size", 1), ("ff_hidden_layers", 0), ("param_inits", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"optimizer.{name}: expected an integer >= {lo}, got {v!r}.")
        for name in ("momentum_decays", "rms_decays", "adafactor_decays"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"optimizer.{name}: at least one decay is required.")
            for v in values:
                _check_number(name, v)
                if not 0.0 <= v < 1.0:
                    raise ValueError(f"optimizer.{name}: each decay must lie in [0, 1), got {values}.")
        n_mom = len(self.momentum_decays)
        for name in ("rms_decays", "adafactor_decays"):
            n = len(getattr(self, name))
            if n not in (1, n_mom) and n_mom != 1:
                raise ValueError(
                    f"optimizer.{name}: needs 1 entry or one per momentum decay ({n_mom}), got {n} "
                    "(hyper_v2 multiplies these accumulators with the momenta element-wise)."
                )
        for name in ("exp_mult", "step_mult", "init_lr", "eps"):
            v = getattr(self, name)
            _check_number(name, v)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"optimizer.{name}: must be a positive number, got {v!r}.")
        _check_number("learned_step_init", self.learned_step_init)
        if not math.isfinite(self.learned_step_init):
            raise ValueError(f"optimizer.learned_step_init: must be finite, got {self.learned_step_init!r}.")
        if not isinstance(self.adam_skip, bool):
            raise ValueError(f"optimizer.adam_skip: expected true or false, got {self.adam_skip!r}.")

    # ---------------------------------------------------------------------------------------------- derived sizes
    @property
    def num_momenta(self) -> int:
        return len(self.momentum_decays)

    @property
    def num_rms(self) -> int:
        return len(self.rms_decays)

    @property
    def num_adafactor(self) -> int:
        return len(self.adafactor_decays)

    @property
    def lstm_input_dims(self) -> tuple[int, ...]:
        """Sizes of the per-tensor feature groups, in hyper_v2's (alphabetical) order: fraction_left,
        loss_features, mean_rms, rank, var_m, var_rms (30 in all with the published sizes)."""
        m, r = self.num_momenta, self.num_rms
        return (len(FRACTION_TIMESCALES), NUM_LOSS_DECAYS - 1, r, RANK_CLASSES, m, max(m, r))

    @property
    def lstm_input_size(self) -> int:
        return sum(self.lstm_input_dims)

    @property
    def ff_input_dims(self) -> tuple[int, ...]:
        """Sizes of the 14 per-parameter input groups, in hyper_v2's order: g, clip(g), θ, m, rms, m/√rms, 1/√rms,
        Adafactor-preconditioned g, g/√rms, row accumulators, column accumulators, their 1/√·, factored m."""
        m, r, f = self.num_momenta, self.num_rms, self.num_adafactor
        return (1, 1, 1, m, r, max(m, r), r, f, r, f, f, f, f, max(m, f))

    @property
    def ff_input_size(self) -> int:
        return sum(self.ff_input_dims)

    # ---------------------------------------------------------------------------------------------- JSON form
    def to_dict(self) -> dict[str, Any]:
        d = {"family": self.family, **dataclasses.asdict(self)}
        for name in ("momentum_decays", "rms_decays", "adafactor_decays"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, recorded: bool = False) -> VeLOConfig:
        """``cls(**d)``; ``recorded`` (a dict an artifact wrote) changes nothing: no field of this family is newer than
        its artifacts."""
        return config_from_dict(cls, d)

    # ---------------------------------------------------------------- the learned-optimizer family interface
    def init(self, params: Any, key: jax.Array) -> dict[str, Any]:
        """VeLO's meta-parameters (:func:`init_velo`). VeLO is model-agnostic: ``params`` is ignored."""
        del params
        return init_velo(self, key)

    def template(self, layer_paths: tuple[str, ...]) -> dict[str, Any]:
        """Meta-parameters of the right structure (model-agnostic: ``layer_paths`` is ignored)."""
        del layer_paths
        return jax.tree.map(lambda s: np.zeros(s, np.float32), velo_param_shapes(self), is_leaf=_is_shape)

    def build(self, meta_params: Any, total_steps: Any) -> optax.GradientTransformationExtraArgs:
        """The optimizer :func:`velo`."""
        return velo(meta_params, self, total_steps)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"optimizer.{name}: expected a number, got {value!r} ({type(value).__name__}).")


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


# ----------------------------------------------------------------------------------------------------------------
# Meta-parameters
# ----------------------------------------------------------------------------------------------------------------
def _ff_layer_widths(config: VeLOConfig) -> list[int]:
    return [config.ff_hidden_size] * config.ff_hidden_layers + [NUM_OUTPUTS]


def velo_param_shapes(config: VeLOConfig) -> dict[str, Any]:
    """The meta-parameter layout: the same nested dict as the meta-parameters, with shape tuples as leaves."""
    h, p, f = config.lstm_hidden_size, config.param_inits, config.lstm_input_size

    def linear(fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
        return {"w": (fan_in, fan_out), "b": (fan_out,)}

    ff: dict[str, tuple[int, ...]] = {}
    last = config.ff_input_size
    for wi, width in enumerate(_ff_layer_widths(config)):
        if wi == 0:
            for ii, d in enumerate(config.ff_input_dims):
                ff[f"w0__{ii}"] = (p, d, width)
        else:
            ff[f"w{wi}"] = (p, last, width)
        ff[f"b{wi}"] = (p, width)
        last = width
    shapes: dict[str, Any] = {
        "lstm_init_state": {"hidden": (1, h), "cell": (1, h)},
        "rnn_params": {
            "linear": linear(f, h),
            "linear_1": linear(f, h),
            "linear_2": linear(f, h),
            "rnn/linear": linear(2 * h, 4 * h),
            "rnn_to_controls": linear(h, p),
            "step_size": linear(h, 1),
        },
        "ff_mod_stack": {"~": ff},
    }
    if config.adam_skip:
        shapes["adam_skip"] = {"log_lr": ()}
    return shapes


def init_velo(config: VeLOConfig, key: jax.Array) -> dict[str, Any]:
    """Initial meta-parameters, distributed like hyper_v2's Haiku init (truncated normals of std 1/√fan_in, zero
    biases and LSTM state). With ``adam_skip``, the learned part starts switched off (``step_size`` weights 0, bias
    ``learned_step_init``) and the Adam learning rate at ``init_lr``, so ψ₀ = Adam(init_lr)."""
    return _init_velo_jit(config, key)


@functools.partial(jax.jit, static_argnums=0)  # one compile instead of one per array shape
def _init_velo_jit(config: VeLOConfig, key: jax.Array) -> dict[str, Any]:
    shapes = velo_param_shapes(config)
    # (name path, shape, std) of every random weight; drawn with one sampler call (cheap to compile) and sliced.
    draws: list[tuple[tuple[str, ...], tuple[int, ...], float]] = []
    for name, s in shapes["rnn_params"].items():
        draws.append((("rnn_params", name, "w"), s["w"], 1.0 / np.sqrt(s["w"][0])))
    for name, s in shapes["ff_mod_stack"]["~"].items():
        if name.startswith("w"):  # hyper_v2: std 1/√(total fan-in of the layer), also for each w0__i block
            fan_in = config.ff_input_size if name.startswith("w0__") else s[1]
            draws.append((("ff_mod_stack", "~", name), s, 1.0 / np.sqrt(fan_in)))
    sizes = [int(np.prod(s)) for _, s, _ in draws]
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    drawn = {
        path: std * flat[int(a) : int(b)].reshape(s)
        for (path, s, std), a, b in zip(draws, offsets[:-1], offsets[1:], strict=True)
    }

    def build(node: Any, path: tuple[str, ...]) -> Any:
        if _is_shape(node):
            return drawn[path] if path in drawn else jnp.zeros(node, jnp.float32)
        return {k: build(v, path + (k,)) for k, v in node.items()}

    theta = build(shapes, ())
    if config.adam_skip:
        theta["rnn_params"]["step_size"] = {
            "w": jnp.zeros(shapes["rnn_params"]["step_size"]["w"], jnp.float32),
            "b": jnp.full((1,), config.learned_step_init, jnp.float32),
        }
        theta["adam_skip"] = {"log_lr": jnp.full((), np.log(config.init_lr), jnp.float32)}
    return theta


def _check_meta(meta: Any, config: VeLOConfig) -> None:
    expected = jax.tree.structure(velo_param_shapes(config), is_leaf=_is_shape)
    got = jax.tree.structure(meta)
    if expected != got:
        raise ValueError(
            f"VeLO: the meta-parameters do not have the structure {config!r} needs "
            f"(expected {expected}, got {got}); build them with config.init(...) or config.template(...)."
        )
    for (path, shape), leaf in zip(
        jax.tree_util.tree_flatten_with_path(velo_param_shapes(config), is_leaf=_is_shape)[0],
        jax.tree.leaves(meta),
        strict=True,
    ):
        if tuple(np.shape(leaf)) != shape:
            raise ValueError(
                f"VeLO: meta-parameter {jax.tree_util.keystr(path)} has shape {tuple(np.shape(leaf))}, "
                f"{config!r} needs {shape}."
            )


# ----------------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------------
class VeLOState(NamedTuple):
    """VeLO's optimizer state. Trees mirror the params (same structure); accumulators are float32 and store their
    decays on a leading axis (hyper_v2 keeps them last; leading makes the per-parameter MLP a [·, 30] × [30, N]
    product over contiguous rows, ~3× faster on CPU).

    Attributes:
      count: number of updates so far (k).
      mom: [M, *shape] momenta, one per ``momentum_decays``.
      rms: [R, *shape] second moments, one per ``rms_decays``.
      fac_row, fac_col: Adafactor-style accumulators of tensors with ≥ 2 axes: the mean of g² over the largest axis
        (row) / the second largest (column), i.e. [A, *shape without that axis]; shape (0,) for other tensors.
      fac_full: [A, *shape] full second moments of tensors with < 2 axes; shape (0,) for the others.
      lstm_hidden, lstm_cell: [n, H] the per-tensor LSTM state, rows in ``jax.tree.leaves(params)`` order.
      loss_mean: [10] raw loss EMAs; loss_min: [10] running minimum of their bias-corrected values;
      loss_count: number of (finite) losses seen.
    """

    count: jax.Array
    mom: Any
    rms: Any
    fac_row: Any
    fac_col: Any
    fac_full: Any
    lstm_hidden: jax.Array
    lstm_cell: jax.Array
    loss_mean: jax.Array
    loss_min: jax.Array
    loss_count: jax.Array


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(second largest axis, largest axis) of a tensor with ≥ 2 axes (ties: the later axis counts as larger),
    else None. As hyper_v2 / Adafactor."""
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])


def _empty() -> jax.Array:
    return jnp.zeros((0,), jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the step (hyper_v2, see the module docstring)
# ----------------------------------------------------------------------------------------------------------------
def _clip_log_abs(v: jax.Array, scale: float) -> jax.Array:
    return 0.5 * jnp.clip(jnp.log(1e-8 + jnp.abs(v * scale)), -5.0, 5.0)


def _safe_rsqrt(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def _loss_decays(total_steps: jax.Array) -> jax.Array:
    """Decays of the 10 loss EMAs: half-lives log-spaced in [10, K]."""
    halflife = 10.0 ** jnp.linspace(1.0, jnp.log10(total_steps), NUM_LOSS_DECAYS)
    return jnp.exp(-1.0 / halflife)


def _corrected(mean: jax.Array, count: jax.Array, decays: jax.Array) -> jax.Array:
    return mean / (1.0 - decays ** count.astype(jnp.float32))


def _loss_update(
    mean: jax.Array, low: jax.Array, count: jax.Array, loss: jax.Array, decays: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """New (mean, running minimum, count) and the new bias-corrected means."""
    # The loss is capped at twice the largest (bias-corrected) EMA so one spike cannot dominate.
    approx_max = jnp.where(count == 0, loss, jnp.max(_corrected(mean, count + 1, decays)))
    loss = jnp.minimum(2.0 * jnp.abs(approx_max), loss)
    mean = decays * mean + (1.0 - decays) * loss
    corrected = _corrected(mean, count + 1, decays)
    return mean, jnp.minimum(low, corrected), count + 1, corrected


def _loss_features(corrected: jax.Array, low: jax.Array, count: jax.Array) -> jax.Array:
    # Each EMA relative to its running minimum, in units of the next-longer EMA's distance to it: in [−1, 1].
    # ``corrected`` must be the very values ``low`` was updated with: at a new minimum the numerator is then exactly
    # 0 (with K ≤ 10 all half-lives are equal and the denominator is 0 too, so 1-ulp noise would decide the sign).
    span = jnp.maximum(1e-8, corrected[1:] - low[:-1])
    feat = jnp.clip((corrected[:-1] - low[:-1]) / span - 1.0, -1.0, 1.0)
    return jnp.where(count <= 2, 0.0, feat)  # where, not ·0: the count-0 value is 0/0


def _tensor_features(
    p: jax.Array, m: jax.Array, rms: jax.Array, time_feat: jax.Array, loss_feat: jax.Array
) -> jax.Array:
    """The LSTM input of one tensor (p: [*s]; m, rms: [·, *s], the accumulators before this step)."""
    axes = tuple(range(1, m.ndim))
    scale = jax.lax.rsqrt(jnp.maximum(1e-9, jnp.mean(jnp.square(p))))
    m, rms = m * scale, rms * scale
    mean_m = jnp.mean(m, axis=axes, keepdims=True)
    var_m = jnp.mean(jnp.square(m - mean_m), axis=axes)
    mean_rms = jnp.mean(rms, axis=axes)
    var_rms = jnp.mean(jnp.square(rms - mean_m), axis=axes)  # around the momenta's mean, as in hyper_v2
    rank = sum(1 for d in p.shape if d > 1)
    rank_feat = jax.nn.one_hot(rank, RANK_CLASSES, dtype=jnp.float32)
    return jnp.concatenate(
        [
            time_feat,
            loss_feat,
            _clip_log_abs(mean_rms, 10.0),
            rank_feat,
            _clip_log_abs(var_m, 10.0),
            _clip_log_abs(var_rms, 10.0),
        ]
    )


def _rnn(
    rnn: dict[str, Any], x: jax.Array, hidden: jax.Array, cell: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x: [n, F] → controls [n, P], step multipliers [n], next LSTM state."""

    def lin(name: str, v: jax.Array) -> jax.Array:
        return v @ rnn[name]["w"] + rnn[name]["b"]

    # Mixing across tensors: every tensor sees the max over all tensors of relu(linear_1(x)).
    mixed = jnp.max(jax.nn.relu(lin("linear_1", x)), axis=0, keepdims=True)
    x = lin("linear_2", x) + mixed
    gates = lin("rnn/linear", jnp.concatenate([x, hidden], axis=-1))
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    cell = jax.nn.sigmoid(f + 1.0) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return lin("rnn_to_controls", hidden), lin("step_size", hidden)[:, 0], hidden, cell


def _lead(x: jax.Array, ndim: int) -> jax.Array:
    """Decays [c] → [c, 1, …, 1] to broadcast against [c, *s] with ``ndim`` = len(s)."""
    return x.reshape(x.shape + (1,) * ndim)


def _accumulate(
    g: jax.Array,
    m: jax.Array,
    rms: jax.Array,
    row: jax.Array,
    col: jax.Array,
    full: jax.Array,
    b_mom: jax.Array,
    b_rms: jax.Array,
    b_fac: jax.Array,
) -> tuple[jax.Array, ...]:
    """One accumulator step for one tensor (g: [*s], s non-empty). Returns m, rms, row, col, full, fac_g."""
    nd = g.ndim
    g1 = g[None]
    b_mom, b_rms, b_fac = _lead(b_mom, nd), _lead(b_rms, nd), _lead(b_fac, nd)
    m = b_mom * m + (1.0 - b_mom) * g1
    rms = b_rms * rms + (1.0 - b_rms) * jnp.square(g1)
    g2 = jnp.square(g) + 1e-30
    dims = factored_dims(g.shape)
    if dims is not None:
        d1, d0 = dims
        b_fac = b_fac[..., 0]  # row and col have one axis fewer
        row = b_fac * row + (1.0 - b_fac) * jnp.mean(g2, axis=d0)[None]
        col = b_fac * col + (1.0 - b_fac) * jnp.mean(g2, axis=d1)[None]
        row_factor, col_factor = _factors(row, col, d1, d0)
        fac_g = g1 * jnp.expand_dims(row_factor, d0 + 1) * jnp.expand_dims(col_factor, d1 + 1)
    else:
        full = b_fac * full + (1.0 - b_fac) * g2[None]
        fac_g = g1 * _safe_rsqrt(full + 1e-9)
    return m, rms, row, col, full, fac_g


def _factors(row: jax.Array, col: jax.Array, d1: int, d0: int) -> tuple[jax.Array, jax.Array]:
    """Adafactor's row and column scales from [A, *s without d0] / [A, *s without d1] accumulators."""
    reduced_d1 = d1 - 1 if d1 > d0 else d1  # the column axis inside row (whose axis d0 was averaged away)
    row_col_mean = jnp.mean(row, axis=reduced_d1 + 1, keepdims=True)
    return _safe_rsqrt(row / (row_col_mean + 1e-9)), _safe_rsqrt(col)


def _param_inputs(
    p: jax.Array,
    g: jax.Array,
    m: jax.Array,
    rms: jax.Array,
    fac_g: jax.Array,
    row: jax.Array,
    col: jax.Array,
    full: jax.Array,
) -> jax.Array:
    """The per-parameter MLP inputs of one tensor as [F, N] (N = p.size), channels in hyper_v2's order, *not* yet
    normalised (the normalisation is a per-channel scale, folded into the first layer by :func:`_param_mlp`)."""
    g1, p1 = g[None], p[None]
    rsqrt = jax.lax.rsqrt(rms + 1e-6)
    inputs = [g1, jnp.clip(g1, -0.1, 0.1), p1, m, rms, m * rsqrt, rsqrt, fac_g, g1 * rsqrt]
    dims = factored_dims(p.shape)
    if dims is not None:
        d1, d0 = dims
        row_b, col_b = jnp.expand_dims(row, d0 + 1), jnp.expand_dims(col, d1 + 1)
        row_factor, col_factor = _factors(row, col, d1, d0)
        fac_m = m * jnp.expand_dims(row_factor, d0 + 1) * jnp.expand_dims(col_factor, d1 + 1)
        inputs += [row_b, col_b, jax.lax.rsqrt(row_b + 1e-8), jax.lax.rsqrt(col_b + 1e-8), fac_m]
    else:
        inv = jax.lax.rsqrt(full + 1e-8)
        inputs += [full, full, inv, inv, m * full**-0.5]
    x = jnp.concatenate([jnp.broadcast_to(v, v.shape[:1] + p.shape) for v in inputs], axis=0)
    return x.reshape(x.shape[0], -1)


def _param_mlp(x: jax.Array, layers: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """The generated MLP on [F, N] inputs → [3, N]. Each input channel is normalised to unit second moment over the
    tensor (hyper_v2), applied as a scale on the first layer's weights: (x·diag(s)) W = x (diag(s) W)."""
    inv_norm = jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=1))  # [F]
    for j, (w, b) in enumerate(layers):
        if j == 0:
            w = w * inv_norm[:, None]
        x = w.T @ x + b[:, None]
        if j < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def _generated_mlps(ff: dict[str, jax.Array], controls: jax.Array, config: VeLOConfig) -> list[tuple[Any, Any]]:
    """Per-tensor MLP weights: W = 100 · mean_j(c_j · W_j) for each of the n rows of ``controls`` [n, P]."""
    num_inputs = len(config.ff_input_dims)
    weights = [jnp.concatenate([ff[f"w0__{i}"] for i in range(num_inputs)], axis=1)]
    weights += [ff[f"w{wi}"] for wi in range(1, config.ff_hidden_layers + 1)]
    biases = [ff[f"b{wi}"] for wi in range(config.ff_hidden_layers + 1)]
    scale = CONTROL_SCALE / config.param_inits
    return [
        (scale * jnp.einsum("np,pio->nio", controls, w), scale * jnp.einsum("np,po->no", controls, b))
        for w, b in zip(weights, biases, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------------------------------------------
def velo(meta_params: Any, config: VeLOConfig, total_steps: int | jax.Array) -> optax.GradientTransformationExtraArgs:
    """The VeLO optimizer for meta-parameters ``meta_params``.

    Args:
      meta_params: from :func:`init_velo` / ``config.init`` (or :func:`l3rs.optim.velo_checkpoint.load_hyper_v2`).
      config: the :class:`VeLOConfig` they were built for.
      total_steps: K, the planned number of updates; a Python int or a traced scalar.

    Returns:
      A transformation with ``update(grads, state, params, *, value)``; ``value`` is the current loss.
    """
    _check_meta(meta_params, config)
    theta = meta_params
    b_mom = jnp.asarray(config.momentum_decays, jnp.float32)
    b_rms = jnp.asarray(config.rms_decays, jnp.float32)
    b_fac = jnp.asarray(config.adafactor_decays, jnp.float32)
    timescales = jnp.asarray(FRACTION_TIMESCALES, jnp.float32)
    num_m, num_r, num_a = config.num_momenta, config.num_rms, config.num_adafactor

    def init_fn(params: Any) -> VeLOState:
        leaves = jax.tree.leaves(params)
        if not leaves:
            raise ValueError("VeLO: params has no leaves.")

        def zeros(p: Any, n: int) -> jax.Array:
            return jnp.zeros((n,) + np.shape(p), jnp.float32)

        def fac(p: Any, which: str) -> jax.Array:
            shape = tuple(np.shape(p))
            dims = factored_dims(shape)
            if dims is None:
                return zeros(p, num_a) if which == "full" else _empty()
            if which == "full":
                return _empty()
            d1, d0 = dims
            drop = d0 if which == "row" else d1
            return jnp.zeros((num_a,) + tuple(d for i, d in enumerate(shape) if i != drop), jnp.float32)

        n = len(leaves)
        h0 = theta["lstm_init_state"]
        return VeLOState(
            count=jnp.zeros([], jnp.int32),
            mom=jax.tree.map(lambda p: zeros(p, num_m), params),
            rms=jax.tree.map(lambda p: zeros(p, num_r), params),
            fac_row=jax.tree.map(lambda p: fac(p, "row"), params),
            fac_col=jax.tree.map(lambda p: fac(p, "col"), params),
            fac_full=jax.tree.map(lambda p: fac(p, "full"), params),
            lstm_hidden=jnp.broadcast_to(jnp.asarray(h0["hidden"], jnp.float32)[0], (n, config.lstm_hidden_size)),
            lstm_cell=jnp.broadcast_to(jnp.asarray(h0["cell"], jnp.float32)[0], (n, config.lstm_hidden_size)),
            loss_mean=jnp.zeros((NUM_LOSS_DECAYS,), jnp.float32),
            loss_min=jnp.full((NUM_LOSS_DECAYS,), _LOSS_MIN_INIT, jnp.float32),
            loss_count=jnp.zeros([], jnp.int32),
        )

    def update_fn(grads: Any, state: VeLOState, params: Any = None, *, value: Any = None, **extra_args: Any):
        del extra_args
        if params is None:
            raise ValueError("VeLO.update needs params (they are features): update(grads, state, params, value=loss).")
        if value is None:
            raise ValueError("VeLO.update needs the current loss: update(grads, state, params, value=loss).")
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        old = [treedef.flatten_up_to(t) for t in (state.mom, state.rms, state.fac_row, state.fac_col, state.fac_full)]
        big_k = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        shapes = [tuple(np.shape(p)) for p in p_leaves]

        def vec(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
            # Scalars are handled as [1]-vectors (as hyper_v2 does): a trailing axis on the tensor and its accumulators.
            return x[..., None] if not shape and x.size else x

        p32 = [jnp.asarray(p, jnp.float32) for p in p_leaves]
        finite = [jnp.all(jnp.isfinite(g)) for g in g_leaves]
        g32 = [
            jnp.where(ok, jnp.clip(jnp.asarray(g, jnp.float32), -GRAD_CLIP, GRAD_CLIP), 0.0)
            for ok, g in zip(finite, g_leaves, strict=True)
        ]

        # Loss features; a non-finite loss leaves the loss EMAs untouched.
        loss = jnp.asarray(value, jnp.float32)
        decays = _loss_decays(big_k)
        new_loss = _loss_update(state.loss_mean, state.loss_min, state.loss_count, loss, decays)
        loss_ok = jnp.isfinite(loss)
        previous = (state.loss_mean, state.loss_min, state.loss_count)
        previous += (_corrected(state.loss_mean, state.loss_count, decays),)
        loss_mean, loss_min, loss_count, corrected = (
            jnp.where(loss_ok, new, prev) for new, prev in zip(new_loss, previous, strict=True)
        )
        loss_feat = _loss_features(corrected, loss_min, loss_count)

        # Per-tensor LSTM on the accumulators before this step; one batched call for all tensors.
        fraction = state.count.astype(jnp.float32) / big_k
        time_feat = jnp.tanh(10.0 * (fraction - timescales))
        feats = jnp.stack(
            [_tensor_features(p, m, r, time_feat, loss_feat) for p, m, r in zip(p32, old[0], old[1], strict=True)]
        )
        controls, step_mult, hidden, cell = _rnn(theta["rnn_params"], feats, state.lstm_hidden, state.lstm_cell)
        mlps = _generated_mlps(theta["ff_mod_stack"]["~"], controls, config)

        t = (state.count + 1).astype(jnp.float32)
        if config.adam_skip:
            adam_lr = jnp.exp(theta["adam_skip"]["log_lr"])
            corr1 = 1.0 - b_mom[0] ** t
            corr2 = 1.0 - b_rms[0] ** t

        updates, new_acc = [], [[] for _ in range(5)]
        for i, (shape, ok, p, g) in enumerate(zip(shapes, finite, p32, g32, strict=True)):
            pv, gv = vec(p, shape), vec(g, shape)
            prev = [vec(acc[i], shape) for acc in old]
            m, r, row, col, full, fac_g = _accumulate(gv, *prev, b_mom, b_rms, b_fac)
            # A non-finite gradient never reaches the accumulators.
            acc = [jnp.where(ok, new, before) for new, before in zip((m, r, row, col, full), prev, strict=True)]
            for store, a, before in zip(new_acc, acc, old, strict=True):
                store.append(a.reshape(before[i].shape))

            x = _param_inputs(pv, gv, m, r, fac_g, row, col, full)
            out = _param_mlp(x, [(w[i], b[i]) for w, b in mlps])
            direction, magnitude = out[0].reshape(pv.shape), out[1].reshape(pv.shape)
            param_scale = jnp.sqrt(jnp.mean(jnp.square(pv)) + 1e-9)
            log_mag = jnp.minimum(magnitude * config.exp_mult, _MAX_LOG_MAGNITUDE)
            step = step_mult[i] * direction * jnp.exp(log_mag) * (config.step_mult * param_scale)
            if config.adam_skip:
                step = step + adam_lr * (m[0] / corr1) / (jnp.sqrt(r[0] / corr2) + config.eps)
            u = -step.reshape(shape)
            keep = ok & jnp.all(jnp.isfinite(u))
            updates.append(jnp.where(keep, u, 0.0).astype(jnp.asarray(p_leaves[i]).dtype))

        mom, rms, fac_row, fac_col, fac_full = (jax.tree.unflatten(treedef, acc) for acc in new_acc)
        new_state = VeLOState(
            count=state.count + 1,
            mom=mom,
            rms=rms,
            fac_row=fac_row,
            fac_col=fac_col,
            fac_full=fac_full,
            lstm_hidden=hidden,
            lstm_cell=cell,
            loss_mean=loss_mean,
            loss_min=loss_min,
            loss_count=loss_count,
        )
        return jax.tree.unflatten(treedef, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
