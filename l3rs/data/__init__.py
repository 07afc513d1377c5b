"""Datasets through tensorflow-datasets, their class splits, and the offline embedded default.

A dataset is a tfds name plus a :class:`DatasetSpec`: which classes pretrain the checkpoint, which form the
meta-training and meta-test tasks (paper §5: disjoint where the dataset has enough classes), and which tfds splits give
training batches, meta-training eval batches and meta-test eval batches. :func:`load` returns one split as in-memory
uint8 arrays (workers keep them on the device and gather batches by index inside the jitted loop).

Offline (this product's CPU default): ``fashion_mnist_debian`` (Debian's ``dataset-fashion-mnist``),
``sklearn_digits`` (shipped by scikit-learn) and ``glyphs`` (720 classes rendered from matplotlib's fonts,
:mod:`l3rs.data.glyphs`) are local tfds builders (:mod:`l3rs.data.builders`). With internet, any
official tfds dataset in :data:`SPECS` (``fashion_mnist``, ``cifar100``, ``imagenet2012``, ``places365_small``) is
downloaded and prepared by tfds itself.

The named specs are presets: :func:`l3rs.data.spec.resolve_spec` builds a spec for any tfds image-classification
dataset (class splits, image size, which splits play train / validation / test) and returns the preset itself when
nothing is overridden. Everything that takes a dataset name here also takes a :class:`DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs.data import glyphs
from l3rs.data.records import (
    ArraySplit,
    parse_split,
    read_records,
    resize,
    split_bounds,
    stack_images,
    tfds_builder,
)

# Older names of the record helpers (l3rs.data.spec and tests use them).
_parse_split, _resize, _stack_images = parse_split, resize, stack_images

__all__ = ["ArraySplit", "DatasetSpec", "SPECS", "get_spec", "load", "load_shared", "normalize"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How the product uses one tfds dataset.

    Attributes:
      name: tfds name.
      num_classes: classes of the dataset's label.
      image_shape: (H, W, C) of the arrays :func:`load` returns (images of another size are resized).
      pretrain_classes: classes the checkpoint θ0 is pretrained on.
      meta_train_classes: classes of meta-training tasks.
      meta_test_classes: classes of meta-test tasks (the same as meta-training where the dataset is too small to
        split further; the held-out tasks then differ in images, batches, head and K).
      train_split: tfds split of the training batches (also pretraining).
      valid_split: tfds split of the eval batch during meta-training (paper: the validation split).
      test_split: tfds split of the eval batch at meta-test time and of the pretraining accuracy.
      offline: True when the data comes with a package (no download).
      cache: where the class-indexed cache of this dataset lives (``data.cache``; :mod:`l3rs.data.cache`): a
        local path or an ``s3://`` / ``gs://`` URI written by ``l3rs data prepare``, or "" for a local cache
        next to the tfds data, prepared on first use. Not part of the dataset's identity (ignored by ``==``).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    pretrain_classes: tuple[int, ...]
    meta_train_classes: tuple[int, ...]
    meta_test_classes: tuple[int, ...]
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str = "test"
    offline: bool = False
    cache: str = dataclasses.field(default="", compare=False)

    def __str__(self) -> str:
        return self.name


def _imagenet_split() -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Paper §5: the first 500 classes pretrain; the other 500 are split at random into IMAGENET25 / IMAGENET25EVAL.
    rest = np.random.default_rng(0).permutation(np.arange(500, 1000))
    return tuple(sorted(int(c) for c in rest[:250])), tuple(sorted(int(c) for c in rest[250:]))


_IMAGENET_META_TRAIN, _IMAGENET_META_TEST = _imagenet_split()
_GLYPHS = glyphs.class_partition()  # 360 pretrain / 180 meta-train / 180 meta-test classes, pairwise disjoint

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # 10 classes: 5 pretrain, 5 for tasks (meta-train = meta-test classes; held-out tasks use the test split).
        DatasetSpec("fashion_mnist_debian", 10, (28, 28, 1), tuple(range(5)), tuple(range(5, 10)),
                    tuple(range(5, 10)), offline=True),
        DatasetSpec("fashion_mnist", 10, (28, 28, 1), tuple(range(5)), tuple(range(5, 10)), tuple(range(5, 10)),
                    train_split="train[:50000]", valid_split="train[50000:]"),
        DatasetSpec("sklearn_digits", 10, (16, 16, 1), tuple(range(5)), tuple(range(5, 10)), tuple(range(5, 10)),
                    offline=True),
        # Paper §5's three-way split on the offline default: pretrain, meta-train and meta-test classes disjoint.
        DatasetSpec("glyphs", glyphs.NUM_CLASSES, (28, 28, 1), *_GLYPHS, offline=True),
        DatasetSpec("cifar100", 100, (32, 32, 3), tuple(range(50)), tuple(range(50, 75)), tuple(range(75, 100)),
                    train_split="train[:45000]", valid_split="train[45000:]"),
        # Downsampled to 64x64 so that a worker holds its classes in memory (the paper trains at 224x224).
        DatasetSpec("imagenet2012", 1000, (64, 64, 3), tuple(range(500)), _IMAGENET_META_TRAIN,
                    _IMAGENET_META_TEST, train_split="train", valid_split="validation", test_split="validation"),
        # Paper §5: pretrain on the first 150 Places classes; the rest are PLACES25EVAL (meta-test only).
        DatasetSpec("places365_small", 365, (64, 64, 3), tuple(range(150)), tuple(range(150, 365)),
                    tuple(range(150, 365)), train_split="train", valid_split="validation",
                    test_split="validation"),
    )
}  # fmt: skip


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The preset :class:`DatasetSpec` called ``name`` (a spec is returned as is). Raises ValueError naming the
    known presets."""
    if isinstance(name, DatasetSpec):
        return name
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(SPECS)}.")
    return SPECS[name]


def normalize(images: Any) -> Any:
    """uint8 images -> float32 in about [-1, 1]. Works on numpy and jax arrays (inside ``jit`` too)."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def load(
    name: str | DatasetSpec,
    split: str,
    *,
    data_dir: str | None = None,
    classes: Sequence[int] | None = None,
    download: bool = True,
) -> ArraySplit:
    """One split of a tfds dataset as uint8 arrays, optionally only the examples of ``classes``, in record order.

    Read from the dataset's class-indexed cache (:mod:`l3rs.data.cache`): ``spec.cache`` when set (written by
    ``l3rs data prepare``; refused when absent, incomplete, or prepared for another dataset, class split or image
    size), else a local cache next to the tfds data, prepared on first use (the offline builders build in seconds;
    official datasets download). Only the classes asked for are read. ``split`` may slice, e.g.
    ``"train[:50000]"`` or ``"train[90%:]"``. A split or classes the cache does not hold (``classes=None`` on a
    spec whose class splits leave classes out, a split that is none of the spec's) are read straight from tfds.
    ``name`` is a preset's name or a :class:`DatasetSpec` (whose ``name`` is the tfds name and ``image_shape`` the
    size of the returned images). The arrays are the caller's own (writable); for arrays shared by every process of a
    machine see :func:`l3rs.data.cache.load_shared`.

    Raises:
      ValueError: unknown dataset, a malformed split, or a class outside the dataset.
      l3rs.data.cache.CacheError: an explicit ``spec.cache`` that cannot serve this spec (message names the field
        or the shard's URI).
    """
    from l3rs.data import cache

    return _served_or_direct(cache.load, name, split, classes, data_dir, download)


def _served_or_direct(
    reader: Any,
    name: str | DatasetSpec,
    split: str,
    classes: Sequence[int] | None,
    data_dir: str | None,
    download: bool,
) -> ArraySplit:
    """Checks the request, then answers it from the cache through ``reader`` (``l3rs.data.cache.load`` or
    ``load_shared``), or from tfds directly when the cache does not serve it."""
    spec = get_spec(name)
    parse_split(split)
    _check_classes(spec, classes)
    served = reader(spec, split, classes=classes, data_dir=data_dir or None, download=download)
    if served is not None:
        return served
    return _load_direct(spec, split, data_dir or None, download, classes)


def _check_classes(spec: DatasetSpec, classes: Sequence[int] | None) -> None:
    if classes is not None:
        bad = [c for c in classes if not 0 <= int(c) < spec.num_classes]
        if bad:
            raise ValueError(f"classes: {bad} are not classes of {spec.name} (0..{spec.num_classes - 1}).")


def _load_direct(
    spec: DatasetSpec, split: str, data_dir: str | None, download: bool, classes: Sequence[int] | None
) -> ArraySplit:
    """The split read straight from tfds (every record decoded; what :func:`load` did before the cache)."""
    images, labels = _load_split(spec, parse_split(split)[0], data_dir, download)
    _, lo, hi = split_bounds(split, len(labels))
    images, labels = images[lo:hi], labels[lo:hi]
    if classes is not None:
        keep = np.isin(labels, np.asarray(list(classes), np.int64))
        images, labels = images[keep], labels[keep]
    return ArraySplit(images, labels.astype(np.int32))


@functools.lru_cache(maxsize=4)
def _load_split(
    name: str | DatasetSpec, split: str, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a base split, decoded and resized: ``(images uint8 [N, H, W, C], labels int64 [N])``."""
    spec = get_spec(name)
    builder = tfds_builder(spec.name, data_dir, download, spec.offline)
    images, labels = read_records(builder, split, shape=spec.image_shape)
    return images, labels


def load_shared(
    name: str | DatasetSpec,
    split: str,
    *,
    classes: Sequence[int],
    data_dir: str | None = None,
    download: bool = True,
) -> ArraySplit:
    """:func:`load`'s arrays for the task pool of a worker: the same images and labels, but the images are a read-only
    memory map of one node-local file that every process on the machine asking for the same classes shares
    (:func:`l3rs.data.cache.load_shared`). A request the cache does not serve is answered by :func:`load`."""
    from l3rs.data import cache

    return _served_or_direct(cache.load_shared, name, split, classes, data_dir, download)
