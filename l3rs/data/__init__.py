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
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from l3rs.data import glyphs

__all__ = ["ArraySplit", "DatasetSpec", "SPECS", "get_spec", "load", "normalize"]


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


class ArraySplit(NamedTuple):
    """One split in memory: ``images`` uint8 [N, H, W, C], ``labels`` int32 [N] (the dataset's own class ids)."""

    images: np.ndarray
    labels: np.ndarray


def normalize(images: Any) -> Any:
    """uint8 images -> float32 in about [-1, 1]. Works on numpy and jax arrays (inside ``jit`` too)."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


_SLICE = re.compile(r"^(?P<base>[\w-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def _parse_split(split: str) -> tuple[str, str | None, str | None]:
    match = _SLICE.match(split.replace(" ", ""))
    if not match:
        raise ValueError(f"split: {split!r} is not 'name' or 'name[start:stop]'.")
    return match["base"], match["start"], match["stop"]


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    return n * int(text[:-1]) // 100 if text.endswith("%") else int(text)


def load(
    name: str | DatasetSpec,
    split: str,
    *,
    data_dir: str | None = None,
    classes: Sequence[int] | None = None,
    download: bool = True,
) -> ArraySplit:
    """One split of a tfds dataset as uint8 arrays, optionally only the examples of ``classes``.

    The dataset is prepared on first use (the offline builders build in seconds; official datasets download) and read
    through ``tfds.data_source``, which needs no TensorFlow. ``split`` may slice, e.g. ``"train[:50000]"`` or
    ``"train[90%:]"``. Results are cached per process. ``name`` is a preset's name or a :class:`DatasetSpec` (whose
    ``name`` is the tfds name and ``image_shape`` the size of the returned images).

    Raises:
      ValueError: unknown dataset, a malformed split, or a class outside the dataset.
    """
    spec = get_spec(name)
    base, start, stop = _parse_split(split)
    if classes is not None:
        bad = [c for c in classes if not 0 <= int(c) < spec.num_classes]
        if bad:
            raise ValueError(f"classes: {bad} are not classes of {spec.name} (0..{spec.num_classes - 1}).")
    images, labels = _load_split(spec, base, data_dir or None, download)
    n = len(labels)
    sl = slice(_bound(start, n), _bound(stop, n))
    images, labels = images[sl], labels[sl]
    if classes is not None:
        keep = np.isin(labels, np.asarray(list(classes), np.int64))
        images, labels = images[keep], labels[keep]
    return ArraySplit(images, labels.astype(np.int32))


@functools.lru_cache(maxsize=16)
def _load_split(
    name: str | DatasetSpec, split: str, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    from l3rs.data import builders  # noqa: F401 - registers the offline builders with tfds

    spec = get_spec(name)
    builder = tfds.builder(spec.name, data_dir=data_dir, file_format="array_record")
    if not _prepared(builder):
        if not download and not spec.offline:
            raise FileNotFoundError(f"{spec.name} is not prepared in {builder.data_dir} and download=False.")
        _prepare_locked(builder)
        # A builder created before the data existed keeps its empty split list even once another process has
        # prepared the data (tfds reads dataset_info.json only when the builder is created): read it afresh.
        builder = tfds.builder(spec.name, data_dir=data_dir, file_format="array_record")
    source = builder.as_data_source(split=split)
    records = source.__getitems__(list(range(len(source))))
    # (image, label), or (image, label, sample weight) as places365_small declares: the first two name the features.
    image_key, label_key = (builder.info.supervised_keys or ("image", "label"))[:2]
    labels = np.asarray([r[label_key] for r in records], np.int64)
    images = _stack_images([r[image_key] for r in records], spec.image_shape)
    return images, labels


def _prepared(builder: Any) -> bool:
    return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _prepare_locked(builder: Any) -> None:
    """Prepares ``builder``'s dataset unless another process already has. Several processes on one machine may ask
    for the same dataset at once: the first prepares it (tfds writes into a temporary folder and renames it into
    place when complete), the others wait on a file lock and then find it prepared. Callers must create a new builder
    afterwards: this one may predate the data."""
    from filelock import FileLock

    root = os.path.dirname(os.path.dirname(os.path.abspath(builder.data_dir)))
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, f".{builder.name}.lock")):
        if not _prepared(builder):
            builder.download_and_prepare()


def _stack_images(images: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    out = np.empty((len(images), *shape), np.uint8)
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[..., None]
        out[i] = img if img.shape == shape else _resize(img, shape)
    return out


def _resize(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Center crop to the target aspect ratio, then area-average / nearest resample to (H, W); channels broadcast."""
    h, w = shape[:2]
    ih, iw = img.shape[:2]
    scale = min(ih / h, iw / w)
    ch, cw = int(round(h * scale)), int(round(w * scale))
    top, left = (ih - ch) // 2, (iw - cw) // 2
    crop = img[top : top + ch, left : left + cw].astype(np.float32)
    rows = (np.arange(h) + 0.5) * ch / h
    cols = (np.arange(w) + 0.5) * cw / w
    out = crop[rows.astype(np.int64).clip(0, ch - 1)][:, cols.astype(np.int64).clip(0, cw - 1)]
    if out.shape[-1] != shape[-1]:
        out = (
            np.broadcast_to(out.mean(-1, keepdims=True), (h, w, shape[-1]))
            if shape[-1] != 1
            else out.mean(-1, keepdims=True)
        )
    return np.round(out).clip(0, 255).astype(np.uint8)
