"""The paper's cluster configs, end to end at toy size on CPU (issue 14, part 2).

``jobs/configs/imagenet_resnet34.toml``, ``places_resnet34_pretrain.toml`` (whose θ0 the ImageNet config's setting C
consumes, and whose own evaluation runs the ImageNet-trained ψ on Places tasks) and ``cifar100_resnet18.toml`` are
loaded as shipped and shrunk to toy size, keeping their model (the real ResNet-34 / ResNet-18 of ``l3rs.models``, at
16x16 inputs), dataset, optimizer and worker resources (``{GPU = 1}``: the training workers run on a node with
logical GPUs of the session's real local Ray cluster). Each goes ``l3rs data prepare`` → pretrain → train
(2 generations on Ray) → evaluate (2 tasks, a 2-point K grid, one Adam learning rate): ImageNet and Places in this
process through :mod:`l3rs.api` (Places is pretrained and consumed by ImageNet's setting C), CIFAR-100 meanwhile
through the ``l3rs`` command line in a subprocess, as a user runs it, on the other core.

The data: toy copies of the official tfds datasets, prepared by the official builders from fake source files
(``tests/_mock_tfds.py`` says exactly which code is real) and read back by the official builders into the
class-indexed cache, as on a cluster.

Compile time on XLA:CPU dominates (a ResNet-34 inner loop with L3RS over its 110 layers: ~35 s to compile for
``train_scope = "all"``, ~7 s for ``"head"``), so the toy configs fine-tune the head only, and the in-process work
and the command lines use a persistent compilation cache (kept in ``.pytest_cache`` between sessions): the ImageNet
and Places toy splits have the same shapes, so Places' pretraining and evaluation programs are the ImageNet ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _mock_tfds as mock
import numpy as np
import pytest

import l3rs
from l3rs.config import Config, load_config

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


def jax_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A persistent JAX compilation cache folder kept between test sessions in pytest's cache (``.pytest_cache``;
    JAX keys entries by program, compile options and versions), or a fresh one without the cache plugin."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(f"l3rs-jax-{name}")) if cache is not None else tmp_path_factory.mktemp(f"jax-{name}")


@pytest.fixture(scope="module")
def compile_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A persistent JAX compilation cache for this module's in-process work (pretraining, evaluation)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir(request, tmp_path_factory, "in-process")))
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def gpu_node(
    ray_connected: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A node with two logical GPUs (the configs' workers ask for ``{GPU = 1}``): one worker for the in-process
    ImageNet run, one for the CIFAR-100 run of the command line. Its processes inherit a compilation cache."""
    cache = str(jax_cache_dir(request, tmp_path_factory, "workers"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JAX_COMPILATION_CACHE_DIR", cache)  # only while the node's processes start
        node = ray_connected.add_node(num_cpus=1, num_gpus=2)
    try:
        yield ray_connected
    finally:
        if node in ray_connected.nodes:
            ray_connected.remove_node(node)


def toy_changes(config: str, data_dir: str, classes: mock.ToyClasses, runs: Path, **changes: Any) -> dict[str, Any]:
    """The dotted-key changes that shrink the shipped config ``config`` to toy size; its paths under ``runs``."""
    name = load_config(CONFIGS / config).run.name
    base = {
        "run.storage": str(runs),
        "run.checkpoint_every": 1,
        "data.data_dir": data_dir,
        "data.cache": str(runs / f"cache-{name}"),  # the bucket prefix `l3rs data prepare` writes on a cluster
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
    return {**base, **changes}


def toy(config: str, changes: dict[str, Any]) -> Config:
    """The shipped config with ``changes`` (as ``Config.replace``)."""
    return load_config(CONFIGS / config).replace(changes)


def toml_value(value: Any) -> str:
    """A ``--set`` value (TOML): JSON for scalars and lists, an inline table for a dict."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def cli_args(config: str, changes: dict[str, Any]) -> list[str]:
    """``--config jobs/configs/X.toml --set section.key=value ...``: the same toy config on the command line."""
    args = ["--config", str(CONFIGS / config)]
    for key, value in changes.items():
        args += ["--set", f"{key}={toml_value(value)}"]
    return args


def check_pretrain(result: Any, cfg: Config) -> None:
    meta = result.meta if hasattr(result, "meta") else result
    assert meta["model"] == cfg.model.name and meta["dataset"] == cfg.data.dataset
    assert meta["pretrain_classes"] == list(cfg.data.spec().pretrain_classes)
    assert meta["input_shape"] == [16, 16, 3] and math.isfinite(meta["final_train_loss"])
    assert (Path(cfg.pretrain.output) / "meta.json").is_file()


def check_run(history: list[dict[str, Any]], psi_uri: str, cfg: Config) -> None:
    assert [row["generations_completed"] for row in history] == [1, 2]
    for row in history:
        assert np.isfinite(row["fitness_mean"]) and row["units"] == 1 and row["nonfinite_candidates"] == 0
    text = (Path(psi_uri) / "metadata.json").read_text()
    assert cfg.data.dataset in text and cfg.model.name in text
    # the artifact names θ0 relative to the run storage, never by this machine's absolute path
    assert json.loads(text)["model_checkpoint"] == Path(cfg.model.checkpoint).name
    assert str(Path(cfg.run.storage).resolve()) not in text


def check_report(report: dict[str, Any], settings: str, dataset: str) -> None:
    assert sorted(report["settings"]) == sorted(settings)
    for setting in report["settings"].values():
        rows = setting["rows"]
        optimizers = {r["optimizer"] for r in rows}
        assert {"L3RS", "L3RS ψ₀"} <= optimizers and any(o.startswith("Adam (cosine)") for o in optimizers)
        assert sorted({int(r["K"]) for r in rows}) == K_GRID
        for r in rows:
            assert 0.0 <= r["mean_acc"] <= 1.0, r
        assert dataset in json.dumps(setting)


class CifarByCommandLine:
    """The CIFAR-100 config through the ``l3rs`` command line (prepare, pretrain, train on the session's cluster,
    evaluate), in a background thread of subprocesses, so that it runs on the other core while this process works."""

    def __init__(self, cluster: Any, data_dir: str, classes: mock.ToyClasses, runs: Path, cache_dir: Path) -> None:
        splits = {"data.train_split": "train[:75%]", "data.valid_split": "train[75%:]"}  # its 50k/5k split, scaled
        self.changes = toy_changes("cifar100_resnet18.toml", data_dir, classes, runs, **splits)
        args = cli_args("cifar100_resnet18.toml", self.changes)
        self.commands = [
            ["data", "prepare", *args],  # in this process (no Ray address: the job-less local branch)
            ["pretrain", *args],
            ["train", *args, "--address", cluster.address],
            ["evaluate", *args, "--settings", "A"],  # (the config's E, a random θ0, left out for time)
        ]
        self.env = {**cluster.loopback_env(), "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
        self.env.pop("RAY_ADDRESS", None)
        self.results: list[subprocess.CompletedProcess] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for command in self.commands:
            proc = subprocess.run([sys.executable, "-m", "l3rs.cli", *command], env=self.env, cwd=REPO,
                                  capture_output=True, text=True, timeout=900)  # fmt: skip
            self.results.append(proc)
            if proc.returncode != 0:
                return

    def join(self) -> list[subprocess.CompletedProcess]:
        self.thread.join(timeout=900)
        return self.results


@pytest.fixture(scope="module")
def cifar_cli(
    request: pytest.FixtureRequest, mock_data: Any, gpu_node: Any, tmp_path_factory: pytest.TempPathFactory
) -> CifarByCommandLine | None:
    """Starts the CIFAR-100 command-line run if its test is selected (None otherwise)."""
    if not any("cifar100" in item.name for item in request.session.items):
        return None
    data_dir, classes = mock_data
    runs = tmp_path_factory.mktemp("cifar-runs")
    cache = jax_cache_dir(request, tmp_path_factory, "cifar-cli")
    return CifarByCommandLine(gpu_node, data_dir, classes[mock.CIFAR100], runs, cache)


@pytest.fixture(scope="module")
def imagenet(mock_data: Any, compile_cache: None, gpu_node: Any, cifar_cli: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Any:  # fmt: skip
    """The ImageNet and Places toy configs prepared (``l3rs data prepare`` as Ray tasks) and pretrained, and ImageNet
    meta-trained (2 generations on the Ray cluster); Places' θ0 is ImageNet's ``evaluate.other_checkpoint``."""
    from l3rs.cli import main

    data_dir, classes = mock_data
    runs = tmp_path_factory.mktemp("paper-runs")
    places_changes = toy_changes("places_resnet34_pretrain.toml", data_dir, classes[mock.PLACES], runs,
                                 **{"evaluate.other_checkpoint": str(runs / "pretrain-imagenet-resnet34")})  # fmt: skip
    places = toy("places_resnet34_pretrain.toml", places_changes)
    changes = toy_changes("imagenet_resnet34.toml", data_dir, classes[mock.IMAGENET], runs,
                          **{"evaluate.other_checkpoint": places.model.checkpoint})  # fmt: skip
    cfg = toy("imagenet_resnet34.toml", changes)
    for name, c in (("imagenet_resnet34.toml", changes), ("places_resnet34_pretrain.toml", places_changes)):
        assert main(["data", "prepare", *cli_args(name, c)]) == 0
    pre = l3rs.pretrain(cfg, progress=False)
    places_pre = l3rs.pretrain(places, progress=False)
    run = l3rs.train(cfg, progress=False)
    # C: ImageNet tasks from the Places θ0 (the consumer of places_resnet34_pretrain.toml's output). A, the same
    # tasks from ImageNet's own θ0, is the same code on another checkpoint (CIFAR-100's evaluation runs its A): left
    # out for time.
    res = l3rs.evaluate(cfg, psi=run.psi_uri, settings="C", progress=False)
    return cfg, places, pre, places_pre, run, res


def test_imagenet_resnet34_end_to_end(imagenet: Any) -> None:
    cfg, _, pre, _, run, res = imagenet
    assert cfg.model.name == "resnet34" and cfg.workers.resources == {"GPU": 1}
    assert (Path(cfg.data.cache) / "manifest.json").is_file()
    check_pretrain(pre, cfg)
    check_run(run.history, run.psi_uri, cfg)
    check_report(res.report, "C", "imagenet2012")
    assert (Path(res.out) / "report.md").is_file()


def test_places_resnet34_checkpoint_feeds_the_imagenet_evaluation(imagenet: Any) -> None:
    cfg, places, _, pre, _, res = imagenet
    assert places.model.name == "resnet34" and (Path(places.data.cache) / "manifest.json").is_file()
    check_pretrain(pre, places)
    # Setting C of the ImageNet evaluation started its tasks from the Places θ0 (Places' own evaluation, the
    # ImageNet-trained ψ on Places tasks, is the same code as A and C on other data: left out for time).
    setting_c = json.dumps(res.report["settings"]["C"])
    assert Path(places.model.checkpoint).name in setting_c and "places365_small" in setting_c


def test_cifar100_resnet18_end_to_end_by_command_line(cifar_cli: CifarByCommandLine) -> None:
    results = cifar_cli.join()
    for proc in results:
        assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert len(results) == len(cifar_cli.commands)
    cfg = toy("cifar100_resnet18.toml", cifar_cli.changes)
    assert cfg.model.name == "resnet18" and cfg.workers.resources == {"GPU": 1}
    prepared = json.loads(results[0].stdout.strip().splitlines()[-1])
    assert prepared["dataset"]["name"] == "cifar100" and prepared["image_shape"] == [16, 16, 3]
    assert prepared["shards"] > 0 and not prepared["ray"]
    check_pretrain(json.loads((Path(cfg.pretrain.output) / "meta.json").read_text()), cfg)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    check_run(history, str(run_dir / "psi"), cfg)
    check_report(json.loads((run_dir / "evaluation" / "report.json").read_text()), "A", "cifar100")
    # The report names the splits this config used, not the preset's ("train[:45000]").
    report_md = (run_dir / "evaluation" / "report.md").read_text()
    assert "45000" not in report_md and "pretrained on cifar100 classes 0–3 (train[:75%] split)" in report_md
    assert "report:" in results[-1].stdout
