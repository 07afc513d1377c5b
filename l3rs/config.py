"""Run configuration: one TOML file describes a meta-training run end to end (see jobs/configs/).

Every field is validated before any work starts; errors name the field as ``section.key``. Unknown sections or
keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
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

    def validate(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError(f"run.name: {self.name!r} must be a non-empty name without '/', '\\' or spaces.")
        if not self.storage:
            raise ConfigError("run.storage: must be a local path or an s3:// / gs:// URI.")
        _positive("run.checkpoint_every", self.checkpoint_every)


@dataclasses.dataclass(frozen=True)
class DataSection:
    dataset: str = "fashion_mnist_debian"
    data_dir: str = ""

    def validate(self) -> None:
        from l3rs.data import get_spec

        try:
            get_spec(self.dataset)
        except ValueError as e:
            raise ConfigError(f"data.dataset: {e}") from None


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "small_cnn"
    checkpoint: str = "runs/pretrain-fmnist"  # θ0 written by `l3rs pretrain`, or "random"

    def validate(self) -> None:
        from l3rs.models import MODELS

        if self.name not in MODELS:
            raise ConfigError(f"model.name: unknown model {self.name!r}; known: {sorted(MODELS)}.")
        if not self.checkpoint:
            raise ConfigError('model.checkpoint: a checkpoint path/URI or "random" is required.')


@dataclasses.dataclass(frozen=True)
class PretrainSection:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    output: str = "runs/pretrain-fmnist"

    def validate(self) -> None:
        _positive("pretrain.steps", self.steps)
        _positive("pretrain.batch_size", self.batch_size)
        _positive("pretrain.learning_rate", self.learning_rate)
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


@dataclasses.dataclass(frozen=True)
class NESSection:
    population_size: int = 16
    meta_batch_size: int = 2
    generations: int = 40
    sigma: float = 0.03
    learning_rate: float = 0.02
    decay_every: int = 500
    decay_factor: float = 0.5
    weight_decay: float = 0.0

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
        )


@dataclasses.dataclass(frozen=True)
class WorkersSection:
    min_workers: int = 1
    max_workers: int = 2
    resources: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1.0})
    candidates_per_call: int = 1
    unit_timeout_s: float = 600.0
    max_unit_retries: int = 5

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
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"evaluate.workers: 0 (one per core) or a positive count, got {self.workers!r}.")
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
        from l3rs.data import get_spec

        spec = get_spec(self.data.dataset)
        for split_name in ("meta_train_classes", "meta_test_classes"):
            available = len(getattr(spec, split_name))
            if self.task.num_classes > available:
                raise ConfigError(
                    f"task.num_classes: {self.task.num_classes}-way tasks need more classes than "
                    f"{self.data.dataset}'s {split_name} has ({available})."
                )
        if self.evaluate.k_grid[-1] <= self.task.k_max:
            raise ConfigError(
                f"evaluate.k_grid: must reach beyond task.k_max = {self.task.k_max} (generalisation past the "
                f"meta-training horizon is part of the protocol), got {self.evaluate.k_grid}."
            )
        return self

    def replace(self, **sections: Any) -> Config:
        """A copy with some sections replaced by dicts of overrides, e.g. ``cfg.replace(nes={"generations": 2})``."""
        new = {}
        for name, overrides in sections.items():
            current = _asdict(getattr(self, name))
            if name == "optimizer" and overrides.get("family", current["family"]) != current["family"]:
                current = {}  # another learned-optimizer family: its own defaults, not this one's fields
            new[name] = _build(type(getattr(self, name)), {**current, **overrides}, name)
        return dataclasses.replace(self, **new).validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _asdict(section: Any) -> dict[str, Any]:
    if isinstance(section, LearnedOptimizerConfig):
        return section.to_dict()
    return dataclasses.asdict(section)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number, got {value!r}.")


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


def config_from_dict(d: dict[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from a nested dict (the parsed TOML)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section; known sections: {sorted(sections)}.")
    built = {}
    for name, f in sections.items():
        cls = f.default_factory().__class__ if f.default_factory is not dataclasses.MISSING else f.type
        built[name] = _build(cls, d.get(name, {}), name)
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
