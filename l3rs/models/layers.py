"""Layers shared by the models: a 2-D convolution written as im2col, and the conv-implementation switch.

Why im2col: on XLA:CPU a ``lax.conv_general_dilated`` inside ``lax.scan``/``while_loop``/``fori_loop`` (our inner
loop: K fine-tuning steps in one jitted ``fori_loop`` with a traced K) runs 8-16x slower than the same step called
from Python, because the backward convolutions fall off the CPU fast path (jax-ml/jax#12868). Written as pad,
``kh*kw`` strided slices and one matmul, the convolution and its gradients are plain slices, pads and dots, which
stay fast inside the loop. ``benchmarks/inner_loop.py`` measures both.

:class:`Im2ColConv` has the constructor surface of the subset of :class:`flax.linen.Conv` we use and EXACTLY its
parameter names, shapes and initialisers (``kernel`` [kh, kw, cin, cout], ``bias`` [cout]), so a checkpoint trained
with one runs in the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

__all__ = ["CONV_IMPLS", "ConvImpl", "Im2ColConv", "check_model_fields", "conv_class", "im2col"]

ConvImpl = Literal["im2col", "lax"]
CONV_IMPLS: tuple[str, ...] = ("im2col", "lax")

Padding = str | int | Sequence[int | tuple[int, int]]


def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{field}: {value!r} must be an int or a pair of ints.")
    return value  # type: ignore[return-value]


def _explicit_pads(
    padding: Padding, spatial: tuple[int, int], window: tuple[int, int], strides: tuple[int, int]
) -> list[tuple[int, int]]:
    """``padding`` as two (low, high) pairs, with nn.Conv's conventions (``lax.padtype_to_pads`` for strings)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding: {padding!r} is not supported by Im2ColConv; use 'SAME', 'VALID' or ints.")
        return [tuple(p) for p in lax.padtype_to_pads(spatial, window, strides, padding.upper())]
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    if isinstance(padding, Sequence) and len(padding) == 2:
        pads = []
        for p in padding:
            if isinstance(p, int):
                pads.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2 and all(isinstance(v, int) for v in p):
                pads.append((p[0], p[1]))
        if len(pads) == 2:
            return pads
    raise ValueError(f"padding: {padding!r} must be 'SAME', 'VALID', an int, or 2 ints / (low, high) pairs.")


def im2col(
    x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int], pads: Sequence[tuple[int, int]]
) -> jax.Array:
    """Patches of an NHWC batch: [N, H, W, C] -> [N, Ho, Wo, kh*kw*C], ordered (i, j, c) like a conv kernel.

    ``patches @ kernel.reshape(kh*kw*C, cout)`` equals ``lax.conv_general_dilated`` with the same strides and
    padding. Padding may be negative (cropping), as in ``lax.conv_general_dilated``.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    n, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input: padded spatial shape {(hp, wp)} is smaller than the kernel {(kh, kw)}.")
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x
    cols = [
        lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


class Im2ColConv(nn.Module):
    """2-D convolution as im2col + one matmul; a drop-in for the :class:`flax.linen.Conv` subset we use.

    Inputs are channels-last ``[..., H, W, C]`` (any number of leading batch axes, or none). Parameters are those
    of ``nn.Conv(features, kernel_size, ...)``: ``kernel`` [kh, kw, C, features] and, if ``use_bias``, ``bias``
    [features], with the same default initialisers (LeCun normal, zeros).

    Attributes:
      features: number of output channels.
      kernel_size: (kh, kw). A bare int is refused: for ``nn.Conv`` it means a 1-D kernel.
      strides: an int or (sh, sw).
      padding: ``"SAME"``, ``"VALID"``, an int (both sides, both axes), or two ints / (low, high) pairs.
      use_bias: add a per-channel bias.
      dtype: the computation dtype (default: promoted from inputs and params).
      param_dtype: the parameters' dtype.
      precision: ``lax.Precision`` of the matmul.
      kernel_init: kernel initialiser (shape [kh, kw, C, features]).
      bias_init: bias initialiser.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if isinstance(self.kernel_size, int):
            raise ValueError(f"kernel_size: {self.kernel_size!r} is an int (a 1-D kernel for nn.Conv); pass (kh, kw).")
        kernel_size = _pair(self.kernel_size, "kernel_size")
        strides = _pair(self.strides, "strides")
        if inputs.ndim < 3:
            raise ValueError(f"inputs: shape {inputs.shape} is not [..., H, W, C].")
        batch_shape = inputs.shape[:-3]
        x = inputs.reshape((-1, *inputs.shape[-3:]))
        cin = x.shape[-1]
        pads = _explicit_pads(self.padding, x.shape[1:3], kernel_size, strides)

        kernel = self.param("kernel", self.kernel_init, (*kernel_size, cin, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)

        patches = im2col(x, kernel_size, strides, pads)
        y = lax.dot_general(
            patches,
            kernel.reshape(-1, self.features),
            (((patches.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
        )
        if bias is not None:
            y = y + bias
        return y.reshape((*batch_shape, *y.shape[1:]))


def conv_class(impl: str) -> type[nn.Module]:
    """The convolution module for ``impl``: ``"im2col"`` (:class:`Im2ColConv`, fast in loops on CPU) or
    ``"lax"`` (:class:`flax.linen.Conv`, the usual choice on GPUs)."""
    if impl == "im2col":
        return Im2ColConv
    if impl == "lax":
        return nn.Conv
    raise ValueError(f"conv: {impl!r} must be one of {CONV_IMPLS}.")


def check_model_fields(num_classes: int, conv: str) -> None:
    """Validation shared by the models' constructors: a clear ValueError naming the field."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: {num_classes!r} must be a positive int.")
    if conv not in CONV_IMPLS:
        raise ValueError(f"conv: {conv!r} must be one of {CONV_IMPLS}.")
