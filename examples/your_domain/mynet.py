"""A user's own model, defined outside the l3rs package: a small MLP classifier for 16x16 grey images.

What l3rs needs from a model (see the README's "Your model, your data"):

- a flax linen ``nn.Module`` class with a ``num_classes`` field (the width of the classifier);
- ``__call__(x, train)`` on NHWC float images in about [-1, 1], returning logits;
- a Dense classifier layer whose path in the params is ``[model] head`` (here ``"classifier"``): every fine-tuning
  task puts a fresh N-way layer there.

Its other fields (here ``hidden``) are set from ``[model.options]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class DigitsMLP(nn.Module):
    """Flatten, then Dense + LayerNorm + ReLU per hidden layer, then the classifier."""

    num_classes: int
    hidden: Sequence[int] = (64, 32)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no running statistics
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"dense{i}")(x)
            x = nn.relu(nn.LayerNorm(name=f"norm{i}")(x))
        return nn.Dense(self.num_classes, name="classifier")(x)
