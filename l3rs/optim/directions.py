"""Base update directions d_p for L3RS (paper §4.1, Eq. 2; Table 4 for the variants).

A *direction* is an optax transformation whose update points **downhill**: exactly what an optax optimizer with
learning rate 1 would add to the parameters (``optax.sgd(1.0)`` returns ``-g``). L3RS only uses each direction
per layer after normalising it to unit l2 norm, so a direction's overall scale never matters, only its shape.

Base optimizers' hyperparameters in (0, 1) (Adam's β1, β2, ...) are part of ψ and meta-learned through a logit
(paper §4.1, "The hyperparameters of the input optimizer ... are also jointly meta-learned"). Any optax
transformation can be used as a direction::

    my_dir = Direction("adabelief", lambda hp: optax.adabelief(1.0, b1=hp["b1"]), learnable={"b1": 0.9})
    config = L3RSConfig(directions=("adam", "sgd", my_dir))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

__all__ = ["Direction", "BUILTIN_DIRECTIONS", "resolve_direction", "weight_decay_direction"]

Hparams = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Direction:
    """A base optimizer L3RS mixes.

    Attributes:
      name: unique name; columns of ``layer_stats(state)["mixing"]`` follow the config's order of names.
      factory: maps the (constrained) learnable hyperparameters to an optax transformation whose update is a
        descent direction (learning rate 1). It is called inside ``update`` with traced values, so it must accept
        jax arrays; its ``init`` must not depend on them.
      learnable: initial values, each in (0, 1), of hyperparameters meta-learned through a logit in ψ.
    """

    name: str
    factory: Callable[[Hparams], optax.GradientTransformation]
    learnable: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.learnable.items():
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"Direction {self.name!r}: learnable[{key!r}]={value} must lie in (0, 1).")

    def __hash__(self) -> int:
        return hash((self.name, id(self.factory)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Direction) and (self.name, self.factory) == (other.name, other.factory)


def weight_decay_direction() -> optax.GradientTransformation:
    """The WeightDecay direction of Table 4: ``-θ`` (shrinks each layer towards zero)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("The weight_decay direction needs params: call update(grads, state, params).")
        del updates
        return jax.tree.map(lambda p: -p, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def _negated(*transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(*transforms, optax.scale(-1.0))


BUILTIN_DIRECTIONS: dict[str, Direction] = {
    # SGD without momentum: d = -g.
    "sgd": Direction("sgd", lambda hp: optax.scale(-1.0)),
    # Adam: d = -m̂ / (√v̂ + ε); β1, β2 meta-learned (paper §4.1).
    "adam": Direction(
        "adam",
        lambda hp: _negated(optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=1e-8)),
        learnable={"b1": 0.9, "b2": 0.999},
    ),
    # Lion (Chen et al., 2023): d = -sign(interpolated momentum).
    "lion": Direction(
        "lion",
        lambda hp: _negated(optax.scale_by_lion(b1=hp["b1"], b2=hp["b2"])),
        learnable={"b1": 0.9, "b2": 0.99},
    ),
    # LAMB (You et al., 2020): Adam + decoupled weight decay, trust-ratio scaled. Because L3RS normalises every
    # layer, the per-layer trust ratio cancels; the weight-decay term is what distinguishes it from Adam.
    "lamb": Direction(
        "lamb",
        lambda hp: _negated(
            optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=1e-6),
            optax.add_decayed_weights(1e-2),
            optax.scale_by_trust_ratio(),
        ),
        learnable={"b1": 0.9, "b2": 0.999},
    ),
    # Adamax (Kingma & Ba, 2014).
    "adamax": Direction(
        "adamax",
        lambda hp: _negated(optax.scale_by_adamax(b1=hp["b1"], b2=hp["b2"])),
        learnable={"b1": 0.9, "b2": 0.999},
    ),
    "weight_decay": Direction("weight_decay", lambda hp: weight_decay_direction()),
}


def resolve_direction(spec: str | Direction) -> Direction:
    """Returns the :class:`Direction` for a built-in name or a user-supplied ``Direction``."""
    if isinstance(spec, Direction):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_DIRECTIONS:
        return BUILTIN_DIRECTIONS[spec]
    raise ValueError(
        f"directions: unknown base direction {spec!r}; built-in ones are {sorted(BUILTIN_DIRECTIONS)} "
        "(or pass an l3rs.Direction)."
    )


def constrain(unconstrained: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Maps ψ's logits to hyperparameters in (0, 1)."""
    return {k: jax.nn.sigmoid(v) for k, v in unconstrained.items()}


def unconstrain(values: Mapping[str, float]) -> dict[str, jax.Array]:
    """Inverse of :func:`constrain`: logits of values in (0, 1)."""
    return {k: jnp.log(jnp.float32(v)) - jnp.log1p(-jnp.float32(v)) for k, v in values.items()}
