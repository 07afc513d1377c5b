"""The evaluation settings of the paper's Fig. 3 (§5, "Meta-Evaluation and Baselines") and the tasks each one draws.

A setting fixes where θ0 comes from and which dataset the evaluation tasks come from:

- A: θ0 = ``model.checkpoint``, tasks from ``data.dataset`` (in-domain);
- B: θ0 = ``model.checkpoint``, tasks from ``evaluate.other_dataset``;
- C: θ0 = ``evaluate.other_checkpoint``, tasks from ``data.dataset``;
- D: θ0 = ``evaluate.other_checkpoint``, tasks from ``evaluate.other_dataset``;
- E: θ0 = a random initialisation (seed ``run.seed``), tasks from ``data.dataset``.

(F, the speedup panel, is computed from A's curves: :func:`l3rs.meta.stats.speedup_table`.) Tasks are drawn from the
dataset's meta-test classes (:class:`l3rs.meta.tasks.TaskDistribution` ``stage="meta_test"``: training batches from
the train split, the eval batch from the test split) with seeds from a stream of their own
(:func:`eval_task_seed`). Which classes θ0 and ψ saw is stated by :mod:`l3rs.meta.provenance`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from l3rs.config import Config, ConfigError
from l3rs.names import display_uri

__all__ = [
    "SETTINGS",
    "SettingSpec",
    "setting_spec",
    "plan_settings",
    "absolute_uri",
    "eval_task_seed",
    "eval_task_seeds",
    "eval_distribution",
]

# Evaluation tasks live in their own seed stream: SeedSequence([run seed, EVAL_TAG, evaluate.seed, stream, index]),
# mapped to [2^32, 2^64), so they can never equal a meta-training task seed (task_seed() gives 32-bit values).
EVAL_TAG = int.from_bytes(b"eval", "big")
_EVAL_SEED_OFFSET = 1 << 32

SETTINGS: Mapping[str, str] = {
    "A": "In-domain",
    "B": "Other evaluation dataset",
    "C": "Other checkpoint",
    "D": "Other checkpoint and dataset",
    "E": "Random initialisation",
}


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """One evaluation setting of Fig. 3: where θ0 comes from and which dataset the tasks are drawn from.

    Attributes:
      name: "A".."E".
      title: :data:`SETTINGS`'s title.
      description: one line naming θ0 and the task dataset (checkpoints by their :func:`l3rs.names.display_uri`).
      dataset: the tfds dataset of the tasks.
      checkpoint: θ0's folder/URI (absolute for a local path, so other processes find it), or ``"random"``.
      checkpoint_name: ``checkpoint`` as a report names it (never an absolute path).
    """

    name: str
    title: str
    description: str
    dataset: str
    checkpoint: str
    checkpoint_name: str = ""


def absolute_uri(uri: str) -> str:
    """A local path made absolute (``~`` expanded); ``"random"`` and remote URIs as they are."""
    if uri == "random" or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def checkpoint_name(cfg: Config, uri: str, given: str | None = None) -> str:
    """How reports name a checkpoint or artifact of this config: relative to ``run.storage`` where it lies in it,
    else the config's own relative string (:func:`l3rs.names.display_uri`)."""
    return display_uri(uri, root=cfg.run.storage, given=given)


def setting_spec(cfg: Config, name: str) -> SettingSpec:
    """Settings A–E (paper §5, Fig. 3) for this config; ``evaluate.other_*`` name the out-of-domain parts.

    Raises:
      ValueError: ``name`` is not one of A–E.
    """
    home, other = cfg.data.dataset, cfg.evaluate.other_dataset
    ckpt, other_ckpt = absolute_uri(cfg.model.checkpoint), absolute_uri(cfg.evaluate.other_checkpoint)
    ckpt_name = checkpoint_name(cfg, ckpt, cfg.model.checkpoint)
    other_name = checkpoint_name(cfg, other_ckpt, cfg.evaluate.other_checkpoint)
    table = {
        "A": (home, ckpt, ckpt_name, f"θ0 = {ckpt_name} (model.checkpoint); tasks from {home}"),
        "B": (other, ckpt, ckpt_name, f"θ0 = {ckpt_name} (model.checkpoint); tasks from {other}"),
        "C": (home, other_ckpt, other_name, f"θ0 = {other_name} (evaluate.other_checkpoint); tasks from {home}"),
        "D": (other, other_ckpt, other_name, f"θ0 = {other_name} (evaluate.other_checkpoint); tasks from {other}"),
        "E": (home, "random", "random", f"θ0 = a random initialisation (seed {cfg.run.seed}); tasks from {home}"),
    }
    if name not in table:
        raise ValueError(f"setting: {name!r} must be one of {sorted(table)}.")
    dataset, checkpoint, display, description = table[name]
    return SettingSpec(name, SETTINGS[name], description, dataset, checkpoint, display)


def plan_settings(cfg: Config, settings: Sequence[str] | None) -> tuple[list[SettingSpec], dict[str, str]]:
    """The settings to run and the skipped ones (name → reason); refuses unusable checkpoints before any work.

    A setting whose ``evaluate.other_checkpoint`` is missing is skipped; a missing ``model.checkpoint``, a
    checkpoint of another model or a dataset with fewer meta-test classes than ``task.num_classes`` is an error.

    Raises:
      ConfigError: naming the field (``evaluate.settings``, ``model.checkpoint``, ``evaluate.other_checkpoint``,
        ``evaluate.other_dataset``).
    """
    from l3rs.checkpoint import theta0_format
    from l3rs.meta.runner import load_theta0

    names = list(settings if settings is not None else cfg.evaluate.settings)
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise ConfigError(f"evaluate.settings: choose among A B C D E, got {names}.")
    specs, skipped = [], {}
    for name in dict.fromkeys(names):
        spec = setting_spec(cfg, name)
        home = spec.checkpoint == absolute_uri(cfg.model.checkpoint)
        if spec.checkpoint != "random" and theta0_format(spec.checkpoint) is None:
            if home:
                raise ConfigError(
                    f"model.checkpoint: no pretrained checkpoint at {cfg.model.checkpoint!r} (needed by setting "
                    f"{name}); run `l3rs pretrain --config ...` first."
                )
            skipped[name] = (
                f"setting {name} ({spec.title}) skipped: no pretrained checkpoint at {spec.checkpoint_name!r} "
                f"(evaluate.other_checkpoint). Make it with `l3rs pretrain` and a config whose pretrain.output is "
                f"that path, pretraining on {cfg.evaluate.other_dataset}'s pretrain classes (for sklearn_digits: "
                "jobs/configs/digits_checkpoint.toml)."
            )
            continue
        if spec.checkpoint != "random":
            try:  # the model it holds, and its shapes
                load_theta0(cfg, spec.checkpoint, field="model.checkpoint" if home else "evaluate.other_checkpoint")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        available = len(cfg.data.spec(spec.dataset).meta_test_classes)
        if cfg.task.num_classes > available:
            raise ConfigError(
                f"evaluate.other_dataset: {spec.dataset} has {available} meta-test classes, fewer than "
                f"task.num_classes = {cfg.task.num_classes} (setting {name})."
            )
        specs.append(spec)
    return specs, skipped


def _stream_id(stream: str) -> int:
    return int.from_bytes(stream.encode(), "big")


def eval_task_seed(run_seed: int, eval_seed: int, stream: str, index: int) -> int:
    """Seed of evaluation task ``index`` of ``stream`` (a setting name such as ``"A"``).

    Pure and machine independent. The values lie in [2^32, 2^64) while meta-training seeds
    (:func:`l3rs.meta.tasks.task_seed`) are 32-bit, so an evaluation task never repeats a meta-training task draw.
    """
    ss = np.random.SeedSequence([int(run_seed), EVAL_TAG, int(eval_seed), _stream_id(stream), int(index)])
    return _EVAL_SEED_OFFSET + int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def eval_task_seeds(cfg: Config, stream: str, num_tasks: int) -> list[int]:
    """The seeds of the first ``num_tasks`` tasks of ``stream`` for this config's ``run.seed`` and
    ``evaluate.seed``."""
    return [eval_task_seed(cfg.run.seed, cfg.evaluate.seed, stream, i) for i in range(num_tasks)]


def eval_distribution(cfg: Config, dataset: str, num_steps: int | None = None):
    """The meta-test task distribution of ``dataset``: its meta-test classes, eval batch from the test split.

    Every task carries ``num_steps`` (default: the largest K of the grid) training batches; shorter runs use a prefix
    of them, so the runs of one task at different K see the same first batches.
    """
    from l3rs.meta.tasks import TaskDistribution

    k = int(num_steps or max(cfg.evaluate.k_grid))
    return TaskDistribution(
        dataset=cfg.data.spec(dataset),
        stage="meta_test",
        num_classes=cfg.task.num_classes,
        batch_size=cfg.task.batch_size,
        eval_batch_size=cfg.task.eval_batch_size,
        k_min=k,
        k_max=k,
        data_dir=cfg.data.data_dir,
    )
