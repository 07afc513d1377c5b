"""The paper's cluster configs, end to end at toy size on CPU (issue 14, part 2).

``jobs/configs/imagenet_resnet34.toml``, ``places_resnet34_pretrain.toml`` (whose θ0 the ImageNet config's settings C
and D consume, and whose own evaluation runs the ImageNet-trained ψ on Places tasks) and ``cifar100_resnet18.toml``
are loaded as shipped and shrunk with ``Config.replace`` to toy size, keeping their model (the real ResNet-34 /
ResNet-18 of ``l3rs.models``, at 16x16 inputs), dataset, optimizer, NES settings but the sizes, and the worker
resources (``{GPU = 1}``: the training worker runs on a node with a logical GPU of the session's real local Ray cluster).
Each goes prepare → pretrain → ``l3rs.train`` (2 generations) → ``l3rs.evaluate`` (2 tasks, a 2-point K grid, one Adam
learning rate) through :mod:`l3rs.api`, the functions the CLI calls.

The data: toy copies of the official tfds datasets, prepared by the official builders from fake source files
(``tests/_mock_tfds.py`` says exactly which code is real), and read back through the official builders as the
workers read them on a cluster.

Compile time on XLA:CPU dominates (a ResNet-34 inner loop with L3RS over its 110 layers: ~35 s to compile for
``train_scope = "all"``, ~7 s for ``"head"``), so the toy configs fine-tune the head only, and the test process
keeps a persistent compilation cache for the module: the ImageNet and Places toy splits have the same shapes, so
Places' pretraining and evaluation programs are the ImageNet ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import l3rs
from l3rs.config import Config, load_config
import _mock_tfds as mock

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "jobs" / "configs"
K_GRID = [1, 3]


@pytest.fixture(scope="module")
def mock_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, mock.ToyClasses]]:
    """The three datasets, prepared once for the module: (data_dir, toy class split per dataset)."""
    root = tmp_path_factory.mktemp("paper-data")
    classes = mock.prepare_all(root / "tensorflow_datasets", root / "sources")
    return str(root / "tensorflow_datasets"), classes


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A persistent JAX compilation cache for this module's in-process work (pretraining, evaluation)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def gpu_node(ray_connected: Any) -> Iterator[Any]:
    """A node with one logical GPU: the configs' workers ask for ``{GPU = 1}``."""
    node = ray_connected.add_node(num_cpus=1, num_gpus=1)
    try:
        yield ray_connected
    finally:
        if node in ray_connected.nodes:
            ray_connected.remove_node(node)


def toy(config: str, data_dir: str, classes: mock.ToyClasses, runs: Path, **changes: Any) -> Config:
    """The shipped config ``config``, shrunk to toy size; its paths under ``runs``."""
    cfg = load_config(CONFIGS / config)
    name = cfg.run.name
    base = {
        "run.storage": str(runs),
        "run.checkpoint_every": 1,
        "data.data_dir": data_dir,
        "data.classes": classes.config(),
        "data.image_size": [16, 16],
        "model.checkpoint": str(runs / f"pretrain-{name}"),
        "pretrain.output": str(runs / f"pretrain-{name}"),
        "pretrain.steps": 3,
        "pretrain.batch_size": 4,
        "task.num_classes": 2,
        "task.batch_size": 2,
        "task.eval_batch_size": 4,
        "task.k_min": 1,
        "task.k_max": 2,
        "task.train_scope": "head",
        "nes.population_size": 2,
        "nes.meta_batch_size": 1,
        "nes.generations": 2,
        "evaluate.tasks": 2,
        "evaluate.k_grid": K_GRID,
        "evaluate.adam_lrs": [1e-3],
        "evaluate.head_only_baselines": False,
        "evaluate.workers": 1,
    }
    return cfg.replace({**base, **changes})


def check_pretrain(result: Any, cfg: Config) -> None:
    meta = result.meta
    assert meta["model"] == cfg.model.name and meta["dataset"] == cfg.data.dataset
    assert meta["pretrain_classes"] == list(cfg.data.spec().pretrain_classes)
    assert meta["input_shape"] == [16, 16, 3] and math.isfinite(meta["final_train_loss"])
    assert (Path(cfg.pretrain.output) / "meta.json").is_file()


def check_run(run: Any, cfg: Config) -> None:
    assert run.generations == 2 and len(run.history) == 2
    for row in run.history:
        assert np.isfinite(row["fitness_mean"]) if "fitness_mean" in row else True
    artifact = json.loads((Path(run.psi_uri) / "metadata.json").read_text())
    text = json.dumps(artifact)
    assert cfg.data.dataset in text and cfg.model.name in text


def check_report(res: Any, settings: str, datasets: dict[str, str]) -> None:
    report = res.report
    assert sorted(report["settings"]) == sorted(settings)
    for name, setting in report["settings"].items():
        rows = setting["rows"]
        optimizers = {r["optimizer"] for r in rows}
        assert {"L3RS", "L3RS ψ₀"} <= optimizers and any(o.startswith("Adam (cosine)") for o in optimizers)
        assert sorted({int(r["K"]) for r in rows}) == K_GRID
        for r in rows:
            assert 0.0 <= r["mean_acc"] <= 1.0, r
        assert datasets[name] in json.dumps(setting)
    assert (Path(res.out) / "report.md").is_file()


@pytest.fixture(scope="module")
def imagenet(mock_data: Any, compile_cache: None, gpu_node: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The ImageNet toy config pretrained and meta-trained (2 generations on the Ray cluster); Places' θ0 as its
    ``evaluate.other_checkpoint``."""
    data_dir, classes = mock_data
    runs = tmp_path_factory.mktemp("paper-runs")
    places = toy("places_resnet34_pretrain.toml", data_dir, classes[mock.PLACES], runs,
                 **{"evaluate.other_checkpoint": str(runs / "pretrain-imagenet-resnet34")})  # fmt: skip
    cfg = toy("imagenet_resnet34.toml", data_dir, classes[mock.IMAGENET], runs,
              **{"evaluate.other_checkpoint": places.model.checkpoint})  # fmt: skip
    pre = l3rs.pretrain(cfg, progress=False)
    run = l3rs.train(cfg, progress=False)
    return cfg, places, pre, run


def test_imagenet_resnet34_end_to_end(imagenet: Any) -> None:
    cfg, _, pre, run = imagenet
    assert cfg.model.name == "resnet34" and cfg.workers.resources == {"GPU": 1}
    check_pretrain(pre, cfg)
    check_run(run, cfg)
    res = l3rs.evaluate(cfg, psi=run.psi_uri, settings="A", progress=False)
    check_report(res, "A", {"A": "imagenet2012"})


def test_places_resnet34_checkpoint_feeds_the_imagenet_evaluation(imagenet: Any) -> None:
    cfg, places, _, run = imagenet
    pre = l3rs.pretrain(places, progress=False)
    check_pretrain(pre, places)
    # The consumer of the Places θ0: the ImageNet config's setting C (ImageNet tasks from the Places checkpoint).
    res = l3rs.evaluate(cfg, psi=run.psi_uri, settings="C", progress=False)
    check_report(res, "C", {"C": "imagenet2012"})
    # And the Places config's own evaluation: the ImageNet-trained ψ on Places tasks from the Places θ0.
    res = l3rs.evaluate(places, psi=run.psi_uri, settings="A", progress=False)
    check_report(res, "A", {"A": "places365_small"})


def test_cifar100_resnet18_end_to_end(mock_data: Any, compile_cache: None, gpu_node: Any, tmp_path: Path) -> None:
    data_dir, classes = mock_data
    cfg = toy("cifar100_resnet18.toml", data_dir, classes[mock.CIFAR100], tmp_path,
              **{"data.train_split": "train[:75%]", "data.valid_split": "train[75%:]"})  # fmt: skip
    assert cfg.model.name == "resnet18" and cfg.workers.resources == {"GPU": 1}
    check_pretrain(l3rs.pretrain(cfg, progress=False), cfg)
    run = l3rs.train(cfg, progress=False)
    check_run(run, cfg)
    res = l3rs.evaluate(cfg, psi=run.psi_uri, progress=False)  # the config's settings: A and E
    check_report(res, "AE", {"A": "cifar100", "E": "cifar100"})
