"""The class-indexed cache of a dataset: prepared once, read one class at a time, shared by every process of a node.

``l3rs data prepare --config X`` (or :func:`prepare`) decodes the tfds dataset of a config once and writes, at a
storage URI (local path, ``s3://``, ``gs://``: :mod:`l3rs.storage`)::

    <uri>/prepare.json                  what is being prepared (written first: a later prepare resumes only this)
    <uri>/<split>/class-00042.npy       uint8 [n, H, W, C]: the images of class 42 in <split>, in record order
    <uri>/<split>/class-00042.npy.sha256  its checksum (JSON), written right after it: what a resume trusts
    <uri>/<split>/labels.npy            int32 [N]: the label of every record of <split>, in record order
    <uri>/manifest.json                 written last: dataset (name, version, config), image shape, class split,
                                        splits, and every shard's count, shape, bytes and sha256

Only the classes of the spec's class splits and the base splits of its train / valid / test splits are stored
(slices such as ``train[:50000]`` are applied when reading). Images are decoded and resized exactly as
:func:`l3rs.data.load` always did (:mod:`l3rs.data.records`), so a class read from the cache holds the same images in
the same order as the direct read: tasks, ψ and test results do not change.

Preparing (:mod:`l3rs.data.cache_prepare`; the format's names and checks: :mod:`l3rs.data.cache_layout`) runs in
two steps, each a list of independent tasks that ``map_fn`` may run in parallel (``l3rs data
prepare`` runs them as Ray tasks when it is connected to a cluster, :mod:`l3rs.service.dataprep`): (1) every chunk of
consecutive records (aligned with the dataset's own file shards) is decoded, resized, sorted by class and written to
``<uri>/_parts/``; (2) every group of classes gathers its rows from the parts into class shards. Every file is written
atomically; a rerun skips the parts and shards already written whose checksum verifies, and the manifest comes last,
so a half-written cache is refused ("incomplete: rerun `l3rs data prepare`").

Checksums are verified whenever bytes are copied out of the cache (:func:`load`, and :func:`load_shared` once per
node) and by :func:`verify` (``l3rs data verify``, and the run's pre-flight check, which hashes the shards the run
needs once before any worker starts). Node pool files (below) are written from verified bytes and not hashed again.

Reading: :func:`load` returns a split's classes as the caller's own arrays. :func:`load_shared` (what a meta-training
or evaluation worker holds) writes the requested classes of a split once per machine, in record order, to a
node-local ``.npy`` (``L3RS_NODE_CACHE``, default ``<tmp>/l3rs-node-cache-<uid>``) and returns it memory-mapped
read-only: every process on the node maps the same pages of the OS page cache, so a node holds one copy of the classes
its workers need however many workers it runs (JAX on CPU uses read-only arrays without copying them; on a GPU the
copy is in device memory). No Ray here: the same path serves local runs, tests and cluster workers.

An empty ``data.cache`` means a local cache next to the tfds data (``<data_dir>/l3rs_cache/<dataset>-<key>``, key =
hash of the dataset, image size, class split and splits), prepared on first use by whichever process asks first (file
lock); that is how the embedded datasets are read every day. An explicit ``data.cache`` is never prepared implicitly.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.data.cache_layout import (
    FORMAT,
    MANIFEST,
    CacheError,
    DatasetSpec,
    _check_sum,
    _from_npy,
    _key,
    _npy_bytes,
    _read_verified,
    _sha256_uri,
    cache_uri,
    check_identity,
    default_uri,
    identity,
    read_manifest,
    shard_name,
    stored_classes,
)
from l3rs.data.cache_prepare import ChunkTask, ClassTask, MapFn, prepare, prepare_chunk, prepare_classes
from l3rs.data.records import ArraySplit, parse_split, split_bounds

__all__ = [
    "FORMAT",
    "MANIFEST",
    "NODE_CACHE_ENV",
    "CacheError",
    "ChunkTask",
    "ClassTask",
    "DataCache",
    "MapFn",
    "cache_uri",
    "check_identity",
    "default_uri",
    "identity",
    "load",
    "load_shared",
    "needed_shards",
    "node_cache_dir",
    "open_cache",
    "prepare",
    "prepare_chunk",
    "prepare_classes",
    "read_manifest",
    "shard_name",
    "verify",
]

NODE_CACHE_ENV = "L3RS_NODE_CACHE"


class DataCache:
    """A prepared cache checked against a spec: reads split labels and class shards (verifying their checksums)."""

    def __init__(self, uri: str, manifest: dict[str, Any]) -> None:
        self.uri = uri
        self.manifest = manifest
        self.sha256: str = manifest["_sha256"]
        self.image_shape = tuple(manifest["image_shape"])
        self.classes = set(stored_classes(manifest["identity"]))

    def shard_uri(self, split: str, cls: int) -> str:
        return storage.join(self.uri, shard_name(split, cls))

    def split_labels(self, split: str) -> np.ndarray:
        """int32 label of every record of base split ``split``, in record order (read-only, cached)."""
        return _labels(self.uri, self.sha256, split, json.dumps(self.manifest["splits"][split]["labels"]))

    def class_images(self, split: str, cls: int) -> np.ndarray:
        """uint8 ``[n, H, W, C]``: the images of class ``cls`` in ``split``, in record order; checksum verified.

        Raises:
          CacheError: the class is not in the cache, or its shard is missing (naming the shard's URI) or corrupt.
        """
        name = shard_name(split, cls)
        entry = self.manifest["shards"].get(name)
        if entry is None:
            raise CacheError(f"data.cache: the cache at {self.uri} holds no class {int(cls)} in {split!r}.")
        return _from_npy(_read_verified(self.shard_uri(split, cls), entry, "shard"))

    def _positions(self, split: str, classes: Sequence[int] | None) -> tuple[str, np.ndarray, np.ndarray, int, int]:
        base = parse_split(split)[0]
        labels_all = self.split_labels(base)
        _, lo, hi = split_bounds(split, len(labels_all))
        want = np.asarray(sorted(self.classes if classes is None else {int(c) for c in classes}), np.int64)
        positions = lo + np.flatnonzero(np.isin(labels_all[lo:hi], want))
        return base, labels_all, positions, lo, hi

    def gather_labels(self, split: str, classes: Sequence[int] | None) -> np.ndarray:
        """The int32 labels :meth:`gather` returns, without reading any image."""
        _, labels_all, positions, _, _ = self._positions(split, classes)
        return labels_all[positions].astype(np.int32)

    def gather(self, split: str, classes: Sequence[int] | None, allocate: Callable[[int], np.ndarray]) -> ArraySplit:
        """The records of ``split`` (a base split or a slice of one) whose label is in ``classes`` (None: every stored
        class), in record order, written into ``allocate(n)`` (an ``[n, H, W, C]`` uint8 array)."""
        base, labels_all, positions, lo, hi = self._positions(split, classes)
        out = allocate(len(positions))
        order = np.argsort(labels_all, kind="stable")  # record positions grouped by class, in record order
        bounds = np.searchsorted(labels_all[order], np.arange(labels_all.max(initial=-1) + 2))
        for c in np.unique(labels_all[positions]):
            rows = order[bounds[c] : bounds[c + 1]]  # record positions of the shard's rows
            a, b = np.searchsorted(rows, lo), np.searchsorted(rows, hi)
            out[np.searchsorted(positions, rows[a:b])] = self.class_images(base, int(c))[a:b]
        return ArraySplit(out, labels_all[positions].astype(np.int32))


@functools.lru_cache(maxsize=8)
def _labels(uri: str, sha: str, split: str, entry: str) -> np.ndarray:
    labels = _from_npy(_read_verified(storage.join(uri, split, "labels.npy"), json.loads(entry), "label index"))
    labels.setflags(write=False)
    return labels


def open_cache(spec: DatasetSpec, data_dir: str | None = None, download: bool = True) -> DataCache:
    """``spec``'s cache, checked against it. The default local cache (``spec.cache`` empty) is prepared here on
    first use (under a file lock: the first process prepares, the others wait); an explicit one must exist.

    Raises:
      CacheError: missing, incomplete or foreign (naming the field) explicit cache.
    """
    uri = cache_uri(spec, data_dir)
    if not spec.cache and not storage.exists(storage.join(uri, MANIFEST)):
        from filelock import FileLock

        os.makedirs(os.path.dirname(uri), exist_ok=True)
        with FileLock(uri + ".lock"):
            if not storage.exists(storage.join(uri, MANIFEST)):
                prepare(spec, uri, data_dir=data_dir, download=download)
        read_manifest.cache_clear()
    manifest = read_manifest(uri)
    check_identity(manifest["identity"], spec, uri)
    return DataCache(uri, manifest)


def _servable(spec: DatasetSpec, split: str, classes: Sequence[int] | None) -> bool:
    ident = identity(spec)
    if parse_split(split)[0] not in ident["splits"]:
        return False
    stored = set(stored_classes(ident))
    if classes is None:
        return stored == set(range(spec.num_classes))
    return {int(c) for c in classes} <= stored


def load(
    spec: DatasetSpec, split: str, *, classes: Sequence[int] | None = None, data_dir: str | None = None,
    download: bool = True,
) -> ArraySplit | None:  # fmt: skip
    """``split``'s records of ``classes`` (None: all) from ``spec``'s cache, as new writable arrays in record order;
    None when the default cache cannot serve the request (a split or classes it does not store: read them straight
    from tfds instead). Raises CacheError when an explicit ``spec.cache`` cannot."""
    if not _servable(spec, split, classes):
        if spec.cache:
            raise CacheError(
                f"data.cache: the cache at {spec.cache} stores splits {identity(spec)['splits']} and the classes of "
                f"the class split; {split!r} of classes {classes} is not among them."
            )
        return None
    cache = open_cache(spec, data_dir, download)
    return cache.gather(split, classes, lambda n: np.empty((n, *cache.image_shape), np.uint8))


def node_cache_dir() -> str:
    """This machine's folder of shared pool files: ``L3RS_NODE_CACHE``, else ``<tmp>/l3rs-node-cache-<uid>``."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.environ.get(NODE_CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"l3rs-node-cache-{uid}")


def load_shared(
    spec: DatasetSpec, split: str, *, classes: Sequence[int], data_dir: str | None = None, download: bool = True
) -> ArraySplit | None:
    """Like :func:`load`, but the images are one node-local file per (cache, split, classes), memory-mapped
    read-only, so every process on this machine that asks for the same classes shares one copy (the OS page cache).

    The first process to ask writes the file (under a file lock, from shards whose checksums it verifies; atomically:
    written under a temporary name, then renamed); the others wait for it and map it. None for a request the default
    cache does not serve (as :func:`load`). Pool files unused for ``NODE_CACHE_KEEP_S`` (3 days) are removed when a
    new one is written.
    """
    if not _servable(spec, split, classes):
        return load(spec, split, classes=classes, data_dir=data_dir, download=download)  # None, or CacheError
    cache = open_cache(spec, data_dir, download)
    folder = node_cache_dir()
    key = _key([cache.sha256, cache.uri, split, sorted({int(c) for c in classes})])[:32]
    images_path = os.path.join(folder, f"{key}.images.npy")
    labels_path = os.path.join(folder, f"{key}.labels.npy")
    if not os.path.exists(images_path):
        from filelock import FileLock

        os.makedirs(folder, exist_ok=True)
        _prune(folder)
        with FileLock(os.path.join(folder, f"{key}.lock")):
            if not os.path.exists(images_path):
                _write_pool(cache, split, classes, folder, images_path, labels_path)
    else:
        os.utime(images_path)  # in use: kept by _prune
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path)
    return ArraySplit(images.view(np.ndarray), labels)


NODE_CACHE_KEEP_S = 3 * 24 * 3600
"""Node pool files unused for this long are removed when another one is written (processes that still map one keep
their mapping: Linux frees the file's pages when the last mapping goes)."""


def _prune(folder: str) -> None:
    cutoff = time.time() - NODE_CACHE_KEEP_S
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".images.npy"):
            try:
                if os.path.getmtime(path) < cutoff:
                    key = name.removesuffix(".images.npy")
                    for suffix in (".images.npy", ".labels.npy", ".lock"):
                        os.unlink(os.path.join(folder, key + suffix))
            except OSError:  # another process pruned or is writing it
                pass


def _write_pool(cache: DataCache, split: str, classes: Sequence[int], folder: str, images_path: str,
                labels_path: str) -> None:  # fmt: skip
    fd, tmp = tempfile.mkstemp(prefix=".pool-", suffix=".npy", dir=folder)
    os.close(fd)
    try:
        holder: dict[str, np.memmap] = {}

        def allocate(n: int) -> np.ndarray:
            holder["mm"] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *cache.image_shape))
            return holder["mm"]

        result = cache.gather(split, classes, allocate)
        holder["mm"].flush()
        del holder["mm"], result
        storage.write_bytes_atomic(labels_path, _npy_bytes(cache.gather_labels(split, classes)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, images_path)  # last: its presence means the pool is complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------------------
# verification (pre-flight)
# ---------------------------------------------------------------------------------------------------------------
def needed_shards(spec: DatasetSpec, uses: Iterable[tuple[str, str]]) -> list[str]:
    """Shard names for ``uses``: pairs (class split, split field), e.g. ``("meta_train", "train_split")``."""
    names = []
    for class_split, split_field in uses:
        base = parse_split(getattr(spec, split_field))[0]
        names += [shard_name(base, c) for c in getattr(spec, f"{class_split}_classes")]
    return sorted(set(names))


def verify(spec: DatasetSpec, uri: str | None = None, *, shards: Sequence[str] | None = None) -> dict[str, Any]:
    """Checks the cache at ``uri`` (default :func:`cache_uri`) for ``spec``: complete, prepared for this spec, and
    every shard in ``shards`` (default: all) and every split's label index present with its recorded sha256.

    Returns ``{"uri", "shards", "bytes"}`` (what was hashed). Raises CacheError naming the field or the URI.
    """
    uri = uri or cache_uri(spec)
    read_manifest.cache_clear()
    manifest = read_manifest(uri)
    check_identity(manifest["identity"], spec, uri)
    names = list(manifest["shards"]) if shards is None else list(shards)
    total = 0
    for info in manifest["splits"].values():
        entry = info["labels"]
        total += _verify_one(storage.join(uri, entry["path"]), entry, "label index")
    for name in names:
        entry = manifest["shards"].get(name)
        if entry is None:
            raise CacheError(f"data.cache: the manifest of {uri} lists no shard {name} (its class split differs).")
        total += _verify_one(storage.join(uri, name), entry, "shard")
    return {"uri": uri, "shards": len(names), "bytes": total}


def _verify_one(uri: str, entry: dict[str, Any], what: str) -> int:
    try:
        digest, size = _sha256_uri(uri)
    except (FileNotFoundError, OSError):
        if not storage.exists(uri):
            raise CacheError(f"data.cache: {what} {uri} is missing (the manifest lists it): rerun "
                             "`l3rs data prepare`.") from None  # fmt: skip
        raise
    _check_sum(uri, digest, size, entry, what)
    return size
