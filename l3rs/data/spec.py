"""A :class:`~l3rs.data.DatasetSpec` for any tfds image-classification dataset, from a few config fields.

The named specs of :data:`l3rs.data.SPECS` are presets of this mechanism: :func:`resolve_spec` starts from the preset
named like the dataset (or the one ``preset`` names), overrides what the caller gives, and derives the rest of a
dataset without a preset from its tfds ``DatasetInfo`` (number of classes from the label feature, image shape from
the image feature, split names from the splits it has).

Class splits (``classes = {"pretrain": ..., "meta_train": ..., "meta_test": ...}``) each take:

- a list of class ids and ranges, ``[0, 1, "5:8"]`` (a range is ``"start:stop"``, stop exclusive, either end optional);
- a string of the same, ``"0:5"`` or ``"0:3, 7, 9"``;
- a fraction in (0, 1], ``0.5``: that share of the dataset's classes (rounded, at least one), taken in ascending order
  from the classes no other split names (fractions are filled in the order pretrain, meta_train, meta_test);
- ``"rest"``: every class the other splits leave.

Splits are pairwise disjoint (paper §5) unless ``allow_overlap`` is true. A preset's own layout is kept as it is: the
10-class presets share their meta-training and meta-test classes (their held-out tasks differ in images, batches, head
and K); the check applies to every pair in which the caller set at least one side.

    spec = resolve_spec("fashion_mnist_debian")                       # the preset itself (same object)
    spec = resolve_spec("sklearn_digits", classes={"pretrain": "0:4", "meta_train": [4, 5, 6], "meta_test": "rest"})
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from l3rs.data import SPECS, DatasetSpec, _parse_split

__all__ = ["CLASS_SPLITS", "NO_PRESET", "SpecError", "dataset_info_defaults", "parse_classes", "resolve_spec"]

CLASS_SPLITS = ("pretrain", "meta_train", "meta_test")
"""Keys of ``classes``; the spec fields are ``<key>_classes``."""

NO_PRESET = "none"
"""``preset = "none"``: ignore a preset named like the dataset and derive everything from its ``DatasetInfo``."""

_DEFAULT_FRACTIONS: dict[str, Any] = {"pretrain": 0.5, "meta_train": 0.25, "meta_test": "rest"}


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the config field (``data.…``)."""


def _ints_from_item(item: Any, num_classes: int, field: str) -> list[int]:
    if isinstance(item, bool):
        raise SpecError(f"{field}: {item!r} is not a class id.")
    if isinstance(item, int):
        return [item]
    if isinstance(item, str):
        text = item.strip()
        if ":" in text:
            start, _, stop = text.partition(":")
            try:
                lo = int(start) if start.strip() else 0
                hi = int(stop) if stop.strip() else num_classes
            except ValueError:
                raise SpecError(f"{field}: {item!r} is not a range 'start:stop'.") from None
            if hi <= lo:
                raise SpecError(f"{field}: the range {item!r} is empty.")
            return list(range(lo, hi))
        try:
            return [int(text)]
        except ValueError:
            raise SpecError(f"{field}: {item!r} is not a class id or a range 'start:stop'.") from None
    raise SpecError(f"{field}: {item!r} is not a class id or a range 'start:stop'.")


def parse_classes(value: Any, num_classes: int, field: str) -> tuple[int, ...] | float | str:
    """One class split as written: explicit ids (sorted tuple), a fraction (float) or ``"rest"``.

    Raises:
      SpecError: naming ``field``, for a malformed value, duplicates, or ids the dataset lacks (``0..num_classes-1``).
    """
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise SpecError(f"{field}: a fraction of the classes must lie in (0, 1], got {value!r}.")
        return float(value)
    if isinstance(value, str) and value.strip().lower() == "rest":
        return "rest"
    if isinstance(value, str):
        items: Sequence[Any] = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise SpecError(
            f"{field}: expected a list of classes, a range 'start:stop', a fraction or 'rest', got {value!r}."
        )
    ids: list[int] = []
    for item in items:
        ids += _ints_from_item(item, num_classes, field)
    if not ids:
        raise SpecError(f"{field}: names no classes.")
    lacking = sorted({c for c in ids if not 0 <= c < num_classes})
    if lacking:
        raise SpecError(f"{field}: the dataset has no classes {lacking[:8]} (its classes are 0..{num_classes - 1}).")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise SpecError(f"{field}: classes {dup[:8]} are listed more than once.")
    return tuple(sorted(ids))


def _allocate(
    given: Mapping[str, Any], num_classes: int, allow_overlap: bool, field_prefix: str
) -> dict[str, tuple[int, ...]]:
    """Turns parsed splits (ids, fractions, "rest") into class tuples."""
    out: dict[str, tuple[int, ...]] = {k: v for k, v in given.items() if isinstance(v, tuple)}
    taken = set().union(*out.values()) if out else set()
    cursor = 0
    for key in CLASS_SPLITS:
        value = given.get(key)
        if not isinstance(value, float):
            continue
        count = max(1, round(value * num_classes))
        free = [c for c in range(num_classes) if allow_overlap or c not in taken]
        free = [c for c in free if c >= cursor] if allow_overlap else free
        if len(free) < count:
            raise SpecError(
                f"{field_prefix}{key}: {value} of {num_classes} classes is {count} classes, but only {len(free)} are "
                "left by the other splits."
            )
        out[key] = tuple(free[:count])
        taken |= set(out[key])
        cursor = out[key][-1] + 1
    for key in CLASS_SPLITS:
        if given.get(key) == "rest":
            others = set().union(*(v for k, v in out.items() if k != key))
            rest = tuple(c for c in range(num_classes) if c not in others)
            if not rest:
                raise SpecError(f"{field_prefix}{key}: 'rest' is empty; the other splits take every class.")
            out[key] = rest
    return out


@functools.lru_cache(maxsize=32)
def _info_cached(dataset: str, data_dir: str) -> tuple[int, tuple[Any, ...], tuple[str, ...], bool]:
    import tensorflow_datasets as tfds

    from l3rs.data import builders  # noqa: F401 - registers the offline builders with tfds

    try:
        builder = tfds.builder(dataset, data_dir=data_dir or None)
    except Exception as e:  # tfds raises DatasetNotFoundError and friends
        raise SpecError(
            f"data.dataset: {dataset!r} is neither a preset ({sorted(SPECS)}) nor a tfds dataset this installation "
            f"knows ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
        ) from None
    info = builder.info
    image_key, label_key = (info.supervised_keys or ("image", "label"))[:2]  # places365_small has a third key
    if isinstance(image_key, dict | tuple | list) or label_key not in info.features or image_key not in info.features:
        raise SpecError(
            f"data.dataset: {dataset!r} is not an image-classification dataset (supervised keys "
            f"{info.supervised_keys!r}; features {sorted(info.features)})."
        )
    label = info.features[label_key]
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise SpecError(f"data.dataset: {dataset!r}'s label feature {label_key!r} is not a ClassLabel.")
    shape = tuple(info.features[image_key].shape)
    offline = any(s.offline and s.name == dataset for s in SPECS.values())
    return int(num_classes), shape, tuple(info.splits.keys()), offline


def dataset_info_defaults(dataset: str, data_dir: str = "") -> dict[str, Any]:
    """What ``DatasetInfo`` says of a tfds dataset: ``num_classes``, ``image_shape`` (may hold None for variable
    sizes), ``splits`` (empty until the dataset is prepared) and ``offline``. Needs no download."""
    num_classes, shape, splits, offline = _info_cached(dataset, data_dir)
    return {"num_classes": num_classes, "image_shape": shape, "splits": splits, "offline": offline}


def _image_shape(image_size: Sequence[int], base: tuple[Any, ...] | None, dataset: str) -> tuple[int, int, int]:
    size = tuple(image_size or ())
    if size and (len(size) not in (2, 3) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                    for d in size)):  # fmt: skip
        raise SpecError(f"data.image_size: expected [height, width] or [height, width, channels], got {list(size)}.")
    base = tuple(base or ())
    if len(base) == 2:
        base = (*base, 1)
    channels = size[2] if len(size) == 3 else (base[2] if len(base) == 3 else None)
    hw = size[:2] if size else base[:2]
    if len(hw) != 2 or any(d is None for d in hw):
        raise SpecError(
            f"data.image_size: {dataset}'s images have no fixed size ({base}); set data.image_size = [height, width]."
        )
    if channels is None:
        channels = 3
    return int(hw[0]), int(hw[1]), int(channels)


def _check_split(value: str, field: str, known: Sequence[str]) -> str:
    try:
        base, _, _ = _parse_split(value)
    except ValueError as e:
        raise SpecError(f"{field}: {e}") from None
    if known and base not in known:
        raise SpecError(f"{field}: the dataset has no split {base!r}; it has {sorted(known)}.")
    return value


def resolve_spec(
    dataset: str,
    *,
    preset: str = "",
    classes: Mapping[str, Any] | None = None,
    allow_overlap: bool = False,
    image_size: Sequence[int] = (),
    train_split: str = "",
    valid_split: str = "",
    test_split: str = "",
    data_dir: str = "",
) -> DatasetSpec:
    """The :class:`DatasetSpec` these settings describe.

    Args:
      dataset: a tfds name (a preset's name picks that preset unless ``preset`` says otherwise).
      preset: "" (the preset named ``dataset``, if any), a name in :data:`l3rs.data.SPECS`, or ``"none"``.
      classes: overrides of the class splits (keys ``pretrain``, ``meta_train``, ``meta_test``; see the module doc).
        Splits it leaves out come from the preset, or default to ``0.5``, ``0.25`` and ``"rest"``.
      allow_overlap: allow a class in more than one split.
      image_size: ``[H, W]`` or ``[H, W, C]`` of the arrays the workers hold (images are resized); default the
        preset's, else the dataset's own size (channels from the image feature).
      train_split, valid_split, test_split: tfds splits (slices allowed, e.g. ``"train[:90%]"``); default the preset's,
        else ``train`` / ``validation`` / ``test`` where the dataset has them (``train[:90%]`` / ``train[90%:]`` when it
        has no validation split, the validation split when it has no test split).
      data_dir: tfds data_dir, for reading ``DatasetInfo``.

    Returns:
      The preset itself (the same object) when nothing is overridden; otherwise a new spec.

    Raises:
      SpecError: naming the field (``data.dataset``, ``data.preset``, ``data.classes.<split>``, ``data.image_size``,
        ``data.<x>_split``): unknown dataset or preset, classes the dataset lacks, splits that overlap, a split name
        the dataset lacks, or images without a fixed size and no ``image_size``.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise SpecError("data.dataset: a tfds dataset name or a preset name is required.")
    classes = dict(classes or {})
    unknown = sorted(set(classes) - set(CLASS_SPLITS))
    if unknown:
        raise SpecError(f"data.classes.{unknown[0]}: unknown class split; known: {list(CLASS_SPLITS)}.")
    if preset == NO_PRESET:
        base = None
    elif preset:
        if preset not in SPECS:
            raise SpecError(f"data.preset: unknown preset {preset!r}; known: {sorted(SPECS)} or {NO_PRESET!r}.")
        base = SPECS[preset]
    else:
        base = SPECS.get(dataset)
    overrides = bool(classes or allow_overlap or image_size or train_split or valid_split or test_split)
    if base is not None and base.name == dataset and not overrides:
        return base

    if base is not None:
        num_classes, native_shape, known_splits = base.num_classes, base.image_shape, ()
        offline = base.offline and base.name == dataset
        splits = {"train": base.train_split, "valid": base.valid_split, "test": base.test_split}
        inherited = {k: getattr(base, f"{k}_classes") for k in CLASS_SPLITS}
    else:
        info = dataset_info_defaults(dataset, data_dir)
        num_classes, native_shape, known_splits = info["num_classes"], info["image_shape"], info["splits"]
        offline = info["offline"]
        has = set(known_splits)
        if not has or {"validation", "test"} <= has:
            splits = {"train": "train", "valid": "validation", "test": "test"}
        elif "validation" in has:
            splits = {"train": "train", "valid": "validation", "test": "validation"}
        elif "test" in has:
            splits = {"train": "train[:90%]", "valid": "train[90%:]", "test": "test"}
        else:
            splits = {"train": "train[:80%]", "valid": "train[80%:90%]", "test": "train[90%:]"}
        inherited = {}

    parsed = {k: parse_classes(v, num_classes, f"data.classes.{k}") for k, v in classes.items()}
    for key in CLASS_SPLITS:
        if key not in parsed:
            parsed[key] = inherited[key] if key in inherited else _DEFAULT_FRACTIONS[key]
    resolved = _allocate(parsed, num_classes, allow_overlap, "data.classes.")
    if not allow_overlap:
        for i, a in enumerate(CLASS_SPLITS):
            for b in CLASS_SPLITS[i + 1 :]:
                if a in inherited and b in inherited and a not in classes and b not in classes:
                    continue  # the preset's own layout
                shared = sorted(set(resolved[a]) & set(resolved[b]))
                if shared:
                    field = b if b in classes else a
                    other = a if field == b else b
                    raise SpecError(
                        f"data.classes.{field}: classes {shared[:8]} are also in the {other} split; class splits "
                        "must be disjoint (set data.allow_overlap = true to share classes on purpose)."
                    )

    image_shape = _image_shape(image_size, native_shape, dataset)
    train = _check_split(train_split or splits["train"], "data.train_split", known_splits)
    valid = _check_split(valid_split or splits["valid"], "data.valid_split", known_splits)
    test = _check_split(test_split or splits["test"], "data.test_split", known_splits)
    return DatasetSpec(
        name=dataset,
        num_classes=num_classes,
        image_shape=image_shape,
        pretrain_classes=resolved["pretrain"],
        meta_train_classes=resolved["meta_train"],
        meta_test_classes=resolved["meta_test"],
        train_split=train,
        valid_split=valid,
        test_split=test,
        offline=offline,
    )


def spec_key(**settings: Any) -> str:
    """A canonical string of :func:`resolve_spec`'s keyword arguments (for caching)."""
    return json.dumps(settings, sort_keys=True, default=list)
