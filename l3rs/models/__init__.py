"""Flax models: a small CNN for CPU runs and ResNet-18/34 for GPU clusters, plus the helpers a task needs.

Every model is called as ``module.apply(variables, x, train=...)`` on NHWC float images and ends in a Dense
classifier (``nn.Dense(num_classes, name="head")`` in the presets), so a task can swap in a fresh N-way head
(:func:`fresh_head`) or train the head alone (:func:`head_mask`). Besides the three presets of :data:`MODELS`, any
flax linen module class with a ``num_classes`` field can be named by import path, ``"package.module:Class"``
(:func:`import_model`); its classifier layer may have another name or sit deeper (``head="classifier/out"``).

    module = create("small_cnn", num_classes=5)
    variables = init_variables(module, jax.random.key(0), (28, 28, 1))
    params = fresh_head(variables["params"], jax.random.key(1), num_classes=5)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
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
    "find_head",
    "fresh_head",
    "head_mask",
    "head_path",
    "im2col",
    "import_model",
    "init_variables",
    "model_options",
]

HEAD = "head"
"""Name of every model's classifier (``params[HEAD] = {"kernel": [features, N], "bias": [N]}``)."""

MODELS: Mapping[str, Callable[..., nn.Module]] = types.MappingProxyType(
    {"small_cnn": SmallCNN, "resnet18": ResNet18, "resnet34": ResNet34}
)
"""The registry :func:`create` draws from (model name -> module class)."""


def _is_import_path(name: str) -> bool:
    return ":" in name


def import_model(name: str, module_path: str = "") -> type:
    """The model class ``name`` names: a preset of :data:`MODELS` or an import path ``"package.module:Class"``.

    Args:
      name: ``"small_cnn"``, ``"resnet18"``, ``"resnet34"`` or ``"module:attribute"`` (attribute may be dotted).
      module_path: a folder put first on ``sys.path`` before importing (e.g. the folder holding the user's
        ``mynet.py``); ``""`` imports from the current ``sys.path``.

    Raises:
      ValueError: naming ``model.name`` (unknown preset, unimportable module, missing attribute, not a flax linen
        module class) or ``model.module_path`` (not a folder).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("model.name: a preset name or an import path 'package.module:Class' is required.")
    if not _is_import_path(name):
        if name not in MODELS:
            raise ValueError(
                f"model.name: unknown model {name!r}; presets: {sorted(MODELS)}, or an import path "
                "'package.module:Class' of your own flax module."
            )
        return MODELS[name]  # type: ignore[return-value]
    if module_path:
        folder = os.path.abspath(os.path.expanduser(module_path))
        if not os.path.isdir(folder):
            raise ValueError(f"model.module_path: {module_path!r} is not a folder.")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises while importing
        hint = f" (model.module_path = {module_path!r})" if module_path else " (set model.module_path to its folder)"
        raise ValueError(f"model.name: cannot import {module_name!r}{hint}: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise ValueError(f"model.name: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        kind = type(obj).__name__
        try:
            from flax import nnx

            if isinstance(obj, type) and issubclass(obj, nnx.Module):
                kind = "a flax NNX module"
        except ImportError:  # pragma: no cover - flax without nnx
            pass
        raise ValueError(
            f"model.name: {name!r} is {kind}, not a flax linen Module class (NNX modules: wrap them in a linen module "
            "with flax.nnx.bridge.to_linen; see the README's 'Your model, your data')."
        )
    return obj


def model_options(cls: type) -> set[str]:
    """The keyword options a linen module class takes (its dataclass fields but ``parent``, ``name``)."""
    return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def create(name: str, num_classes: int, *, module_path: str = "", **kwargs: Any) -> nn.Module:
    """The model ``name`` with a ``num_classes``-way head.

    Args:
      name: one of :data:`MODELS` (``"small_cnn"``, ``"resnet18"``, ``"resnet34"``) or an import path
        ``"package.module:Class"`` of a flax linen module that takes ``num_classes`` and is called as
        ``module.apply(variables, x, train=...)`` on NHWC float images (see :func:`import_model`).
      num_classes: outputs of the head.
      module_path: folder to import the user's module from (see :func:`import_model`).
      **kwargs: the model's other fields (e.g. ``conv="im2col"``, ``small_inputs=True``); lists become tuples.

    Raises:
      ValueError: unknown ``name`` or option, or an invalid value (the message names the field).
    """
    cls = import_model(name, module_path)
    options = model_options(cls)
    if "num_classes" not in options:
        raise ValueError(f"model.name: {name!r} takes no num_classes field (its fields: {sorted(options)}).")
    options -= {"num_classes"}
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


def head_path(head: str | Sequence[str] = HEAD) -> tuple[str, ...]:
    """``"head"`` -> ``("head",)``; ``"classifier/out"`` -> ``("classifier", "out")`` (the layer's path in params)."""
    parts = tuple(head.split("/")) if isinstance(head, str) else tuple(head)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"model.head: {head!r} must name a layer, e.g. 'head' or 'classifier/out'.")
    return parts


def find_head(params: Any, head: str | Sequence[str] = HEAD) -> Mapping[str, Any]:
    """The head layer's params (``{"kernel": [features, N], "bias": [N]}``).

    Raises:
      ValueError: naming ``model.head``: no such layer, or it has no 2-D ``kernel``.
    """
    path = head_path(head)
    node: Any = params
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(path[:i]) or "the top level"
            raise ValueError(
                f"model.head: the model has no layer {'/'.join(path)!r} ({where} has {_keys(node)}); name its "
                "classifier layer (a Dense with a 2-D kernel) in model.head."
            )
        node = node[key]
    if not isinstance(node, Mapping) or "kernel" not in node or len(getattr(node["kernel"], "shape", ())) != 2:
        raise ValueError(f"model.head: layer {'/'.join(path)!r} has no 2-D 'kernel'; it must be a Dense classifier.")
    return node


def _replace_at(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    child = _replace_at(tree[path[0]], path[1:], value)
    if isinstance(tree, FrozenDict):
        return tree.copy({path[0]: child})
    return {**tree, path[0]: child}


def fresh_head(
    params: Mapping[str, Any], key: jax.Array, num_classes: int, head: str | Sequence[str] = HEAD
) -> dict[str, Any]:
    """``params`` with a freshly initialised ``num_classes``-way head; every other layer is kept as is.

    The new head is what ``nn.Dense(num_classes)`` initialises (LeCun-normal kernel [features, num_classes], zero
    bias) in the old head's dtype. ``head`` is the layer's path (``"head"``, or nested as ``"classifier/out"``).
    Works under ``jit`` (``num_classes`` must be static).

    Raises:
      ValueError: ``params`` has no ``head`` with a 2-D ``kernel``, or ``num_classes`` is not a positive int.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: {num_classes!r} must be a positive int.")
    path = head_path(head)
    try:
        old = find_head(params, path)
    except ValueError:
        raise ValueError(
            f"params: no {'/'.join(path)!r} layer with a 2-D 'kernel' (top-level keys: {_keys(params)})."
        ) from None
    in_features, dtype = old["kernel"].shape[0], old["kernel"].dtype
    new = {"kernel": nn.linear.default_kernel_init(key, (in_features, num_classes), dtype)}
    if "bias" in old:
        new["bias"] = jnp.zeros((num_classes,), dtype)
    return _replace_at(params, path, new)


def head_mask(params: Any, head: str | Sequence[str] = HEAD) -> Any:
    """A pytree like ``params`` with True for the leaves under the ``head`` layer and False elsewhere.

    For head-only fine-tuning, e.g. ``optax.masked(tx, head_mask(params))``.

    Raises:
      ValueError: ``params`` has no ``head`` (the mask would freeze everything).
    """
    path = head_path(head)
    n = len(path)

    def under_head(keys: tuple[Any, ...], _: Any) -> bool:
        names = tuple(getattr(k, "key", None) for k in keys)
        return names[:n] == path

    mask = jax.tree_util.tree_map_with_path(under_head, params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"params: no {'/'.join(path)!r} layer to train (top-level keys: {_keys(params)}).")
    return mask


def _keys(params: Any) -> list[str]:
    return sorted(map(str, params)) if isinstance(params, Mapping) else []
