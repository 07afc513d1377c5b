"""Learned-optimizer families: what the service needs to meta-train any learned optimizer with a flat vector.

A family is a frozen config dataclass (:class:`l3rs.L3RSConfig`, :class:`l3rs.FCLoptConfig`,
:class:`l3rs.VeLOConfig`) that fixes the *shape* of the meta-parameters and provides:

    config.family                       registry key; ``[optimizer] family = "..."`` in a run config
    config.label                        row label in reports ("L3RS", "FC-LOpt", "VeLO")
    config.init(params, key)            meta-parameters for a model with these params: the NES start point, already
                                        a working optimizer (every built-in family starts at ≈ Adam(init_lr))
    config.template(layer_paths)        a meta-parameter pytree of the right structure, for restoring artifacts
    config.build(meta, total_steps)     the optimizer: an ``optax.GradientTransformationExtraArgs`` whose update is
                                        ``update(grads, state, params, value=loss)``; ``total_steps`` may be traced
    config.to_dict() / from_dict(d)     JSON form, with ``"family"``

NES works on the flat float32 vector of the meta-parameters (:func:`meta_to_vector` / :func:`vector_to_meta`, i.e.
``jax.flatten_util.ravel_pytree``), so one driver, worker, artifact format and evaluation serve every family.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

__all__ = [
    "FAMILIES",
    "LearnedOptimizerConfig",
    "config_from_dict",
    "family_from_dict",
    "meta_size",
    "meta_to_vector",
    "register_family",
    "vector_to_meta",
]


@runtime_checkable
class LearnedOptimizerConfig(Protocol):
    """What every learned-optimizer config provides (see the module docstring)."""

    family: str
    label: str

    def init(self, params: Any, key: jax.Array) -> Any: ...

    def template(self, layer_paths: tuple[str, ...]) -> Any: ...

    def build(self, meta_params: Any, total_steps: int | jax.Array) -> optax.GradientTransformationExtraArgs: ...

    def to_dict(self) -> dict[str, Any]: ...


FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Adds a config class to :data:`FAMILIES` under ``cls.family`` (usable as a class decorator)."""
    FAMILIES[cls.family] = cls
    return cls


def family_from_dict(d: dict[str, Any], *, recorded: bool = False) -> LearnedOptimizerConfig:
    """The config of ``d["family"]`` (default ``"l3rs"``, which is what artifacts before families recorded).

    ``recorded``: ``d`` was written by an artifact, so a field it lacks predates that field and keeps its original
    meaning rather than today's default (see :data:`l3rs.optim.config.LEGACY_VALUES`)."""
    d = dict(d)
    name = d.get("family", "l3rs")
    if name not in FAMILIES:
        raise ValueError(f"optimizer.family: {name!r} is not one of {sorted(FAMILIES)}.")
    return FAMILIES[name].from_dict(d, recorded=recorded)


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` for a family config class, refusing another family's dict or unknown fields (named)."""
    import dataclasses

    d = dict(d)
    family = d.pop("family", cls.family)
    if family != cls.family:
        raise ValueError(f"optimizer.family: {family!r} is not {cls.family!r}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"optimizer: unknown field(s) {unknown}; known: {sorted(known | {'family'})}.")
    return cls(**d)


def meta_to_vector(meta_params: Any) -> jax.Array:
    """The meta-parameters as one flat float32 vector (what NES perturbs)."""
    return ravel_pytree(meta_params)[0].astype(jnp.float32)


def vector_to_meta(vector: jax.Array, template: Any) -> Any:
    """Inverse of :func:`meta_to_vector`, with ``template`` giving the structure (works under jit and vmap)."""
    unravel = ravel_pytree(template)[1]
    expected = meta_size(template)
    if vector.shape[-1] != expected:
        raise ValueError(f"vector_to_meta: vector has {vector.shape[-1]} entries, the meta-parameters need {expected}.")
    return unravel(jnp.asarray(vector, jnp.float32))


def meta_size(meta_params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(meta_params)))
