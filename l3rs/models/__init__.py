"""Flax models: a small CNN for CPU runs and ResNet-18/34 for GPU clusters, plus the helpers a task needs.

Every model is called as ``module.apply(variables, x, train=...)`` on NHWC float images and ends in
``nn.Dense(num_classes, name="head")``, so a task can swap in a fresh N-way head (:func:`fresh_head`) or train the
head alone (:func:`head_mask`).

    module = create("small_cnn", num_classes=5)
    variables = init_variables(module, jax.random.key(0), (28, 28, 1))
    params = fresh_head(variables["params"], jax.random.key(1), num_classes=5)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from l3rs.models.cnn import SmallCNN
from l3rs.models.layers import CONV_IMPLS, Im2ColConv, conv_class, im2col
from l3rs.models.resnet import BasicBlock, ResNet, ResNet18, ResNet34

__all__ = [
    "CONV_IMPLS",
    "HEAD",
    "MODELS",
    "BasicBlock",
    "Im2ColConv",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "SmallCNN",
    "conv_class",
    "create",
    "fresh_head",
    "head_mask",
    "im2col",
    "init_variables",
]

HEAD = "head"
"""Name of every model's classifier (``params[HEAD] = {"kernel": [features, N], "bias": [N]}``)."""

MODELS: Mapping[str, Callable[..., nn.Module]] = types.MappingProxyType(
    {"small_cnn": SmallCNN, "resnet18": ResNet18, "resnet34": ResNet34}
)
"""The registry :func:`create` draws from (model name -> module class)."""


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The model registered as ``name`` with a ``num_classes``-way head.

    Args:
      name: one of :data:`MODELS` (``"small_cnn"``, ``"resnet18"``, ``"resnet34"``).
      num_classes: outputs of the head.
      **kwargs: the model's other fields (e.g. ``conv="im2col"``, ``small_inputs=True``); lists become tuples.

    Raises:
      ValueError: unknown ``name`` or option, or an invalid value (the message names the field).
    """
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; known: {sorted(MODELS)}.")
    cls = MODELS[name]
    options = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "num_classes"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(options)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(num_classes=num_classes, **kwargs)


def _init(module: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    return dict(module.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False))


# Jitted: flax's eager init of a model cost 6.7 s in a cold worker (environment.md); compiled, well under 1 s.
# The module is static (flax modules hash by their fields), so equal models share one compilation.
_init_jit = jax.jit(_init, static_argnums=(0, 2))


def init_variables(module: nn.Module, key: jax.Array, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Freshly initialised variables of ``module`` for images of shape ``input_shape`` = (H, W, C).

    Returns ``{"params": ...}``, plus ``{"batch_stats": ...}`` for BatchNorm models. Runs jitted.
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape: {input_shape!r} must be (height, width, channels) of positive ints.")
    try:
        hash(module)
    except TypeError:  # a field holds an unhashable value: compile for this call only
        return jax.jit(_init, static_argnums=(0, 2))(module, key, shape)
    return _init_jit(module, key, shape)


def fresh_head(params: Mapping[str, Any], key: jax.Array, num_classes: int) -> dict[str, Any]:
    """``params`` with a freshly initialised ``num_classes``-way head; every other layer is kept as is.

    The new head is what ``nn.Dense(num_classes)`` initialises (LeCun-normal kernel [features, num_classes], zero
    bias) in the old head's dtype. Works under ``jit`` (``num_classes`` must be static).

    Raises:
      ValueError: ``params`` has no ``head`` with a 2-D ``kernel``, or ``num_classes`` is not a positive int.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: {num_classes!r} must be a positive int.")
    head = params.get(HEAD) if isinstance(params, Mapping) else None
    if not isinstance(head, Mapping) or "kernel" not in head or jnp.ndim(head["kernel"]) != 2:
        raise ValueError(f"params: no {HEAD!r} layer with a 2-D 'kernel' (top-level keys: {_keys(params)}).")
    in_features, dtype = head["kernel"].shape[0], head["kernel"].dtype
    new = {"kernel": nn.linear.default_kernel_init(key, (in_features, num_classes), dtype)}
    if "bias" in head:
        new["bias"] = jnp.zeros((num_classes,), dtype)
    if isinstance(params, FrozenDict):
        return params.copy({HEAD: new})
    return {**params, HEAD: new}


def head_mask(params: Any) -> Any:
    """A pytree like ``params`` with True for the leaves under a ``head`` module and False elsewhere.

    For head-only fine-tuning, e.g. ``optax.masked(tx, head_mask(params))``.

    Raises:
      ValueError: ``params`` has no ``head`` (the mask would freeze everything).
    """
    mask = jax.tree_util.tree_map_with_path(lambda path, _: any(getattr(k, "key", None) == HEAD for k in path), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"params: no {HEAD!r} layer to train (top-level keys: {_keys(params)}).")
    return mask


def _keys(params: Any) -> list[str]:
    return sorted(map(str, params)) if isinstance(params, Mapping) else []
