"""Fine-tuning tasks (paper §2, §5): T = (θ0, K training batches, one evaluation batch) over N held-out classes.

A task is a pure function of (task seed, task distribution): the same seed gives the same classes, K, head
initialisation, training batches and evaluation batch on any machine. Tasks index into a :class:`TaskPool`, the
images of the distribution's classes, which a worker loads once and keeps on its device.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from l3rs.data import DatasetSpec

__all__ = [
    "TaskDistribution",
    "TaskPool",
    "Task",
    "sample_task",
    "task_header",
    "load_task_pool",
    "task_seed",
]

Stage = Literal["meta_train", "meta_test"]


@dataclasses.dataclass(frozen=True)
class TaskDistribution:
    """Which tasks to sample.

    Attributes:
      dataset: a preset's name or a :class:`l3rs.data.DatasetSpec` (see ``l3rs.data.get_spec``).
      stage: ``"meta_train"`` (classes ``meta_train_classes``; eval batch from the valid split) or ``"meta_test"``
        (classes ``meta_test_classes``; eval batch from the test split, images never seen in meta-training).
      num_classes: N, the task's way.
      batch_size, eval_batch_size: 64 and 256 in the paper.
      k_min, k_max: K ~ U[k_min, k_max] (inclusive): the horizon the optimizer is told.
      data_dir: tfds data_dir ("" = default).
      truncation_prob: probability that a task's run is cut short of the K the optimizer is told (issue 11): such
        a task runs K_run ~ U[min(k_min, K), K] steps (inclusive) while the optimizer's time features use K, so
        meta-training rewards an optimizer that is good at every point of its schedule, not only at its end. The
        draw comes from its own seed stream, so ``truncation_prob = 0`` (the default) samples exactly the tasks
        it always did.
    """

    dataset: str | DatasetSpec
    stage: Stage = "meta_train"
    num_classes: int = 5
    batch_size: int = 64
    eval_batch_size: int = 256
    k_min: int = 10
    k_max: int = 100
    data_dir: str = ""
    truncation_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in ("meta_train", "meta_test"):
            raise ValueError(f"stage: {self.stage!r} must be 'meta_train' or 'meta_test'.")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"k_min/k_max: need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}.")
        p = self.truncation_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"truncation_prob: must be a number in [0, 1], got {p!r}.")

    def classes(self) -> tuple[int, ...]:
        from l3rs.data import get_spec

        spec = get_spec(self.dataset)
        return tuple(spec.meta_train_classes if self.stage == "meta_train" else spec.meta_test_classes)


class TaskPool(NamedTuple):
    """The images a worker holds for one task distribution (uint8, so ~1 byte per pixel on the device).

    ``train_*`` come from the dataset's train split, ``eval_*`` from the valid (meta-train) or test (meta-test)
    split; labels are the dataset's original labels.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray


class Task(NamedTuple):
    """One task, as index arrays into a :class:`TaskPool`.

    ``train_idx``/``train_y`` have ``k_max`` rows so every task of a distribution has the same shapes (one
    compile); only the first ``num_steps`` rows are used. Labels are task labels 0..N-1: the position of the
    original class in ``classes``. ``told_steps`` is the horizon K the optimizer is told (None: ``num_steps``);
    it exceeds ``num_steps`` for a task cut short (``TaskDistribution.truncation_prob``).
    """

    seed: int
    classes: np.ndarray  # [N] original labels, in task-label order
    num_steps: int  # K
    head_seed: int  # seeds the fresh N-way head
    train_idx: np.ndarray  # [k_max, B] int32 into pool.train_*
    train_y: np.ndarray  # [k_max, B] int32
    eval_idx: np.ndarray  # [E] int32 into pool.eval_*
    eval_y: np.ndarray  # [E] int32
    told_steps: int | None = None  # K the optimizer is told (None = num_steps)


def task_seed(run_seed: int, generation: int, index: int) -> int:
    """The seed of task ``index`` of a generation: a pure function, stable across machines and restarts."""
    return int(np.random.SeedSequence([run_seed, generation, index]).generate_state(1, np.uint32)[0])


def load_task_pool(dist: TaskDistribution) -> TaskPool:
    """Loads the images of the distribution's classes (train split + its eval split) from the dataset's cache; the
    images are shared by every process of the machine (:func:`l3rs.data.load_shared`)."""
    from l3rs.data import get_spec, load_shared

    spec = get_spec(dist.dataset)
    classes = list(dist.classes())
    eval_split = spec.valid_split if dist.stage == "meta_train" else spec.test_split
    data_dir = dist.data_dir or None
    train = load_shared(dist.dataset, spec.train_split, data_dir=data_dir, classes=classes)
    ev = load_shared(dist.dataset, eval_split, data_dir=data_dir, classes=classes)
    return TaskPool(train.images, train.labels.astype(np.int32), ev.images, ev.labels.astype(np.int32))


def _per_class(labels: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in classes]


def _header(rng: np.random.Generator, dist: TaskDistribution) -> tuple[np.ndarray, int, int]:
    all_classes = np.asarray(dist.classes(), np.int64)
    if dist.num_classes > len(all_classes):
        raise ValueError(
            f"num_classes: {dist.num_classes}-way tasks need more than the {len(all_classes)} classes of "
            f"{dist.dataset}'s {dist.stage} split."
        )
    # Random classes in random order: the task label of a class differs from task to task.
    classes = rng.permutation(all_classes)[: dist.num_classes]
    num_steps = int(rng.integers(dist.k_min, dist.k_max + 1))
    head_seed = int(rng.integers(0, 2**31 - 1))
    return classes, num_steps, head_seed


# Tag of the truncation draw's own seed stream ("trnc"): SeedSequence([task seed, tag]).
_TRUNCATION_TAG = int.from_bytes(b"trnc", "big")


def _run_steps(seed: int, dist: TaskDistribution, told: int) -> int:
    """How many steps the task with this seed runs: ``told``, or with ``dist.truncation_prob`` a cut-short
    K_run ~ U[min(k_min, told), told]. Drawn from its own stream, so the other draws of the task never change."""
    if dist.truncation_prob <= 0.0:
        return told
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TRUNCATION_TAG]))
    if rng.random() >= dist.truncation_prob:
        return told
    return int(rng.integers(min(dist.k_min, told), told + 1))


def task_header(seed: int, dist: TaskDistribution) -> tuple[np.ndarray, int]:
    """(classes, steps run) of the task with this seed, without touching any data (the driver's cost estimate)."""
    classes, num_steps, _ = _header(np.random.default_rng(seed), dist)
    return classes, _run_steps(seed, dist, num_steps)


def sample_task(seed: int, dist: TaskDistribution, pool: TaskPool) -> Task:
    """Samples the task with this seed. Pure: depends only on (seed, dist, pool contents)."""
    rng = np.random.default_rng(seed)
    classes, num_steps, head_seed = _header(rng, dist)

    train_sets = _per_class(pool.train_labels, classes)
    eval_sets = _per_class(pool.eval_labels, classes)
    for c, tr, ev in zip(classes, train_sets, eval_sets, strict=True):
        if len(tr) == 0 or len(ev) == 0:
            raise ValueError(f"class {int(c)} has no images in the task pool of {dist.dataset} ({dist.stage}).")

    # Training batches: each example drawn uniformly over the task's images (with replacement across the run).
    train_all = np.concatenate(train_sets)
    train_lab = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(train_sets)])
    pick = rng.integers(0, len(train_all), size=(dist.k_max, dist.batch_size))
    # Evaluation batch: without replacement where the eval pool is large enough.
    eval_all = np.concatenate(eval_sets)
    eval_lab = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(eval_sets)])
    replace = len(eval_all) < dist.eval_batch_size
    epick = rng.choice(len(eval_all), size=dist.eval_batch_size, replace=replace)
    return Task(
        seed=int(seed),
        classes=classes.astype(np.int32),
        num_steps=_run_steps(seed, dist, num_steps),
        head_seed=head_seed,
        train_idx=train_all[pick].astype(np.int32),
        train_y=train_lab[pick],
        eval_idx=eval_all[epick].astype(np.int32),
        eval_y=eval_lab[epick],
        told_steps=num_steps,
    )
