"""SmallCNN: the CPU model of the embedded default (Fashion-MNIST-sized inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from l3rs.models.layers import ConvImpl, check_model_fields, conv_class

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three stride-2 3x3 convolutions (16-32-64), each followed by a normalization with scale and bias and ReLU,
    then global average pooling and the classifier ``head``.

    The normalization has no running statistics, so the variables are ``{"params"}`` only and ``train`` changes
    nothing. Every kernel, norm scale and norm bias is its own L3RS layer (paper §4.1); the convolutions carry no
    bias of their own (the norm's bias follows them).

    Attributes:
      num_classes: outputs of the head.
      features: channels of the convolutions.
      norm: ``"layer"`` (LayerNorm over H, W, C of each image, one scale and bias per channel) or ``"group"``
        (GroupNorm, 8 channels per group).
      pool: ``"avg"`` (global average pooling) or ``"flatten"``.
      conv: ``"im2col"`` (fast inside a jitted loop on CPU, the default) or ``"lax"`` (``nn.Conv``).
    """

    num_classes: int
    features: Sequence[int] = (16, 32, 64)
    norm: Literal["layer", "group"] = "layer"
    pool: Literal["avg", "flatten"] = "avg"
    conv: ConvImpl = "im2col"

    def __post_init__(self) -> None:
        check_model_fields(self.num_classes, self.conv)
        if not self.features or not all(isinstance(f, int) and f > 0 for f in self.features):
            raise ValueError(f"features: {self.features!r} must be a non-empty sequence of positive ints.")
        if self.norm not in ("layer", "group"):
            raise ValueError(f"norm: {self.norm!r} must be 'layer' or 'group'.")
        if self.pool not in ("avg", "flatten"):
            raise ValueError(f"pool: {self.pool!r} must be 'avg' or 'flatten'.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits [N, num_classes] for NHWC float images ``x``. ``train`` is accepted for a uniform signature."""
        del train  # no dropout, no running statistics
        conv = conv_class(self.conv)
        for i, f in enumerate(self.features):
            x = conv(f, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name=f"conv{i}")(x)
            x = _norm(self.norm, f, f"norm{i}")(x)
            x = nn.relu(x)
        if self.pool == "avg":
            x = jnp.mean(x, axis=(-3, -2))
        else:
            x = x.reshape((*x.shape[:-3], -1))
        return nn.Dense(self.num_classes, name="head")(x)


def _norm(kind: str, features: int, name: str) -> nn.Module:
    if kind == "layer":
        # Statistics over the whole feature map of one image; scale and bias per channel.
        return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1, name=name)
    return nn.GroupNorm(num_groups=None, group_size=min(8, features), name=name)
