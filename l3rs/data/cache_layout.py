"""The on-disk format of the class-indexed data cache (:mod:`l3rs.data.cache`): names, identity, manifest, checksums.

Shared by the writer (:mod:`l3rs.data.cache_prepare`) and the readers (:mod:`l3rs.data.cache`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.data.records import parse_split

__all__ = [
    "CLASS_SPLITS",
    "FORMAT",
    "MANIFEST",
    "CacheError",
    "cache_uri",
    "check_identity",
    "default_uri",
    "identity",
    "read_manifest",
    "shard_name",
    "stored_classes",
]

DatasetSpec = Any  # an l3rs.data.DatasetSpec (not imported: l3rs.data imports the cache modules)

FORMAT = "l3rs-data-cache/1"
MANIFEST = "manifest.json"
PLAN = "prepare.json"
PARTS = "_parts"
CLASS_SPLITS = ("pretrain", "meta_train", "meta_test")
SPLIT_FIELDS = (("train_split", "data.train_split"), ("valid_split", "data.valid_split"),
                ("test_split", "data.test_split"))  # fmt: skip


class CacheError(ValueError):
    """A cache that cannot serve a config: one line naming the config field (``data.…``) or the shard's URI."""


# ---------------------------------------------------------------------------------------------------------------
# identity and locations
# ---------------------------------------------------------------------------------------------------------------
def identity(spec: DatasetSpec) -> dict[str, Any]:
    """What a cache must match to serve ``spec``: dataset, image shape, class split, and the base splits stored."""
    return {
        "dataset": spec.name,
        "image_shape": [int(d) for d in spec.image_shape],
        "classes": {k: [int(c) for c in getattr(spec, f"{k}_classes")] for k in CLASS_SPLITS},
        "splits": sorted({parse_split(getattr(spec, f))[0] for f, _ in SPLIT_FIELDS}),
    }


def stored_classes(ident: dict[str, Any]) -> list[int]:
    """The classes a cache holds: every class of the class split."""
    return sorted({c for k in CLASS_SPLITS for c in ident["classes"][k]})


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def default_uri(spec: DatasetSpec, data_dir: str | None = None) -> str:
    """The local cache of ``spec`` used when ``data.cache`` is empty: ``<data_dir>/l3rs_cache/<dataset>-<key>``
    (``data_dir`` default: ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``, as tfds)."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    name = spec.name.replace("/", "_")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "l3rs_cache", f"{name}-{_key(identity(spec))[:12]}")


def cache_uri(spec: DatasetSpec, data_dir: str | None = None) -> str:
    """Where ``spec``'s cache lives: ``spec.cache``, else :func:`default_uri`."""
    return spec.cache or default_uri(spec, data_dir)


def shard_name(split: str, cls: int) -> str:
    """The shard of class ``cls`` in base split ``split``, relative to the cache."""
    return f"{split}/class-{int(cls):05d}.npy"


def check_identity(found: dict[str, Any], spec: DatasetSpec, uri: str) -> None:
    """Refuses a cache prepared for another dataset, image size, class split, or without one of the spec's splits.

    Raises:
      CacheError: naming the first config field that differs.
    """
    want = identity(spec)
    fix = ("point data.cache at a cache prepared for this config, or prepare one: `l3rs data prepare --config ...` "
           "with a new data.cache")  # fmt: skip
    if found.get("dataset") != want["dataset"]:
        raise CacheError(f"data.dataset: the cache at {uri} holds {found.get('dataset')!r}, the config reads "
                         f"{want['dataset']!r}; {fix}.")  # fmt: skip
    if list(found.get("image_shape", [])) != want["image_shape"]:
        raise CacheError(f"data.image_size: the cache at {uri} holds {found.get('image_shape')} images, the config "
                         f"wants {want['image_shape']}; {fix}.")  # fmt: skip
    for k in CLASS_SPLITS:
        have, need = list(found.get("classes", {}).get(k, [])), want["classes"][k]
        if have != need:
            raise CacheError(f"data.classes.{k}: the cache at {uri} was prepared for {k} classes "
                             f"{_short(have)}, the config has {_short(need)}; {fix}.")  # fmt: skip
    for attr, field in SPLIT_FIELDS:
        base = parse_split(getattr(spec, attr))[0]
        if base not in found.get("splits", []):
            raise CacheError(f"{field}: the cache at {uri} has no split {base!r} (it has {found.get('splits')}); "
                             f"{fix}.")  # fmt: skip


def _short(classes: Sequence[int]) -> str:
    classes = list(classes)
    return str(classes) if len(classes) <= 8 else f"[{', '.join(map(str, classes[:6]))}, ... ({len(classes)} classes)]"


# ---------------------------------------------------------------------------------------------------------------
# bytes in and out
# ---------------------------------------------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _sha256_uri(uri: str) -> tuple[str, int]:
    """(sha256, size) of a file, streamed."""
    fs, path = storage._resolve(uri)  # noqa: SLF001 - the storage layer's own resolver
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _write(uri: str, data: bytes) -> dict[str, Any]:
    storage.write_bytes_atomic(uri, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _read_verified(uri: str, entry: dict[str, Any], what: str) -> bytes:
    """The bytes of a cache file whose manifest entry is ``entry``; CacheError naming the URI if it is missing or
    its checksum differs."""
    try:
        data = storage.read_bytes(uri)
    except OSError as e:
        if isinstance(e, FileNotFoundError) or not storage.exists(uri):
            raise CacheError(
                f"data.cache: {what} {uri} is missing (the manifest lists it): rerun `l3rs data prepare`."
            ) from None
        raise CacheError(f"data.cache: cannot read {what} {uri}: {e}") from None
    _check_sum(uri, hashlib.sha256(data).hexdigest(), len(data), entry, what)
    return data


def _check_sum(uri: str, digest: str, size: int, entry: dict[str, Any], what: str) -> None:
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise CacheError(
            f"data.cache: {what} {uri} is corrupt (sha256 {digest[:12]}..., {size} bytes; the manifest says "
            f"{entry['sha256'][:12]}..., {entry['bytes']} bytes): rerun `l3rs data prepare` to rewrite it."
        )


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the cache at ``uri`` (with ``"_sha256"``: the manifest's own checksum, which names the
    cache's content). Cached per process.

    Raises:
      CacheError: no cache there, a half-written one ("incomplete: rerun `l3rs data prepare`"), or not a cache.
    """
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST))
    except (OSError, ValueError):
        if storage.exists(storage.join(uri, PLAN)) or storage.exists(storage.join(uri, PARTS)):
            raise CacheError(f"data.cache: cache at {uri} is incomplete: rerun `l3rs data prepare`.") from None
        raise CacheError(f"data.cache: no cache at {uri}: run `l3rs data prepare --config ...` first.") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"data.cache: {storage.join(uri, MANIFEST)} is not an l3rs data cache manifest ({FORMAT}).")
    manifest["_sha256"] = hashlib.sha256(raw).hexdigest()
    return manifest
