"""Your model, your data: datasets by tfds name with class splits, models by import path, θ0 in any of three formats,
and the Python API. Every new config field is refused before any work starts, with the field named; the presets
resolve to exactly today's specs and models (the default demo's numbers cannot move)."""

from __future__ import annotations

import dataclasses
import itertools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import l3rs
from l3rs.config import Config, ConfigError, config_from_dict
from l3rs.data import SPECS
from l3rs.data.spec import resolve_spec

_counter = itertools.count()

USER_MODULE = """
import flax.linen as nn

class Net(nn.Module):
    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.width, name="body")(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, name="out")(x)

class NoNumClasses(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.width)(x.reshape((x.shape[0], -1)))

NOT_A_MODULE = 3
"""


@pytest.fixture
def user_module(tmp_path):
    """A user's model file in its own folder, under a fresh module name (no sys.modules clash between tests)."""
    name = f"usernet_{next(_counter)}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    return name, str(tmp_path / "models")


def digits(**model: object) -> dict:
    """A small config on the offline digits with a 3-way task and custom model fields."""
    return {
        "data": {"dataset": "sklearn_digits"},
        "model": {"checkpoint": "random", **model},
        "task": {"num_classes": 3, "k_min": 3, "k_max": 6, "batch_size": 8, "eval_batch_size": 16},
        "evaluate": {"k_grid": [4, 8]},
    }


def refused(raw: dict, field: str) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(field), str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------------------------------------
# presets are the same mechanism, and resolve to exactly today's objects
def test_every_preset_resolves_to_itself():
    for name, spec in SPECS.items():
        assert resolve_spec(name) is spec
        assert resolve_spec(name, preset=name) is spec
    cfg = Config().validate()
    assert cfg.data.spec() is SPECS["fashion_mnist_debian"]
    assert (
        config_from_dict({"data": {"preset": "sklearn_digits", "dataset": "sklearn_digits"}}).data.spec()
        is (SPECS["sklearn_digits"])
    )


def test_default_model_and_head_are_todays():
    from l3rs.meta.runner import model_for
    from l3rs.models import SmallCNN, fresh_head, head_mask

    cfg = Config().validate()
    assert model_for(cfg) == SmallCNN(num_classes=5)
    shapes = jax.eval_shape(lambda: {"head": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)},
                                     "conv0": {"kernel": jnp.zeros((9, 16))}})  # fmt: skip
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
    new = fresh_head(params, jax.random.key(3), 5)
    import flax.linen as nn

    np.testing.assert_array_equal(new["head"]["kernel"], nn.linear.default_kernel_init(jax.random.key(3), (64, 5)))
    np.testing.assert_array_equal(new["head"]["bias"], np.zeros(5))
    np.testing.assert_array_equal(new["conv0"]["kernel"], params["conv0"]["kernel"])
    assert jax.tree.leaves(head_mask(new)) == [False, True, True]


# ------------------------------------------------------------------------------------------------------------------
# datasets: class splits as ranges, lists, fractions, "rest"; DatasetInfo defaults
def test_class_splits_ranges_lists_fractions_rest():
    spec = resolve_spec("sklearn_digits", classes={"pretrain": "0:4", "meta_train": [4, "5:7"], "meta_test": "rest"})
    assert (spec.pretrain_classes, spec.meta_train_classes, spec.meta_test_classes) == (
        (0, 1, 2, 3), (4, 5, 6), (7, 8, 9))  # fmt: skip
    assert dataclasses.replace(spec, pretrain_classes=(0, 1, 2, 3)) == spec and spec.image_shape == (16, 16, 1)
    frac = resolve_spec("sklearn_digits", classes={"pretrain": 0.4, "meta_train": 0.3, "meta_test": 0.3})
    assert (frac.pretrain_classes, frac.meta_train_classes, frac.meta_test_classes) == (
        (0, 1, 2, 3), (4, 5, 6), (7, 8, 9))  # fmt: skip
    # Fractions fill around explicit splits; the preset's splits stay where not overridden.
    mixed = resolve_spec("sklearn_digits", classes={"meta_test": [0, 1], "pretrain": 0.5, "meta_train": "rest"})
    assert mixed.pretrain_classes == (2, 3, 4, 5, 6) and mixed.meta_train_classes == (7, 8, 9)
    shared = resolve_spec("sklearn_digits", classes={"meta_train": "5:10", "meta_test": "5:10"}, allow_overlap=True)
    assert shared.meta_train_classes == shared.meta_test_classes == (5, 6, 7, 8, 9)


def test_dataset_info_gives_the_defaults_without_a_preset():
    spec = resolve_spec("sklearn_digits", preset="none")
    assert spec.num_classes == 10 and spec.image_shape == (16, 16, 1)  # label and image features
    assert (spec.train_split, spec.valid_split, spec.test_split) == ("train", "validation", "test")
    assert spec.pretrain_classes == (0, 1, 2, 3, 4) and spec.meta_train_classes == (5, 6)
    assert spec.meta_test_classes == (7, 8, 9) and spec.offline
    sized = resolve_spec("sklearn_digits", preset="none", image_size=[8, 8, 3], test_split="validation[:50%]")
    assert sized.image_shape == (8, 8, 3) and sized.test_split == "validation[:50%]"


def test_custom_split_images_load_resized():
    from l3rs.data import load

    spec = resolve_spec("sklearn_digits", classes={"pretrain": [0], "meta_train": [1], "meta_test": [2]},
                        image_size=[8, 8])  # fmt: skip
    split = load(spec, spec.test_split, classes=spec.meta_test_classes)
    assert split.images.shape[1:] == (8, 8, 1) and set(split.labels.tolist()) == {2}


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"classes": {"pretrain": "0:6"}}, "data.classes.pretrain", "also in the meta_train split"),
        ({"classes": {"meta_test": [8, 12]}}, "data.classes.meta_test", "no classes [12]"),
        ({"classes": {"meta_train": "7:14"}}, "data.classes.meta_train", "no classes [10, 11, 12, 13]"),
        ({"classes": {"pretrain": [1, 1]}}, "data.classes.pretrain", "more than once"),
        ({"classes": {"pretrain": 1.5}}, "data.classes.pretrain", "(0, 1]"),
        ({"classes": {"pretrain": "a:b"}}, "data.classes.pretrain", "range"),
        ({"classes": {"pretraining": [0]}}, "data.classes.pretraining", "unknown class split"),
        ({"classes": {"pretrain": 0.6, "meta_train": 0.5, "meta_test": "rest"}}, "data.classes.meta_train", "left"),
        ({"classes": "0:5"}, "data.classes", "table"),
        ({"preset": "cifar10_typo"}, "data.preset", "unknown preset"),
        ({"dataset": "no_such_dataset_xyz"}, "data.dataset", "neither a preset"),
        ({"image_size": [16]}, "data.image_size", "[height, width]"),
        ({"image_size": "16x16"}, "data.image_size", "[height, width]"),
        ({"train_split": "train[:"}, "data.train_split", "name[start:stop]"),
        ({"preset": "none", "valid_split": "holdout"}, "data.valid_split", "no split 'holdout'"),
        ({"allow_overlap": "yes"}, "data.allow_overlap", "bool"),
    ],
)
def test_bad_data_fields_are_named(data, field, words):
    raw = digits()
    raw["data"].update(data)
    assert words in refused(raw, field)


def test_task_way_is_checked_against_the_custom_split():
    raw = digits()
    raw["data"]["classes"] = {"meta_train": [5, 6], "meta_test": [7, 8, 9], "pretrain": "0:5"}
    assert "meta_train_classes has (2)" in refused(raw, "task.num_classes")


# ------------------------------------------------------------------------------------------------------------------
# models by import path
def test_user_model_by_import_path(user_module):
    from l3rs.meta.runner import model_for, model_shapes

    name, folder = user_module
    cfg = config_from_dict(digits(name=f"{name}:Net", module_path=folder, head="out", options={"width": 8}))
    module = model_for(cfg)
    assert type(module).__name__ == "Net" and module.width == 8 and module.num_classes == 3
    params = model_shapes(cfg)["params"]
    assert params["body"]["kernel"].shape == (256, 8) and params["out"]["kernel"].shape == (8, 3)


@pytest.mark.parametrize(
    ("model", "field", "words"),
    [
        ({"name": "no_such_pkg_xyz.nets:Net"}, "model.name", "cannot import 'no_such_pkg_xyz.nets'"),
        ({"name": "{mod}:Missing"}, "model.name", "no attribute 'Missing'"),
        ({"name": "{mod}:NOT_A_MODULE"}, "model.name", "not a flax linen Module"),
        ({"name": "{mod}:NoNumClasses"}, "model.name", "no num_classes"),
        ({"name": "{mod}:Net"}, "model.head", "no layer 'head'"),
        ({"name": "{mod}:Net", "head": "body"}, "model.head", "16 outputs, not num_classes = 3"),
        ({"name": "{mod}:Net", "head": "out/inner"}, "model.head", "no layer 'out/inner'"),
        ({"name": "{mod}:Net", "head": ""}, "model.head", "must name a layer"),
        ({"name": "{mod}:Net", "head": "out", "options": {"depth": 3}}, "model.options.depth", "no such field"),
        ({"name": "{mod}:Net", "head": "out", "options": {"width": "wide"}}, "model.name", "fails on (16, 16, 1)"),
        ({"name": "{mod}:Net", "module_path": "/no/such/folder"}, "model.module_path", "not a folder"),
        ({"options": {"features": [8]}, "head": "classifier"}, "model.head", "no layer 'classifier'"),
        ({"options": {"featurez": [8]}}, "model.options.featurez", "no such field"),
    ],
)
def test_bad_model_fields_are_named(user_module, model, field, words):
    name, folder = user_module
    model = {k: v.format(mod=name) if isinstance(v, str) else v for k, v in model.items()}
    model.setdefault("module_path", folder)
    assert words in refused(digits(**model), field)


def test_nnx_module_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "nnxnet_mod.py").write_text("from flax import nnx\nclass N(nnx.Module):\n    pass\n")
    msg = refused(digits(name="nnxnet_mod:N", module_path=str(tmp_path)), "model.name")
    assert "NNX" in msg and "to_linen" in msg


# ------------------------------------------------------------------------------------------------------------------
# θ0: pretrain folder, flax msgpack, Orbax; shapes checked, the first differing path named
def _user_cfg(user_module, checkpoint: str, width: int = 8) -> Config:
    name, folder = user_module
    return config_from_dict(
        digits(name=f"{name}:Net", module_path=folder, head="out", options={"width": width}, checkpoint=checkpoint)
    )


def _theta0(width: int, out: int = 4) -> dict:
    rng = np.random.default_rng(0)

    def dense(fan_in: int, fan_out: int) -> dict:
        return {"kernel": rng.normal(size=(fan_in, fan_out)).astype(np.float32), "bias": np.zeros(fan_out, np.float32)}

    return {"body": dense(256, width), "out": dense(width, out)}


def test_theta0_from_flax_msgpack_and_orbax(user_module, tmp_path):
    import orbax.checkpoint as ocp

    from l3rs.meta.runner import load_theta0

    params = _theta0(8)
    (tmp_path / "theta0.msgpack").write_bytes(serialization.msgpack_serialize(params))
    got, meta = load_theta0(_user_cfg(user_module, str(tmp_path / "theta0.msgpack")))
    assert meta["format"] == "flax-msgpack"
    np.testing.assert_array_equal(got["params"]["body"]["kernel"], params["body"]["kernel"])

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(tmp_path / "orbax"), {"params": params})  # variables, not only params: both are accepted
    ckpt.wait_until_finished()
    got, meta = load_theta0(_user_cfg(user_module, str(tmp_path / "orbax")))
    assert meta["format"] == "orbax"
    np.testing.assert_array_equal(got["params"]["out"]["kernel"], params["out"]["kernel"])


def test_theta0_whose_shapes_differ_is_refused_before_any_work(user_module, tmp_path):
    import ray

    path = tmp_path / "theta0.msgpack"
    path.write_bytes(serialization.msgpack_serialize(_theta0(12)))  # the config asks for width 8
    cfg = _user_cfg(user_module, str(path)).replace(run={"storage": str(tmp_path / "runs")})
    was_running = ray.is_initialized()
    differ = r"^model\.checkpoint: .*params/body/bias has shape \(12,\) in the checkpoint, \(8,\) in the model"
    with pytest.raises(ConfigError, match=differ):
        l3rs.train(cfg)
    assert ray.is_initialized() == was_running  # refused before Ray started
    assert not (tmp_path / "runs").exists()
    lacking = tmp_path / "lacking.msgpack"
    lacking.write_bytes(serialization.msgpack_serialize({"out": _theta0(8)["out"]}))
    with pytest.raises(ConfigError, match=r"^model\.checkpoint: .*lacks params/body/bias"):
        l3rs.train(_user_cfg(user_module, str(lacking)))
    with pytest.raises(ConfigError, match=r"^model\.checkpoint: no θ0 at"):
        l3rs.train(_user_cfg(user_module, str(tmp_path / "nothing_here")))
    garbled = tmp_path / "garbled.msgpack"
    garbled.write_bytes(b"\x00not msgpack")
    with pytest.raises(ConfigError, match=r"^model\.checkpoint: .*not a readable flax-msgpack"):
        l3rs.train(_user_cfg(user_module, str(garbled)))


# ------------------------------------------------------------------------------------------------------------------
# Config from Python
def test_config_from_toml_and_replace(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "sklearn_digits"\n[data.classes]\npretrain = "0:4"\nmeta_train = [4, 5, 6]\n'
                    'meta_test = "rest"\n[task]\nnum_classes = 3\n')  # fmt: skip
    cfg = Config.from_toml(path)
    assert cfg.data.spec().meta_test_classes == (7, 8, 9)
    new = cfg.replace({"task.k_max": 50, "data.classes.meta_test": [8, 9, 7]}, nes={"generations": 3})
    assert new.task.k_max == 50 and new.nes.generations == 3 and new.task.num_classes == 3
    assert new.data.classes == {"pretrain": "0:4", "meta_train": [4, 5, 6], "meta_test": [8, 9, 7]}
    assert cfg.task.k_max == 100  # a copy
    assert cfg.replace(task={"k_max": 50}) == cfg.replace(**{"task.k_max": 50})
    with pytest.raises(ConfigError, match=r"^task\.k_maxx"):
        cfg.replace({"task.k_maxx": 5})
    with pytest.raises(ConfigError, match=r"^\[tsk\]"):
        cfg.replace({"tsk.k_max": 5})
    with pytest.raises(ConfigError, match=r"^data\.classes\.meta_test"):
        cfg.replace({"data.classes.meta_test": [6, 7]})


def test_python_api_pretrain_and_evaluate(user_module, tmp_path):
    """l3rs.pretrain → l3rs.evaluate from Python, on a user's model with a custom split (ψ₀ and Adam rows: no ψ)."""
    name, folder = user_module
    raw = digits(name=f"{name}:Net", module_path=folder, head="out", checkpoint=str(tmp_path / "theta0"))
    raw["data"]["classes"] = {"pretrain": [0, 1, 2, 3], "meta_train": "4:7", "meta_test": "rest"}
    raw["pretrain"] = {"steps": 5, "batch_size": 16, "output": str(tmp_path / "theta0")}
    raw["evaluate"] = {"k_grid": [4, 8], "adam_lrs": [1e-2], "head_only_baselines": False, "settings": ["A"]}
    raw["run"] = {"storage": str(tmp_path / "runs")}
    cfg = l3rs.Config.from_dict(raw)
    pre = l3rs.pretrain(cfg, progress=False)
    assert pre.meta["pretrain_classes"] == [0, 1, 2, 3] and pre.variables["params"]["out"]["kernel"].shape == (16, 4)
    res = l3rs.evaluate(cfg, psi=[], tasks=1, workers=1, progress=False)
    assert res.out == str(tmp_path / "runs" / cfg.run.name / "evaluation")
    assert (tmp_path / "runs" / cfg.run.name / "evaluation" / "report.json").is_file()
    acc = res.accuracy("A")
    assert {"L3RS ψ₀", "Adam (cosine), 1e-2", "Adam (const), 1e-2"} <= set(acc), sorted(acc)
    assert all(set(per_k) == {4, 8} for per_k in acc.values())
    assert {r["setting"] for r in res.rows} == {"A"} and "K" in res.summary
    with pytest.raises(ValueError, match=r"^psi: no ψ artifact"):
        l3rs.evaluate(cfg, psi=str(tmp_path / "none"))


def test_dotted_keys_inside_a_section_reach_nested_tables():
    """``l3rs ... --set data.classes.meta_test=[7, 8, 9]`` arrives as {"data": {"classes.meta_test": [...]}}."""
    raw = digits()
    raw["data"].update({"classes": {"pretrain": "0:4"}, "classes.meta_train": [4, 5, 6], "classes.meta_test": "rest"})
    spec = config_from_dict(raw).data.spec()
    assert (spec.pretrain_classes, spec.meta_train_classes, spec.meta_test_classes) == (
        (0, 1, 2, 3),
        (4, 5, 6),
        (7, 8, 9),
    )
    raw["data"]["classes.meta_test"] = [6, 7]
    refused(raw, "data.classes.meta_test")
