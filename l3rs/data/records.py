"""Reading a tfds image-classification dataset's records: builders (prepared on first use), split slices, and the
resize every image goes through. The lowest layer of :mod:`l3rs.data`: both the direct read of a split
(``l3rs.data._load_split``) and ``l3rs data prepare`` (:mod:`l3rs.data.cache`) decode records with these functions,
so the two give the same bytes.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ArraySplit", "parse_split", "split_bounds", "tfds_builder", "read_records", "stack_images"]


class ArraySplit(NamedTuple):
    """One split in memory: ``images`` uint8 [N, H, W, C], ``labels`` int32 [N] (the dataset's own class ids)."""

    images: np.ndarray
    labels: np.ndarray


_SLICE = re.compile(r"^(?P<base>[\w-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """``"train[:50000]"`` -> ``("train", None, "50000")``. Raises ValueError for anything but ``name`` or
    ``name[start:stop]`` (ends may be negative or percentages)."""
    match = _SLICE.match(split.replace(" ", ""))
    if not match:
        raise ValueError(f"split: {split!r} is not 'name' or 'name[start:stop]'.")
    return match["base"], match["start"], match["stop"]


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    return n * int(text[:-1]) // 100 if text.endswith("%") else int(text)


def split_bounds(split: str, n: int) -> tuple[str, int, int]:
    """``(base, start, stop)`` of ``split`` over a base split of ``n`` records, as Python slicing resolves them."""
    base, start, stop = parse_split(split)
    lo, hi, _ = slice(_bound(start, n), _bound(stop, n)).indices(n)
    return base, lo, max(lo, hi)


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


def tfds_builder(name: str, data_dir: str | None, download: bool, offline: bool) -> Any:
    """The tfds builder of dataset ``name`` (``"glyphs/small"`` names a config), prepared: the offline builders build
    in seconds, official datasets download (unless ``download`` is False: FileNotFoundError)."""
    import tensorflow_datasets as tfds

    from l3rs.data import builders  # noqa: F401 - registers the offline builders with tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not _prepared(builder):
        if not download and not offline:
            raise FileNotFoundError(f"{name} is not prepared in {builder.data_dir} and download=False.")
        _prepare_locked(builder)
        # A builder created before the data existed keeps its empty split list even once another process has
        # prepared the data (tfds reads dataset_info.json only when the builder is created): read it afresh.
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    return builder


def read_records(
    builder: Any, split: str, start: int = 0, stop: int | None = None, *, keep: Any = None,
    shape: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray | None, np.ndarray]:  # fmt: skip
    """Records ``start:stop`` of a (base) split through ``tfds.data_source`` (no TensorFlow needed for the offline
    builders): ``(images, labels)``, labels int64 of every record; images uint8 ``[M, *shape]`` of the records whose
    label is in ``keep`` (all when None), in record order, each resized by :func:`stack_images`; None if ``shape``
    is None."""
    source = builder.as_data_source(split=split)
    stop = len(source) if stop is None else stop
    records = source.__getitems__(list(range(start, stop)))
    # (image, label), or (image, label, sample weight) as places365_small declares: the first two name the features.
    image_key, label_key = (builder.info.supervised_keys or ("image", "label"))[:2]
    labels = np.asarray([r[label_key] for r in records], np.int64)
    if shape is None:
        return None, labels
    mask = np.ones(len(labels), bool) if keep is None else np.isin(labels, np.asarray(list(keep), np.int64))
    images = stack_images([r[image_key] for r, k in zip(records, mask, strict=True) if k], shape)
    return images, labels


def stack_images(images: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """``[N, *shape]`` uint8 of decoded images; each image of another size goes through :func:`resize` (so the
    result of an image does not depend on the others)."""
    out = np.empty((len(images), *shape), np.uint8)
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[..., None]
        out[i] = img if img.shape == shape else resize(img, shape)
    return out


def resize(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
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
