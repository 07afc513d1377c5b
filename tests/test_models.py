"""Models: im2col convolution == nn.Conv, registry, fresh heads and head masks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l3rs import models


@pytest.mark.parametrize(
    ("strides", "padding", "use_bias"),
    [((1, 1), "SAME", True), ((2, 2), "SAME", False), ((2, 1), "VALID", True), ((1, 1), ((1, 2), (0, 1)), True)],
)
def test_im2col_conv_matches_flax_conv(strides, padding, use_bias):
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 3))
    ref = nn.Conv(5, (3, 3), strides=strides, padding=padding, use_bias=use_bias)
    ours = models.Im2ColConv(5, (3, 3), strides=strides, padding=padding, use_bias=use_bias)
    variables = ref.init(jax.random.key(1), x)
    # Same parameter names, shapes and initialisation: a checkpoint of one runs in the other.
    ours_vars = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ours_vars)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)

    # Gradients agree as well (what the inner loop differentiates).
    def loss(mod, v):
        return jnp.sum(jnp.sin(mod.apply(v, x)))

    g_ref, g_ours = jax.grad(lambda v: loss(ref, v))(variables), jax.grad(lambda v: loss(ours, v))(variables)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_small_cnn_layers_and_fully_convolutional():
    module = models.create("small_cnn", num_classes=5)
    variables = models.init_variables(module, jax.random.key(0), (28, 28, 1))
    assert set(variables) == {"params"}
    params = variables["params"]
    assert params["head"]["kernel"].shape == (64, 5)
    # 3 kernels + 3 norm scales + 3 norm biases + head kernel + head bias = 11 L3RS layers.
    assert len(jax.tree.leaves(params)) == 11
    # Global average pooling: the same weights accept 16x16 digits.
    out = module.apply(variables, jnp.zeros((2, 16, 16, 1)), train=False)
    assert out.shape == (2, 5)


def test_resnet18_has_batch_stats_and_runs():
    module = models.create("resnet18", num_classes=7, small_inputs=True)
    variables = models.init_variables(module, jax.random.key(0), (16, 16, 3))
    assert "batch_stats" in variables
    logits, updates = module.apply(variables, jnp.ones((2, 16, 16, 3)), train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 7) and "batch_stats" in updates


def test_create_refuses_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        models.create("resnet5", num_classes=3)
    with pytest.raises(ValueError, match="unknown option"):
        models.create("small_cnn", num_classes=3, widht=4)


def test_fresh_head_replaces_only_the_head():
    module = models.create("small_cnn", num_classes=5)
    params = models.init_variables(module, jax.random.key(0), (28, 28, 1))["params"]
    new = models.fresh_head(params, jax.random.key(3), num_classes=3)
    assert new["head"]["kernel"].shape == (64, 3)
    np.testing.assert_array_equal(new["head"]["bias"], np.zeros(3))
    for name in params:
        if name != "head":
            for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name]), strict=True):
                np.testing.assert_array_equal(a, b)
    again = models.fresh_head(params, jax.random.key(3), num_classes=3)
    np.testing.assert_array_equal(new["head"]["kernel"], again["head"]["kernel"])  # seeded


def test_head_mask_marks_only_head_leaves():
    module = models.create("small_cnn", num_classes=5)
    params = models.init_variables(module, jax.random.key(0), (28, 28, 1))["params"]
    mask = models.head_mask(params)
    assert mask["head"] == {"kernel": True, "bias": True}
    assert sum(jax.tree.leaves(mask)) == 2
    with pytest.raises(ValueError, match="no 'head'"):
        models.head_mask({"conv0": {"kernel": jnp.zeros(3)}})
