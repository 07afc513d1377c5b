"""L3RS architecture configuration (paper §4.1; variants of §6 / Table 2, "Global" from the v2 revision)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Literal

import numpy as np

from l3rs.optim.directions import Direction, resolve_direction
from l3rs.optim.family import config_from_dict, register_family

__all__ = ["L3RSConfig", "VARIANTS", "FEATURE_SCALES", "PAST_HORIZON"]

VARIANTS = ("embedding", "no_embedding", "per_layer_mlp", "global")
Variant = Literal["embedding", "no_embedding", "per_layer_mlp", "global"]
FEATURE_SCALES = ("absolute", "relative", "log_relative")
FeatureScale = Literal["absolute", "relative", "log_relative"]
PAST_HORIZON = ("extrapolate", "clamp", "decay")
# What an optimizer dict written before a field existed meant: artifacts record every field of their config, so a
# missing one predates it and had this (its original) behaviour, whatever today's default is (issue 11's options).
LEGACY_VALUES: dict[str, Any] = {
    "feature_scale": "absolute",
    "lambda_max_adam_ratio": None,
    "past_horizon": "extrapolate",
    "absolute_time_k_max": None,
}
PastHorizon = Literal["extrapolate", "clamp", "decay"]


def _default_anchors() -> tuple[float, ...]:
    # 11 relative-time reference points α_i, linearly spaced in [0, 1] inclusive (§4.1, Fig. 6).
    return tuple(float(a) for a in np.linspace(0.0, 1.0, 11))


def _default_betas() -> tuple[float, ...]:
    # 4 absolute-time scales β_j, log-spaced in [1e-4, 0.1] (§4.1, Fig. 7).
    return tuple(float(b) for b in np.logspace(-4.0, -1.0, 4))


@register_family
@dataclasses.dataclass(frozen=True)
class L3RSConfig:
    """Everything that fixes the *shape* of ψ and the meaning of its entries.

    Attributes:
      directions: base optimizers d_p, built-in names (``sgd adam lion lamb adamax weight_decay``) or
        :class:`l3rs.Direction` objects. Paper default: Adam and SGD without momentum.
      hidden_sizes: hidden widths of the shared MLP (paper: 32, 16, ReLU).
      embedding_dim: per-layer learned embedding size (paper: 16). Ignored (0) unless ``variant="embedding"``.
      ema_decays: smoothing factors γ of the bias-corrected EMAs of log‖w‖, log‖g‖ and the loss.
      relative_time_anchors: α_i of the features tanh(10(k/K − α_i)).
      absolute_time_betas: β_j of the features tanh(log(K β_j)).
      variant: ``"embedding"`` (the paper's L3RS), ``"no_embedding"`` (shared MLP, no layer identity),
        ``"per_layer_mlp"`` (one MLP per layer, no embedding), ``"global"`` (one λ and μ for the whole model: the
        model is treated as a single layer, so norms are global norms).
      init_lr: ψ₀'s step size. With ``lambda_skip`` it is measured in units of the first direction: ψ₀ moves each
        layer by ``init_lr·‖d_1‖``, i.e. exactly the step of that base optimizer with learning rate ``init_lr``
        (Adam(init_lr) for the default config). Without ``lambda_skip``, λ₀ = init_lr.
      init_mixing: ψ₀'s μ, one entry per direction, summing to 1 (default: 0.9 on the first direction, the rest
        shared equally).
      lambda_skip: add log‖d_1‖ (one of the MLP's own inputs, §4.1 "base-optimizer direction magnitude") to the
        λ-logit as a skip connection, so λ = exp(z_{P+1} + log‖d_1‖). The paper's plain λ = exp(z_{P+1}) is
        ``lambda_skip=False``; both are the same function class, the skip only makes ψ₀ = Adam(init_lr) exact.
      eps: added inside every log-norm and norm division.

    Stability options (issue 11). The default, a bound of 10 Adam-equivalent steps on §4.1's absolute features
    ("G1"), was chosen by meta-training each option with the demo's budget on the glyphs benchmark and measuring it
    on 32 fresh tasks per setting (docs/stability.md, docs/generalization). ``lambda_max_adam_ratio=None``
    (``"none"`` in TOML), ``past_horizon="extrapolate"`` and ``absolute_time_k_max=None`` with the absolute features
    are the original behaviour, bit for bit, which artifacts written before these fields existed keep
    (:data:`LEGACY_VALUES`):

      feature_scale: how the norm and loss features are scaled. ``"absolute"`` (§4.1 as written): EMAs of log‖w‖,
        log‖g‖ and the loss L, and log‖d_p‖. ``"relative"``: every norm relative to its value at the layer's first
        update (log‖w‖ − log‖w₀‖, log‖g‖ − log‖g₀‖, log‖d_p‖ − log‖d_p,0‖) and the loss relative to the first finite
        loss, L / (|L₀| + eps). ``"log_relative"``: the same norms, and the loss as log(max(L, eps) / (|L₀| + eps))
        (meant for positive losses such as cross-entropy). The λ skip connection (``lambda_skip``) always uses the
        absolute log‖d_1‖: it is the unit of λ, not a feature.
      lambda_max_adam_ratio: ``None`` (no bound; ``"none"`` in a TOML config, which has no null) or c > 1: a smooth
        bound on λ in units of the *Adam-equivalent step* lr₀·‖d_1‖ (lr₀ = ``init_lr``, d_1 the first direction, Adam by
        default). With r the unbounded ratio λ/(lr₀‖d_1‖), the bounded ratio is c·σ(log r − log(c − 1)): it equals 1
        where r = 1 (so ψ₀ is unchanged), follows r for r ≪ c and never exceeds c, so ‖Δθ‖ ≤ λ < c·lr₀·‖d_1‖. Smooth, so
        NES still sees how a candidate's λ moves. c must exceed 1 because ψ₀ itself steps at ratio 1.
      past_horizon: what the time features do for steps k ≥ K (more steps than the optimizer was told).
        ``"extrapolate"``: tanh(10(k/K − α)) with k/K > 1 (saturates towards 1). ``"clamp"``: the relative-time
        features stay at those of the last planned step, k = K − 1. ``"decay"``: as ``"clamp"``, and λ is scaled
        by K/(k + 1) for k ≥ K, so steps shrink like 1/k past the horizon.
      absolute_time_k_max: ``None`` or a horizon: the absolute-time features tanh(log(K β_j)) see min(K,
        absolute_time_k_max), so a run longer than any meta-training task (e.g. the artifact's ``k_range[1]``)
        presents the same absolute-time features as the longest one instead of values the MLP never saw; the
        relative-time features still span the whole run.
    """

    family: ClassVar[str] = "l3rs"
    label: ClassVar[str] = "L3RS"

    directions: tuple[str | Direction, ...] = ("adam", "sgd")
    hidden_sizes: tuple[int, ...] = (32, 16)
    embedding_dim: int = 16
    ema_decays: tuple[float, ...] = (0.0, 0.9, 0.99)
    relative_time_anchors: tuple[float, ...] = dataclasses.field(default_factory=_default_anchors)
    absolute_time_betas: tuple[float, ...] = dataclasses.field(default_factory=_default_betas)
    variant: Variant = "embedding"
    init_lr: float = 3e-3
    init_mixing: tuple[float, ...] | None = None
    lambda_skip: bool = True
    eps: float = 1e-8
    feature_scale: FeatureScale = "absolute"
    lambda_max_adam_ratio: float | None = 10.0
    past_horizon: PastHorizon = "extrapolate"
    absolute_time_k_max: float | None = None

    def __post_init__(self) -> None:
        # Accept lists (TOML, JSON) by normalising sequences to tuples.
        for name in (
            "directions",
            "hidden_sizes",
            "ema_decays",
            "relative_time_anchors",
            "absolute_time_betas",
        ):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise ValueError(f"optimizer.{name}: expected a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.init_mixing is not None:
            object.__setattr__(self, "init_mixing", tuple(float(m) for m in self.init_mixing))
        self._validate()

    def _validate(self) -> None:
        # Types first, so that e.g. a quoted number in a TOML file is named instead of failing in arithmetic.
        for name in ("init_lr", "eps"):
            _check_number(name, getattr(self, name))
        for name in ("hidden_sizes", "ema_decays", "relative_time_anchors", "absolute_time_betas"):
            for v in getattr(self, name):
                _check_number(name, v)
        _check_number("embedding_dim", self.embedding_dim)
        for v in self.init_mixing or ():
            _check_number("init_mixing", v)
        if not self.directions:
            raise ValueError("optimizer.directions: at least one base direction is required.")
        try:
            names = [resolve_direction(d).name for d in self.directions]
        except ValueError as e:
            raise ValueError(f"optimizer.{e}") from None
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer.directions: duplicate names in {names}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"optimizer.variant: {self.variant!r} is not one of {VARIANTS}.")
        if any(int(h) != h or h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"optimizer.hidden_sizes: positive integers required, got {self.hidden_sizes}.")
        if int(self.embedding_dim) != self.embedding_dim or self.embedding_dim < 0:
            raise ValueError(f"optimizer.embedding_dim: a non-negative integer required, got {self.embedding_dim}.")
        if any(not 0.0 <= g < 1.0 for g in self.ema_decays):
            raise ValueError(f"optimizer.ema_decays: each γ must lie in [0, 1), got {self.ema_decays}.")
        if any(b <= 0 for b in self.absolute_time_betas):
            raise ValueError(f"optimizer.absolute_time_betas: must be positive, got {self.absolute_time_betas}.")
        if not (math.isfinite(self.init_lr) and self.init_lr > 0):
            raise ValueError(f"optimizer.init_lr: must be a positive number, got {self.init_lr}.")
        if self.init_mixing is not None:
            m = self.init_mixing
            if len(m) != len(self.directions) or any(x <= 0 for x in m) or abs(sum(m) - 1.0) > 1e-6:
                raise ValueError(
                    f"optimizer.init_mixing: need {len(self.directions)} positive weights summing to 1, got {m}."
                )
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: must be positive, got {self.eps}.")
        if not isinstance(self.lambda_skip, bool):
            raise ValueError(f"optimizer.lambda_skip: expected true or false, got {self.lambda_skip!r}.")
        if self.feature_scale not in FEATURE_SCALES:
            raise ValueError(f"optimizer.feature_scale: {self.feature_scale!r} is not one of {FEATURE_SCALES}.")
        if self.past_horizon not in PAST_HORIZON:
            raise ValueError(f"optimizer.past_horizon: {self.past_horizon!r} is not one of {PAST_HORIZON}.")
        for name in ("lambda_max_adam_ratio", "absolute_time_k_max"):  # TOML has no null: "none" turns an option off
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() == "none":
                object.__setattr__(self, name, None)
        if self.lambda_max_adam_ratio is not None:
            _check_number("lambda_max_adam_ratio", self.lambda_max_adam_ratio)
            if not (math.isfinite(self.lambda_max_adam_ratio) and self.lambda_max_adam_ratio > 1.0):
                raise ValueError(
                    "optimizer.lambda_max_adam_ratio: must be a finite number > 1 (ψ₀ steps at 1× the "
                    f'Adam-equivalent step), or "none" for no bound; got {self.lambda_max_adam_ratio}.'
                )
        if self.absolute_time_k_max is not None:
            _check_number("absolute_time_k_max", self.absolute_time_k_max)
            if not (math.isfinite(self.absolute_time_k_max) and self.absolute_time_k_max >= 1):
                raise ValueError(
                    f'optimizer.absolute_time_k_max: must be a number >= 1, or "none"; got {self.absolute_time_k_max}.'
                )

    # ----------------------------------------------------------------------------------------------------------
    @property
    def resolved_directions(self) -> tuple[Direction, ...]:
        return tuple(resolve_direction(d) for d in self.directions)

    @property
    def direction_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.resolved_directions)

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    @property
    def effective_embedding_dim(self) -> int:
        return self.embedding_dim if self.variant == "embedding" else 0

    @property
    def num_features(self) -> int:
        """Length of one layer's MLP input (42 for the paper's default)."""
        g = len(self.ema_decays)
        return (
            3 * g  # EMAs of log‖w‖, log‖g‖, loss
            + len(self.relative_time_anchors)
            + len(self.absolute_time_betas)
            + self.num_directions  # log‖d_p‖
            + self.effective_embedding_dim
        )

    def mixing0(self) -> tuple[float, ...]:
        if self.init_mixing is not None:
            return self.init_mixing
        p = self.num_directions
        if p == 1:
            return (1.0,)
        return (0.9,) + (0.1 / (p - 1),) * (p - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for artifacts). Custom :class:`Direction` objects are recorded by name only."""
        d = {"family": self.family, **dataclasses.asdict(self)}
        d["directions"] = list(self.direction_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, recorded: bool = False) -> L3RSConfig:
        """``cls(**d)``; with ``recorded`` (a dict an artifact wrote, which lists every field its version had), a field
        it lacks gets its original value (:data:`LEGACY_VALUES`), not today's default."""
        if recorded:
            d = {**{k: v for k, v in LEGACY_VALUES.items() if k not in d}, **d}
        return config_from_dict(cls, d)

    # ---------------------------------------------------------------- the learned-optimizer family interface
    def init(self, params: Any, key: Any) -> Any:
        """ψ₀ for a model with these params (:func:`l3rs.init_psi`)."""
        from l3rs.optim.l3rs import init_psi

        return init_psi(self, params, key)

    def template(self, layer_paths: tuple[str, ...]) -> Any:
        """A ψ of the right structure for ``layer_paths`` (values irrelevant): for restoring artifacts."""
        from l3rs.optim.l3rs import init_psi

        nested: dict[str, Any] = {}
        for path in layer_paths:
            node = nested
            *parents, leaf = path.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = np.zeros((), np.float32)
        psi = init_psi(self, nested, _key0())
        if list(psi.layer_paths) != list(layer_paths):
            raise ValueError("optimizer: could not rebuild ψ's layer structure from the layer paths.")
        return psi

    def build(self, meta_params: Any, total_steps: Any) -> Any:
        """The optimizer :func:`l3rs.l3rs` (ψ = ``meta_params``)."""
        from l3rs.optim.l3rs import l3rs

        return l3rs(meta_params, self, total_steps)


def _key0() -> Any:
    import jax

    return jax.random.key(0)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"optimizer.{name}: expected a number, got {value!r} ({type(value).__name__}).")
