"""ResNet-18/34 (He et al. 2016, BasicBlock) with BatchNorm, as in the paper's experiments (ResNet-34, §5).

Layout follows torchvision: a 7x7/2 stem conv (padding 3) + BatchNorm + ReLU + 3x3/2 max-pool (padding 1), four
stages of BasicBlocks (64, 128, 256, 512 channels; stride 2 at the start of stages 2-4, where a 1x1/2 conv +
BatchNorm projects the shortcut), global average pooling and the classifier ``head``. Convolutions have no bias.
With ``small_inputs`` the stem is a 3x3/1 conv without max-pool (CIFAR-style, for 32x32 or 64x64 images).

BatchNorm keeps running statistics in the ``batch_stats`` collection: ``train=True`` normalises with the batch's
statistics and updates them (``apply(..., mutable=["batch_stats"])``), ``train=False`` uses the running averages.

Parameter leaves (every kernel, bias, norm scale and norm bias is its own L3RS layer, paper §4.1): ResNet-34 has
36 conv kernels (stem, 32 in blocks, 3 projections), 36 BatchNorms x (scale, bias) and the head's kernel and bias:
110 leaves. The paper reports L = 111 for its ResNet-34; it does not list them, so the extra one is presumably a
bias our torchvision-style layout does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from l3rs.models.layers import ConvImpl, check_model_fields, conv_class

__all__ = ["BasicBlock", "ResNet", "ResNet18", "ResNet34"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; the shortcut is projected (1x1 conv + BatchNorm) when its shape changes."""

    features: int
    strides: int = 1
    conv: ConvImpl = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = partial(conv_class(self.conv), use_bias=False)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.features, (3, 3), strides=1, padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        if x.shape != y.shape:
            x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="proj_conv")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A BasicBlock ResNet. Use :class:`ResNet18` / :class:`ResNet34` for the standard depths.

    Attributes:
      num_classes: outputs of the head.
      stage_sizes: BasicBlocks per stage.
      width: channels of the first stage (doubled in every later stage).
      small_inputs: 3x3/1 stem without max-pool (for 32x32 / 64x64 images) instead of 7x7/2 + max-pool.
      conv: ``"lax"`` (``nn.Conv``, the default, for GPUs) or ``"im2col"`` (fast inside loops on CPU).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    small_inputs: bool = False
    conv: ConvImpl = "lax"

    def __post_init__(self) -> None:
        check_model_fields(self.num_classes, self.conv)
        if not self.stage_sizes or not all(isinstance(n, int) and n > 0 for n in self.stage_sizes):
            raise ValueError(f"stage_sizes: {self.stage_sizes!r} must be a non-empty sequence of positive ints.")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width: {self.width!r} must be a positive int.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits [N, num_classes] for NHWC float images ``x``; ``train`` selects batch vs running statistics."""
        conv = partial(conv_class(self.conv), use_bias=False)
        if self.small_inputs:
            x = conv(self.width, (3, 3), strides=1, padding=1, name="stem_conv")(x)
        else:
            x = conv(self.width, (7, 7), strides=2, padding=3, name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="stem_bn")(x)
        x = nn.relu(x)
        if not self.small_inputs:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                block = BasicBlock(self.width * 2**i, strides, self.conv, name=f"stage{i + 1}_block{j + 1}")
                x = block(x, train)
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(self.num_classes, name="head")(x)


class ResNet18(ResNet):
    """ResNet-18: BasicBlocks (2, 2, 2, 2)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)


class ResNet34(ResNet):
    """ResNet-34: BasicBlocks (3, 4, 6, 3); the paper's model (§5)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
