"""Run configuration: one TOML file describes a meta-training run end to end (see jobs/configs/).

Every field is validated before any work starts; errors name the field as ``section.key``. Unknown sections or
keys are errors too (a typo must not silently fall back to a default).

One module (~640 lines) on purpose: the sections' dataclasses, their validation and the checks that need several
sections at once (class counts against the dataset, custom models, task-mixture sources that override [data],
[task] and the checkpoint) are one schema, and every other layer imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from l3rs.optim import L3RSConfig, LearnedOptimizerConfig, family_from_dict

__all__ = [
    "Config",
    "RunSection",
    "DataSection",
    "ModelSection",
    "PretrainSection",
    "TaskSection",
    "NESSection",
    "WorkersSection",
    "EvaluateSection",
    "ConfigError",
    "SOURCE_FIELDS",
    "load_config",
    "config_from_dict",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "fmnist-default"
    storage: str = "runs"  # local path, s3://bucket/prefix or gs://bucket/prefix
    seed: int = 0
    checkpoint_every: int = 5  # generations
    keep_checkpoints: int = 3  # the newest N checkpoints are kept; 0 keeps every one

    def validate(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError(f"run.name: {self.name!r} must be a non-empty name without '/', '\\' or spaces.")
        if not self.storage:
            raise ConfigError("run.storage: must be a local path or an s3:// / gs:// URI.")
        _positive("run.checkpoint_every", self.checkpoint_every)
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"run.keep_checkpoints: must be an integer >= 0 (0 keeps every one), got {keep!r}.")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The dataset: a preset name or any tfds image-classification dataset, with its class splits.

    ``dataset`` alone picks the preset of that name (:data:`l3rs.data.SPECS`); every other field overrides it (or,
    for a dataset without a preset, the defaults derived from its ``DatasetInfo``). See :mod:`l3rs.data.spec`.
    """

    dataset: str = "fashion_mnist_debian"
    data_dir: str = ""
    preset: str = ""  # "" = the preset named like `dataset` (if any); a preset's name; or "none"
    classes: dict[str, Any] = dataclasses.field(default_factory=dict)  # [data.classes] pretrain/meta_train/meta_test
    allow_overlap: bool = False  # let class splits share classes (they are disjoint by default)
    image_size: tuple[int, ...] = ()  # [H, W] or [H, W, C]; default: the preset's, else the dataset's own
    train_split: str = ""  # tfds splits (slices allowed); default: the preset's, else from DatasetInfo
    valid_split: str = ""
    test_split: str = ""
    cache: str = ""  # class-indexed cache (`l3rs data prepare`): path or s3:// gs:// URI; "" = local, made on first use

    def __post_init__(self) -> None:
        if isinstance(self.image_size, str) or not hasattr(self.image_size, "__iter__"):
            raise ConfigError(f"data.image_size: expected [height, width] or [height, width, channels], got "
                              f"{self.image_size!r}.")  # fmt: skip
        object.__setattr__(self, "image_size", tuple(self.image_size))

    def validate(self) -> None:
        for name in ("dataset", "data_dir", "preset", "train_split", "valid_split", "test_split", "cache"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"data.{name}: expected a string, got {getattr(self, name)!r}.")
        if not isinstance(self.allow_overlap, bool):
            raise ConfigError(f"data.allow_overlap: expected true or false, got {self.allow_overlap!r}.")
        if not isinstance(self.classes, dict):
            raise ConfigError(f'data.classes: expected a table like {{ pretrain = "0:5" }}, got {self.classes!r}.')
        self.spec()

    def spec(self, name: Any = None) -> Any:
        """The resolved :class:`l3rs.data.DatasetSpec` of this section (for a preset without overrides: the preset).

        ``name``: another dataset to resolve instead (e.g. ``evaluate.other_dataset``); this section's spec when it
        is None or this section's ``dataset``. Raises ConfigError naming the field.
        """
        from l3rs.data import DatasetSpec, get_spec

        if isinstance(name, DatasetSpec):
            return name
        if name is not None and name != self.dataset:
            try:
                return get_spec(name)
            except ValueError as e:
                raise ConfigError(f"data.dataset: {e}") from None
        key = json.dumps(
            [self.dataset, self.preset, self.classes, self.allow_overlap, list(self.image_size), self.train_split,
             self.valid_split, self.test_split, self.data_dir], sort_keys=True, default=str,
        )  # fmt: skip
        spec = _resolve_spec_cached(key)
        return dataclasses.replace(spec, cache=self.cache) if self.cache else spec


@functools.lru_cache(maxsize=32)
def _resolve_spec_cached(key: str) -> Any:
    from l3rs.data.spec import resolve_spec

    dataset, preset, classes, overlap, size, train, valid, test, data_dir = json.loads(key)
    try:
        return resolve_spec(dataset, preset=preset, classes=classes, allow_overlap=overlap, image_size=size,
                            train_split=train, valid_split=valid, test_split=test, data_dir=data_dir)  # fmt: skip
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data.") else f"data.dataset: {msg}") from None


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The model and its θ0.

    ``name`` is a preset (``small_cnn``, ``resnet18``, ``resnet34``) or the import path of your own flax linen module,
    ``"package.module:Class"``, imported from ``module_path`` (a folder; relative paths are relative to the current
    directory, which ``l3rs submit`` uploads as the job's working_dir). ``options`` are the module's keyword fields;
    ``head`` the path of its classifier layer (re-initialised for each task). ``checkpoint`` is θ0: a folder written by
    ``l3rs pretrain``, a flax msgpack file or an Orbax checkpoint of the params (or variables), local or a URI; or
    ``"random"``.
    """

    name: str = "small_cnn"
    checkpoint: str = "runs/pretrain-fmnist"  # θ0: an `l3rs pretrain` folder, a .msgpack / Orbax checkpoint, "random"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # [model.options]: the module's keyword fields
    head: str = "head"  # path of the classifier layer in params ("head", or nested: "classifier/out")
    module_path: str = ""  # folder to import `name` from ("" = the current sys.path)

    def validate(self) -> None:
        from l3rs.models import head_path, import_model, model_options

        for name in ("name", "checkpoint", "head", "module_path"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"model.{name}: expected a string, got {getattr(self, name)!r}.")
        if not self.checkpoint:
            raise ConfigError('model.checkpoint: a checkpoint path/URI or "random" is required.')
        if not isinstance(self.options, dict):
            raise ConfigError(f"model.options: expected a table of the model's keyword fields, got {self.options!r}.")
        try:
            head_path(self.head)
            cls = import_model(self.name, self.module_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        known = model_options(cls)
        if "num_classes" not in known:
            raise ConfigError(f"model.name: {self.name!r} takes no num_classes field (its fields: {sorted(known)}).")
        known -= {"num_classes"}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(f"model.options.{unknown[0]}: {self.name!r} has no such field; known: {sorted(known)}.")

    def create(self, num_classes: int) -> Any:
        """The flax module with a ``num_classes``-way head. Raises ConfigError naming ``model.*``."""
        from l3rs.models import create

        try:
            return create(self.name, num_classes, module_path=self.module_path, **self.options)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("model.") else f"model.options: {msg}") from None

    @property
    def is_preset(self) -> bool:
        """A built-in model with its default head (whose layers are known: no trace needed to check them)."""
        from l3rs.models import HEAD, MODELS

        return self.name in MODELS and self.head == HEAD


@dataclasses.dataclass(frozen=True)
class PretrainSection:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    output: str = "runs/pretrain-fmnist"
    # 0: every class of the dataset's pretrain split. N > 0: only its first N (a narrow θ0, whose features fit few
    # classes: the kind of checkpoint a meta-training mixture can add to teach ψ when not to trust θ0's features).
    num_classes: int = 0

    def validate(self) -> None:
        _positive("pretrain.steps", self.steps)
        _positive("pretrain.batch_size", self.batch_size)
        _positive("pretrain.learning_rate", self.learning_rate)
        _zero_or_count("pretrain.num_classes", self.num_classes, "every pretrain class")
        if not self.output:
            raise ConfigError("pretrain.output: a path/URI is required.")


@dataclasses.dataclass(frozen=True)
class TaskSection:
    num_classes: int = 5  # N-way
    batch_size: int = 64
    eval_batch_size: int = 256
    k_min: int = 10
    k_max: int = 100
    train_scope: str = "all"  # "all" | "head"
    truncation_prob: float = 0.0  # chance a task runs fewer steps than the K the optimizer is told (l3rs.meta.tasks)
    # [[task.sources]]: meta-train on a mixture of task sources (l3rs.meta.mixture; keys: SOURCE_FIELDS). Empty: the
    # one distribution of [data], [model] and this section, exactly as without the field.
    sources: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.sources, str | dict) or not hasattr(self.sources, "__iter__"):
            raise ConfigError(f"task.sources: expected an array of tables ([[task.sources]]), got {self.sources!r}.")
        object.__setattr__(self, "sources", tuple(self.sources))

    def validate(self) -> None:
        _positive("task.num_classes", self.num_classes)
        if self.num_classes < 2:
            raise ConfigError(f"task.num_classes: a task needs at least 2 classes, got {self.num_classes}.")
        _positive("task.batch_size", self.batch_size)
        _positive("task.eval_batch_size", self.eval_batch_size)
        _positive("task.k_min", self.k_min)
        _positive("task.k_max", self.k_max)
        if self.k_min > self.k_max:
            raise ConfigError(f"task.k_min: {self.k_min} is larger than task.k_max = {self.k_max}.")
        if self.train_scope not in ("all", "head"):
            raise ConfigError(f'task.train_scope: {self.train_scope!r} must be "all" or "head".')
        if not 0.0 <= self.truncation_prob <= 1.0:
            raise ConfigError(f"task.truncation_prob: must lie in [0, 1], got {self.truncation_prob}.")
        self._validate_sources()

    def _validate_sources(self) -> None:
        """Each ``[[task.sources]]`` table: known keys of the right types, a positive weight, a unique name (what
        needs the dataset, e.g. class counts, is checked by :meth:`Config.source_config`)."""
        names: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            prefix = f"task.sources[{i}]"
            if not isinstance(source, dict):
                raise ConfigError(f"{prefix}: expected a table (a [[task.sources]] entry), got {source!r}.")
            unknown = sorted(set(source) - set(SOURCE_FIELDS))
            if unknown:
                raise ConfigError(f"{prefix}.{unknown[0]}: unknown field; known fields: {sorted(SOURCE_FIELDS)}.")
            for key, value in source.items():
                _check_type(f"{prefix}.{key}", value, SOURCE_FIELDS[key])
            weight = source.get("weight", 1.0)
            if not math.isfinite(weight) or weight <= 0:  # its type was checked above
                raise ConfigError(f"{prefix}.weight: must be > 0, got {weight!r}.")
            name = source_name(source)
            if not name.strip():
                raise ConfigError(f"{prefix}.name: must be a non-empty string.")
            if name in names:
                raise ConfigError(
                    f"{prefix}.name: {name!r} is also the name of task.sources[{names[name]}]; give each source a "
                    "distinct name."
                )
            names[name] = i


# The keys of a [[task.sources]] table and their types. `name` (default: the dataset's name) and `weight` (default 1)
# are the source's own; `checkpoint` overrides model.checkpoint; the [data] keys override [data] (all of it when the
# source names no `dataset`; a source with its own `dataset` starts from that dataset's preset); the [task] keys
# override [task].
SOURCE_TASK_FIELDS = ("num_classes", "batch_size", "eval_batch_size", "k_min", "k_max")
SOURCE_DATA_FIELDS = ("dataset", "data_dir", "preset", "classes", "allow_overlap", "image_size", "train_split",
                      "valid_split", "test_split", "cache")  # fmt: skip
SOURCE_FIELDS: dict[str, Any] = {
    "name": str,
    "weight": float,
    "checkpoint": str,
    **{k: typing.get_type_hints(DataSection)[k] for k in SOURCE_DATA_FIELDS},
    **{k: int for k in SOURCE_TASK_FIELDS},
}


def source_name(source: dict[str, Any]) -> str:
    """A ``[[task.sources]]`` table's name: its ``name``, else its ``dataset``, else ``"data"`` (the [data] one)."""
    return str(source.get("name", source.get("dataset", "data")))


@dataclasses.dataclass(frozen=True)
class NESSection:
    population_size: int = 16
    meta_batch_size: int = 2
    generations: int = 40
    sigma: float = 0.03
    learning_rate: float = 0.02
    decay_every: int = 500
    decay_factor: float = 0.5
    # The pull toward ψ₀ (= Adam(init_lr)), chosen by measurement on issue 11's 32 tasks per setting (docs/anchor):
    # out of domain 59 task × K cells below best Adam − 2 of 640 against 152 without it, for 4.5 points in domain at
    # K = 10. weight_decay = 0 is NES without it (the paper's); "zero" decays ψ toward the origin (AdamW's).
    weight_decay: float = 1.0
    weight_decay_toward: str = "psi0"
    noise: str = "sequential"  # l3rs.meta.nes.NOISE_MODES: "per_pair"/"table" for large populations/ψ (issue 14)
    fitness: str = "loss"  # "loss": −mean eval loss (paper §2); "log_loss": −mean log (scale-free; l3rs.meta.mixture)

    def validate(self) -> None:
        if not isinstance(self.population_size, int) or self.population_size < 2 or self.population_size % 2:
            raise ConfigError(
                f"nes.population_size: must be an even integer >= 2 (antithetic pairs), got {self.population_size}."
            )
        _positive("nes.meta_batch_size", self.meta_batch_size)
        _positive("nes.generations", self.generations)
        _positive("nes.sigma", self.sigma)
        _positive("nes.learning_rate", self.learning_rate)
        _positive("nes.decay_every", self.decay_every)
        if not 0 < self.decay_factor <= 1:
            raise ConfigError(f"nes.decay_factor: must lie in (0, 1], got {self.decay_factor}.")
        if self.weight_decay < 0:
            raise ConfigError(f"nes.weight_decay: must be >= 0, got {self.weight_decay}.")
        if self.weight_decay_toward not in ("zero", "psi0"):
            raise ConfigError(f'nes.weight_decay_toward: must be "zero" or "psi0", got {self.weight_decay_toward!r}.')
        if self.noise not in ("sequential", "per_pair", "table"):
            raise ConfigError(f'nes.noise: must be "sequential", "per_pair" or "table", got {self.noise!r}.')
        if self.fitness not in ("loss", "log_loss"):
            raise ConfigError(f'nes.fitness: must be "loss" or "log_loss", got {self.fitness!r}.')

    def nes_config(self):
        """The pure NES strategy config (l3rs.meta.nes.NESConfig)."""
        from l3rs.meta.nes import NESConfig

        return NESConfig(
            population_size=self.population_size,
            sigma=self.sigma,
            learning_rate=self.learning_rate,
            decay_every=self.decay_every,
            decay_factor=self.decay_factor,
            weight_decay=self.weight_decay,
            noise=self.noise,
        )


@dataclasses.dataclass(frozen=True)
class WorkersSection:
    min_workers: int = 1
    max_workers: int = 2
    resources: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1.0})
    candidates_per_call: int = 1
    unit_timeout_s: float = 600.0
    max_unit_retries: int = 5
    placement_timeout_s: float = 300.0  # how long the pool waits with no worker placed before the run fails

    def validate(self) -> None:
        _positive("workers.min_workers", self.min_workers)
        _positive("workers.max_workers", self.max_workers)
        if self.min_workers > self.max_workers:
            raise ConfigError(
                f"workers.min_workers: {self.min_workers} is larger than workers.max_workers = {self.max_workers}."
            )
        if not self.resources or any(not isinstance(v, int | float) or v <= 0 for v in self.resources.values()):
            raise ConfigError(f"workers.resources: need positive amounts like {{ GPU = 1 }}, got {self.resources}.")
        if self.candidates_per_call not in (1, 2):
            raise ConfigError(
                f"workers.candidates_per_call: 1 (one member of a pair per call) or 2 (both, vmapped), "
                f"got {self.candidates_per_call}."
            )
        _positive("workers.unit_timeout_s", self.unit_timeout_s)
        _positive("workers.max_unit_retries", self.max_unit_retries)
        _positive("workers.placement_timeout_s", self.placement_timeout_s)


@dataclasses.dataclass(frozen=True)
class EvaluateSection:
    """Meta-testing (paper §5, "Meta-Evaluation and Baselines"; settings A–E of Fig. 3)."""

    tasks: int = 100  # tasks per setting (paper: 100)
    k_grid: tuple[int, ...] = (10, 25, 50, 100, 200)  # always reaches beyond task.k_max
    adam_lrs: tuple[float, ...] = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
    settings: tuple[str, ...] = ("A", "B", "C", "D", "E")
    head_only_baselines: bool = True
    other_dataset: str = "sklearn_digits"  # settings B and D evaluate on it
    other_checkpoint: str = "runs/pretrain-digits"  # settings C and D start from it
    seed: int = 2024
    workers: int = 0  # evaluation processes; 0 = one per core

    def __post_init__(self) -> None:
        for name in ("k_grid", "adam_lrs", "settings"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise ConfigError(f"evaluate.{name}: expected a list, got {value!r}.")
            object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        _positive("evaluate.tasks", self.tasks)
        if not self.k_grid or any(not isinstance(k, int) or k <= 0 for k in self.k_grid):
            raise ConfigError(f"evaluate.k_grid: positive integers required, got {self.k_grid}.")
        if list(self.k_grid) != sorted(set(self.k_grid)):
            raise ConfigError(f"evaluate.k_grid: must be strictly increasing, got {self.k_grid}.")
        if not self.adam_lrs or any(not isinstance(x, int | float) or x <= 0 for x in self.adam_lrs):
            raise ConfigError(f"evaluate.adam_lrs: positive learning rates required, got {self.adam_lrs}.")
        _zero_or_count("evaluate.workers", self.workers, "one per core")
        unknown = sorted(set(self.settings) - set("ABCDE"))
        if unknown or not self.settings:
            raise ConfigError(f"evaluate.settings: choose among A B C D E, got {list(self.settings)}.")


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunSection = dataclasses.field(default_factory=RunSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    pretrain: PretrainSection = dataclasses.field(default_factory=PretrainSection)
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    optimizer: LearnedOptimizerConfig = dataclasses.field(default_factory=L3RSConfig)
    nes: NESSection = dataclasses.field(default_factory=NESSection)
    workers: WorkersSection = dataclasses.field(default_factory=WorkersSection)
    evaluate: EvaluateSection = dataclasses.field(default_factory=EvaluateSection)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        # Cross-field checks that need the dataset's class split.
        spec = self.data.spec()
        self._check_task_classes(spec)
        if self.pretrain.num_classes > len(spec.pretrain_classes):
            raise ConfigError(
                f"pretrain.num_classes: {self.data.dataset}'s pretrain split has {len(spec.pretrain_classes)} classes, "
                f"fewer than {self.pretrain.num_classes}; use at most that many, or 0 for all of them."
            )
        if self.evaluate.k_grid[-1] <= self.task.k_max:
            raise ConfigError(
                f"evaluate.k_grid: must reach beyond task.k_max = {self.task.k_max} (generalisation past the "
                f"meta-training horizon is part of the protocol), got {self.evaluate.k_grid}."
            )
        if not self.model.is_preset:
            self._check_model(spec)
        for i in range(len(self.task.sources)):
            self.source_config(i)
        return self

    def _check_task_classes(self, spec: Any) -> None:
        for split_name in ("meta_train_classes", "meta_test_classes"):
            available = len(getattr(spec, split_name))
            if self.task.num_classes > available:
                raise ConfigError(
                    f"task.num_classes: {self.task.num_classes}-way tasks need more classes than "
                    f"{self.data.dataset}'s {split_name} has ({available})."
                )

    def source_config(self, index: int) -> Config:
        """The run as if ``[[task.sources]]`` entry ``index`` were its only task distribution: [data], [task] and
        ``model.checkpoint`` overridden by the source's fields (see :data:`SOURCE_FIELDS`), no sources of its own.

        Raises ConfigError naming ``task.sources[index].<field>`` for a source whose dataset, classes or sizes do not
        work (the [evaluate] and other sections are the run's and are not re-checked).
        """
        source = self.task.sources[index]
        prefix = f"task.sources[{index}]"
        data_values = {k: source[k] for k in SOURCE_DATA_FIELDS if k in source}
        task_values = {k: source[k] for k in SOURCE_TASK_FIELDS if k in source}
        try:
            data = DataSection(**data_values) if "dataset" in source else dataclasses.replace(self.data, **data_values)
            task = dataclasses.replace(self.task, sources=(), **task_values)
            model = dataclasses.replace(self.model, checkpoint=source.get("checkpoint", self.model.checkpoint))
            cfg = dataclasses.replace(self, data=data, task=task, model=model)
            data.validate()
            task.validate()
            spec = data.spec()
            cfg._check_task_classes(spec)
            if not model.is_preset:
                cfg._check_model(spec)
        except ConfigError as e:
            raise ConfigError(_source_message(str(e), prefix)) from None
        return cfg

    def _check_model(self, spec: Any) -> None:
        """A custom model (or head) is built and traced (shapes only) on the dataset's images: options that the
        module refuses and a head it lacks are config errors now, not worker crashes later."""
        import jax

        from l3rs.models import find_head, init_variables

        module = self.model.create(self.task.num_classes)
        try:
            shapes = jax.eval_shape(lambda k: init_variables(module, k, spec.image_shape), jax.random.key(0))
        except Exception as e:  # whatever the user's module raises while tracing
            raise ConfigError(
                f"model.name: {self.model.name!r} fails on {spec.image_shape} images "
                f"(module.init(key, x, train=False)): {type(e).__name__}: {e}"
            ) from None
        try:
            head = find_head(shapes["params"], self.model.head)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if head["kernel"].shape[-1] != self.task.num_classes:
            raise ConfigError(
                f"model.head: layer {self.model.head!r} has {head['kernel'].shape[-1]} outputs, not num_classes = "
                f"{self.task.num_classes}; name the layer whose width is the module's num_classes."
            )

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Reads and validates a TOML run config (as ``l3rs ... --config PATH``)."""
        return load_config(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Builds and validates a config from a nested dict (the parsed TOML)."""
        return config_from_dict(d)

    def replace(self, changes: dict[str, Any] | None = None, /, **sections: Any) -> Config:
        """A validated copy with some fields changed.

        Sections as dicts of overrides, ``cfg.replace(nes={"generations": 2}, task={"k_max": 50})``; or dotted keys,
        ``cfg.replace({"task.k_max": 50, "data.classes.pretrain": "0:4"})`` (a dotted key reaches into tables such as
        ``data.classes`` and ``model.options`` and keeps their other keys; a section dict replaces the fields it
        names). Raises ConfigError naming the field for an unknown section or field, or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        current = {name: _asdict(getattr(self, name)) for name in names}
        touched: dict[str, dict[str, Any]] = {}
        for key, value in {**(changes or {}), **sections}.items():
            section, _, rest = key.partition(".")
            if section not in names:
                raise ConfigError(f"[{section}]: unknown section; known sections: {sorted(names)}.")
            if rest:
                target = touched.setdefault(section, copy.deepcopy(current[section]))
                *parents, leaf = rest.split(".")
                for part in parents:
                    node = target.get(part)
                    if not isinstance(node, dict):
                        raise ConfigError(f"{section}.{part}: is not a table; cannot set {key}.")
                    target = node
                target[leaf] = value
                continue
            if dataclasses.is_dataclass(value) or isinstance(value, LearnedOptimizerConfig):
                value = _asdict(value)
            if not isinstance(value, dict):
                raise ConfigError(f"{section}: expected a dict of overrides, got {value!r}.")
            base = touched.get(section, current[section])
            if section == "optimizer" and value.get("family", base["family"]) != base["family"]:
                base = {}  # another learned-optimizer family: its own defaults, not this one's fields
            touched[section] = {**base, **value}
        new = {name: _build(type(getattr(self, name)), values, name) for name, values in touched.items()}
        return dataclasses.replace(self, **new).validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _source_message(message: str, prefix: str) -> str:
    """A [data]/[task] error of a source's derived config, re-addressed to the source's own field."""
    if message.startswith(("data.", "task.")):
        return re.sub(r"(?<![\w.])(data|task)\.(?=\w)", prefix + ".", message)
    return f"{prefix}: {message}"


def _asdict(section: Any) -> dict[str, Any]:
    if isinstance(section, LearnedOptimizerConfig):
        return section.to_dict()
    return dataclasses.asdict(section)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}.")


def _zero_or_count(name: str, value: Any, zero_means: str) -> None:
    """An integer option where 0 has a meaning of its own (``zero_means``) and N > 0 is a count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: must be 0 ({zero_means}) or a positive integer, got {value!r}.")


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Light type check of TOML values against a dataclass annotation; returns the (coerced) value."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) != (annotation is bool) or not isinstance(value, annotation):
            raise ConfigError(f"{name}: expected {annotation.__name__}, got {value!r}.")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table like {{ GPU = 1 }}, got {value!r}.")
        return dict(value)
    if origin in (typing.Union, types.UnionType) or origin is tuple or origin is typing.Literal:
        return value  # validated by the section itself
    return value


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a table, got {values!r}.")
    if section == "optimizer":
        try:
            return family_from_dict(values)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("optimizer") else f"optimizer: {msg}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown field; known fields of [{section}]: {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _expand_dotted(values: Any, section: str) -> Any:
    """``{"classes.pretrain": [0]}`` -> ``{"classes": {"pretrain": [0]}}`` (what ``--set data.classes.pretrain=[0]``
    gives), merged into the table of the same name if there is one."""
    if not isinstance(values, dict) or not any("." in k for k in values):
        return values
    out = copy.deepcopy({k: v for k, v in values.items() if "." not in k})
    for key, value in values.items():
        if "." not in key:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{section}.{part}: is not a table; cannot set {section}.{key}.")
        node[leaf] = value
    return out


def config_from_dict(d: dict[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from a nested dict (the parsed TOML)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section; known sections: {sorted(sections)}.")
    built = {}
    for name, f in sections.items():
        cls = f.default_factory().__class__ if f.default_factory is not dataclasses.MISSING else f.type
        built[name] = _build(cls, _expand_dotted(d.get(name, {}), name), name)
    return Config(**built).validate()


def load_config(path: str | Path) -> Config:
    """Reads and validates a TOML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return config_from_dict(raw)
