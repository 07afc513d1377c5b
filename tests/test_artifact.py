"""The ψ artifact: self-describing, checksummed, loads as a ready optax optimizer, refuses the wrong model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import l3rs
from l3rs import models
from l3rs.artifact import save_artifact, verify_artifact


@pytest.fixture(scope="module")
def model():
    module = models.create("small_cnn", num_classes=5)
    params = models.init_variables(module, jax.random.key(0), (28, 28, 1))["params"]
    return module, params


def test_round_trip_and_use_as_optax_optimizer(model, tmp_path):
    module, params = model
    config = l3rs.L3RSConfig(directions=("adam", "sgd", "lion"))
    psi = l3rs.init_psi(config, params, jax.random.key(1))
    psi = jax.tree.map(lambda x: x + 0.01, psi)  # something that is not ψ₀
    meta = save_artifact(str(tmp_path / "psi"), psi, config, {"model": "small_cnn", "k_range": [10, 100]})
    assert verify_artifact(str(tmp_path / "psi"))["sha256"] == meta["sha256"]
    on_disk = json.loads((tmp_path / "psi" / "metadata.json").read_text())
    assert on_disk["layer_paths"] == list(psi.layer_paths) and on_disk["optimizer"]["directions"] == [
        "adam",
        "sgd",
        "lion",
    ]

    loaded, cfg2, _ = l3rs.load_psi(str(tmp_path / "psi"))
    assert cfg2 == config
    for a, b in zip(jax.tree.leaves(psi), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)

    tx = l3rs.load(str(tmp_path / "psi"), total_steps=20, params=params)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    x = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
    y = jnp.arange(8) % 5

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, x), y).mean()

    @jax.jit
    def step(p, state):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(g, state, p, value=loss)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p = params
    first = float(loss_fn(p))
    for _ in range(20):
        p, state = step(p, state)
    assert float(loss_fn(p)) < first


def test_wrong_model_and_corruption_are_refused(model, tmp_path):
    _, params = model
    config = l3rs.L3RSConfig()
    save_artifact(
        str(tmp_path / "psi"), l3rs.init_psi(config, params, jax.random.key(0)), config, {"model": "small_cnn"}
    )
    deeper = models.create("small_cnn", num_classes=5, features=(8, 16, 32, 64))  # has conv3/norm3 too
    other = models.init_variables(deeper, jax.random.key(0), (28, 28, 1))["params"]
    with pytest.raises(ValueError, match="layers do not match"):
        l3rs.load(str(tmp_path / "psi"), total_steps=10, params=other)
    blob = tmp_path / "psi" / "psi.msgpack"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x55
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        l3rs.load(str(tmp_path / "psi"), total_steps=10)
    with pytest.raises(ValueError, match="artifact folder"):
        l3rs.load(str(tmp_path / "nothing-here"), total_steps=10)


def test_artifact_written_before_families_still_loads(model, tmp_path):
    """tests/data/psi_v0_fmnist (the Fashion-MNIST demo's ψ of the first release) was written before learned-optimizer
    families and the stability options: its optimizer dict has neither a "family" key nor the issue-11 fields. It
    must still load as L3RS with those fields at their original behaviour (whatever today's defaults are), and give
    finite updates on the model it was meta-trained for."""
    import pathlib
    import shutil

    from l3rs.optim.config import LEGACY_VALUES

    src = pathlib.Path(__file__).resolve().parent / "data" / "psi_v0_fmnist"
    recorded = json.loads((src / "metadata.json").read_text())["optimizer"]
    assert "family" not in recorded and not set(LEGACY_VALUES) & set(recorded)
    shutil.copytree(src, tmp_path / "psi")
    _, params = model
    psi, config, _ = l3rs.load_psi(str(tmp_path / "psi"))
    assert isinstance(config, l3rs.L3RSConfig) and config.to_dict()["family"] == "l3rs"
    assert {k: getattr(config, k) for k in LEGACY_VALUES} == LEGACY_VALUES
    assert l3rs.L3RSConfig.from_dict(recorded).lambda_max_adam_ratio == l3rs.L3RSConfig().lambda_max_adam_ratio
    tx = l3rs.load(str(tmp_path / "psi"), total_steps=50, params=params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params, value=jnp.float32(1.0))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
