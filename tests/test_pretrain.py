"""Pretraining: a checkpoint reaches a stated accuracy, round-trips through storage, and helps fine-tuning."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from l3rs.meta.inner import InnerLoop, adam_optimizer_fn
from l3rs.meta.pretrain import load_variables, pretrain, random_variables
from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task
from l3rs.models import HEAD, create


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "digits")
    result = pretrain(dataset="sklearn_digits", model_name="small_cnn", steps=300, batch_size=64,
                      learning_rate=3e-3, seed=0, output=out, progress=False)  # fmt: skip
    return out, result


def test_pretrained_checkpoint_reaches_stated_accuracy(checkpoint):
    out, result = checkpoint
    # Digits 0-4 on held-out test images: a 300-step small CNN gets well above 90% (chance: 20%).
    assert result.meta["test_accuracy"] >= 0.9, result.meta
    meta = json.load(open(f"{out}/meta.json"))
    assert meta["pretrain_classes"] == [0, 1, 2, 3, 4] and meta["model"] == "small_cnn"
    assert meta["test_accuracy"] == result.meta["test_accuracy"]
    variables, loaded_meta = load_variables(out)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(result.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded_meta["sha256"] == meta["sha256"]


def test_corrupt_checkpoint_is_refused(checkpoint, tmp_path):
    import shutil

    out, _ = checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    blob = copy / "variables.msgpack"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_variables(str(copy))


def test_fine_tuning_from_theta0_beats_random_init(tmp_path):
    """Tasks on the held-out Fashion-MNIST classes 5-9: pretrained features transfer, so θ0 wins at equal K."""
    out = str(tmp_path / "fmnist")
    pretrain(dataset="fashion_mnist_debian", model_name="small_cnn", steps=300, batch_size=64, learning_rate=3e-3,
             seed=0, output=out, progress=False)  # fmt: skip
    dist = TaskDistribution("fashion_mnist_debian", "meta_test", num_classes=5, batch_size=64, eval_batch_size=256,
                            k_min=20, k_max=20)  # fmt: skip
    pool = load_task_pool(dist)
    module = create("small_cnn", num_classes=5)
    theta0, _ = load_variables(out)
    random = random_variables("small_cnn", (28, 28, 1), 5, seed=1)
    accs = {}
    for name, variables in (("theta0", theta0), ("random", random)):
        loop = InnerLoop(module, variables, pool, adam_optimizer_fn("constant"), num_classes=5)
        runs = [jax.device_get(loop.run_arrays(np.float32(3e-3), sample_task(s, dist, pool))) for s in range(3)]
        accs[name] = float(np.mean([r["accuracy"] for r in runs]))
    assert accs["theta0"] > accs["random"] + 0.05, accs


def test_narrow_theta0_pretrains_on_the_first_classes_of_the_split(tmp_path):
    out = str(tmp_path / "narrow")
    result = pretrain(dataset="sklearn_digits", model_name="small_cnn", steps=20, batch_size=32, learning_rate=3e-3,
                      seed=0, output=out, progress=False, num_classes=2)  # fmt: skip
    meta = json.load(open(f"{out}/meta.json"))
    assert meta["pretrain_classes"] == [0, 1] and meta["num_classes"] == 2
    # The head has one logit per class it was pretrained on.
    assert result.variables["params"][HEAD]["bias"].shape == (2,)
    with pytest.raises(ValueError, match="pretrain split has 5 classes"):
        pretrain(dataset="sklearn_digits", model_name="small_cnn", steps=1, batch_size=8, learning_rate=3e-3, seed=0,
                 progress=False, num_classes=6)  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "pretrain.num_classes: must be 0"), (2.5, "pretrain.num_classes: expected int"),
     (True, "pretrain.num_classes: expected int"), (6, "pretrain.num_classes: sklearn_digits's pretrain split has 5")],
)  # fmt: skip
def test_pretrain_num_classes_is_validated_by_the_config(value, message):
    from l3rs.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"dataset": "sklearn_digits"}, "pretrain": {"num_classes": value}})
