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

Preparing runs in two steps, each a list of independent tasks that ``map_fn`` may run in parallel (``l3rs data
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

import dataclasses
import datetime
import functools
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.data.records import ArraySplit, parse_split, read_records, split_bounds, tfds_builder

DatasetSpec = Any  # an l3rs.data.DatasetSpec (not imported: l3rs.data imports this module)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "NODE_CACHE_ENV",
    "CacheError",
    "DataCache",
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
    "read_manifest",
    "verify",
]

FORMAT = "l3rs-data-cache/1"
MANIFEST = "manifest.json"
PLAN = "prepare.json"
PARTS = "_parts"
NODE_CACHE_ENV = "L3RS_NODE_CACHE"
CLASS_SPLITS = ("pretrain", "meta_train", "meta_test")
SPLIT_FIELDS = (("train_split", "data.train_split"), ("valid_split", "data.valid_split"),
                ("test_split", "data.test_split"))  # fmt: skip
DEFAULT_CHUNK_RECORDS = 10_000
DECODE_BATCH = 512  # records decoded at once inside a chunk (full-size JPEGs are large before the resize)
GROUP_BYTES = 256 << 20  # class bytes gathered by one step-2 task


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
# preparing
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """Step 1: decode records ``start:stop`` of ``split`` into ``<uri>/_parts/<split>/chunk-<index>``."""

    uri: str
    dataset: str
    data_dir: str | None
    download: bool
    offline: bool
    image_shape: tuple[int, int, int]
    classes: tuple[int, ...]
    split: str
    index: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class ClassTask:
    """Step 2: gather the rows of ``classes`` of ``split`` from the parts (``chunks``: their step-1 records, in
    order) into class shards."""

    uri: str
    split: str
    classes: tuple[int, ...]
    chunks: tuple[str, ...]  # JSON of each chunk's record
    image_shape: tuple[int, int, int]


def _part(uri: str, split: str, index: int, suffix: str) -> str:
    return storage.join(uri, PARTS, split, f"chunk-{index:05d}.{suffix}")


def _verified(uri: str, entry: dict[str, Any]) -> bool:
    try:
        digest, size = _sha256_uri(uri)
    except OSError:
        return False
    return digest == entry.get("sha256") and size == entry.get("bytes")


def prepare_chunk(task: ChunkTask) -> dict[str, Any]:
    """Runs step 1 for one chunk (skipped when its part files exist and verify). Returns the chunk's record:
    per-class row counts and the parts' checksums."""
    marker = _part(task.uri, task.split, task.index, "json")
    if storage.exists(marker):
        done = json.loads(storage.read_bytes(marker))
        if all(_verified(_part(task.uri, task.split, task.index, k + ".npy"), done[k]) for k in ("images", "labels")):
            return {**done, "skipped": True}
    builder = _builder(task.dataset, task.data_dir, task.download, task.offline)
    images, labels = [], []
    for a in range(task.start, task.stop, DECODE_BATCH):
        img, lab = read_records(builder, task.split, a, min(a + DECODE_BATCH, task.stop), keep=task.classes,
                                shape=task.image_shape)  # fmt: skip
        images.append(img)
        labels.append(lab)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    kept = all_labels[np.isin(all_labels, np.asarray(task.classes, np.int64))]
    order = np.argsort(kept, kind="stable")  # by class, record order within a class
    stacked = np.concatenate(images) if images else np.zeros((0, *task.image_shape), np.uint8)
    values, counts = np.unique(kept, return_counts=True)
    done = {
        "split": task.split,
        "index": task.index,
        "start": task.start,
        "stop": task.stop,
        "counts": {str(int(c)): int(n) for c, n in zip(values, counts, strict=True)},
        "images": _write(_part(task.uri, task.split, task.index, "images.npy"), _npy_bytes(stacked[order])),
        "labels": _write(
            _part(task.uri, task.split, task.index, "labels.npy"), _npy_bytes(all_labels.astype(np.int32))
        ),
    }
    storage.write_bytes_atomic(marker, json.dumps(done).encode())
    return {**done, "skipped": False}


@functools.lru_cache(maxsize=4)
def _builder(name: str, data_dir: str | None, download: bool, offline: bool) -> Any:
    return tfds_builder(name, data_dir, download, offline)


def _read_part(uri: str) -> np.ndarray:
    if storage.is_local(uri):
        return np.load(uri.removeprefix("file://"), mmap_mode="r")
    return _from_npy(storage.read_bytes(uri))


def prepare_classes(task: ClassTask) -> dict[str, Any]:
    """Runs step 2 for a group of classes: writes each class shard and its ``.sha256`` record, skipping shards whose
    record exists and whose bytes verify. Returns ``{shard name: manifest entry}`` with ``"skipped"`` counts."""
    out: dict[str, Any] = {}
    todo = []
    for c in task.classes:
        name = shard_name(task.split, c)
        side = storage.join(task.uri, name + ".sha256")
        if storage.exists(side):
            entry = json.loads(storage.read_bytes(side))
            if _verified(storage.join(task.uri, name), entry):
                out[name] = {**entry, "skipped": True}
                continue
        todo.append(int(c))
    rows: dict[int, list[np.ndarray]] = {c: [] for c in todo}
    for raw in task.chunks if todo else ():
        chunk = json.loads(raw)
        counts = {int(k): v for k, v in chunk["counts"].items()}
        if not any(c in counts for c in todo):
            continue
        images = _read_part(_part(task.uri, task.split, chunk["index"], "images.npy"))
        offset = 0
        for c in sorted(counts):
            if c in rows:
                rows[c].append(np.array(images[offset : offset + counts[c]]))
            offset += counts[c]
    for c in todo:
        images = np.concatenate(rows.pop(c)) if rows.get(c) else np.zeros((0, *task.image_shape), np.uint8)
        name = shard_name(task.split, c)
        entry = {"split": task.split, "class": c, "count": int(len(images)), "shape": list(images.shape),
                 **_write(storage.join(task.uri, name), _npy_bytes(images))}  # fmt: skip
        storage.write_bytes_atomic(storage.join(task.uri, name + ".sha256"), json.dumps(entry).encode())
        out[name] = {**entry, "skipped": False}
    return out


def _chunk_bounds(n: int, shard_lengths: Sequence[int], target: int) -> list[tuple[int, int]]:
    """Consecutive record ranges of about ``target`` records, cut at the dataset's own file-shard boundaries when
    tfds knows them."""
    cuts = [0]
    if shard_lengths and sum(shard_lengths) == n:
        end = 0
        for length in shard_lengths:
            end += length
            if end - cuts[-1] >= target:
                cuts.append(end)
    else:
        cuts += list(range(target, n, target))
    if cuts[-1] != n:
        cuts.append(n)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _sequential(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterable[Any]:
    return (fn(t) for t in tasks)


MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]
"""``map_fn(fn, tasks)`` yields ``fn(task)`` of every task, in any order (e.g. as Ray tasks finish)."""


def prepare(
    spec: DatasetSpec,
    uri: str | None = None,
    *,
    data_dir: str | None = None,
    download: bool = True,
    map_fn: MapFn | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    chunk_records: int = DEFAULT_CHUNK_RECORDS,
) -> dict[str, Any]:
    """Writes ``spec``'s class-indexed cache at ``uri`` (default :func:`cache_uri`); resumes a half-written one.

    Args:
      spec: the dataset (its tfds name, image shape, class split and splits).
      uri: where; default ``spec.cache`` or the default local cache.
      data_dir: tfds data_dir of the dataset.
      download: let tfds download/prepare the dataset if it is not prepared yet.
      map_fn: runs a list of independent tasks (default: one after another in this process).
      progress: ``progress(step, done, total)`` after each task (step ``"decode"`` or ``"classes"``).
      chunk_records: records per step-1 task.

    Returns:
      A summary: ``uri``, ``manifest`` (the manifest written or found), ``shards``, ``written``/``skipped`` shards,
      ``chunks_skipped``, ``bytes``, ``already_complete``.

    Raises:
      CacheError: ``uri`` holds a cache (complete or half-written) for another dataset, image size, class split or
        splits (naming the field), or files that are not an l3rs cache.
    """
    uri = uri or cache_uri(spec, data_dir)
    map_fn = map_fn or _sequential
    ident = identity(spec)
    manifest_uri = storage.join(uri, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = read_manifest(uri)
        check_identity(manifest["identity"], spec, uri)
        return {"uri": uri, "manifest": manifest, "shards": len(manifest["shards"]), "written": 0,
                "skipped": len(manifest["shards"]), "chunks_skipped": 0, "bytes": _total_bytes(manifest),
                "already_complete": True}  # fmt: skip
    plan_uri = storage.join(uri, PLAN)
    if storage.exists(plan_uri):
        plan = json.loads(storage.read_bytes(plan_uri))
        check_identity(plan["identity"], spec, uri)
    else:
        present = [n for n in storage.listdir(uri) if not n.startswith(".")]
        if present:
            raise CacheError(f"data.cache: {uri} is not empty and holds no l3rs data cache ({', '.join(present[:5])}); "
                             "choose a new or empty location.")  # fmt: skip
        storage.write_bytes_atomic(plan_uri, json.dumps({"format": FORMAT, "identity": ident}, indent=1).encode())

    builder = tfds_builder(spec.name, data_dir, download, spec.offline)
    classes = tuple(stored_classes(ident))
    chunk_tasks = []
    split_records = {}
    for split in ident["splits"]:
        info = builder.info.splits[split]
        n = len(builder.as_data_source(split=split))  # what the source holds (also under tfds's mock_data)
        split_records[split] = n
        lengths = [int(x) for x in (getattr(info, "shard_lengths", None) or [])]  # used only if they sum to n
        for i, (a, b) in enumerate(_chunk_bounds(n, lengths, max(1, int(chunk_records)))):
            chunk_tasks.append(ChunkTask(uri, spec.name, data_dir, download, spec.offline, tuple(spec.image_shape),
                                         classes, split, i, a, b))  # fmt: skip
    chunks: dict[str, list[dict[str, Any]]] = {s: [] for s in ident["splits"]}
    for done_count, done in enumerate(map_fn(prepare_chunk, chunk_tasks), 1):
        chunks[done["split"]].append(done)
        if progress:
            progress("decode", done_count, len(chunk_tasks))
    for split in chunks:
        chunks[split].sort(key=lambda c: c["index"])

    image_bytes = int(np.prod(spec.image_shape))
    class_tasks = []
    for split in ident["splits"]:
        totals = {c: sum(ch["counts"].get(str(c), 0) for ch in chunks[split]) for c in classes}
        raw = tuple(json.dumps({k: v for k, v in ch.items() if k != "skipped"}) for ch in chunks[split])
        group: list[int] = []
        size = 0
        for c in classes:
            group.append(c)
            size += totals[c] * image_bytes
            if size >= GROUP_BYTES:
                class_tasks.append(ClassTask(uri, split, tuple(group), raw, tuple(spec.image_shape)))
                group, size = [], 0
        if group:
            class_tasks.append(ClassTask(uri, split, tuple(group), raw, tuple(spec.image_shape)))
    shards: dict[str, Any] = {}
    for done_count, done in enumerate(map_fn(prepare_classes, class_tasks), 1):
        shards.update(done)
        if progress:
            progress("classes", done_count, len(class_tasks))

    splits = {}
    for split in ident["splits"]:
        parts = [_from_npy(storage.read_bytes(_part(uri, split, ch["index"], "labels.npy"))) for ch in chunks[split]]
        labels = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        if len(labels) != split_records[split]:
            raise CacheError(f"data.cache: {split} has {split_records[split]} records but the parts at {uri} hold "
                             f"{len(labels)}: rerun `l3rs data prepare`.")  # fmt: skip
        splits[split] = {"records": int(len(labels)), "labels": {"path": f"{split}/labels.npy",
                                                                 **_write(storage.join(uri, split, "labels.npy"),
                                                                          _npy_bytes(labels))}}  # fmt: skip
    written = sum(1 for e in shards.values() if not e["skipped"])
    from l3rs._version import __version__

    manifest = {
        "format": FORMAT,
        "identity": ident,
        "dataset": {
            "name": spec.name,
            "version": str(builder.info.version),
            "config": getattr(getattr(builder, "builder_config", None), "name", None),
        },  # fmt: skip
        "image_shape": ident["image_shape"],
        "classes": ident["classes"],
        "splits": splits,
        "shards": {k: {f: v for f, v in e.items() if f != "skipped"} for k, e in sorted(shards.items())},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "l3rs_version": __version__,
    }
    storage.write_bytes_atomic(manifest_uri, json.dumps(manifest, indent=1).encode())
    _remove_parts(uri)  # no longer needed once the manifest is in place
    read_manifest.cache_clear()
    chunks_skipped = sum(1 for split in chunks for ch in chunks[split] if ch["skipped"])
    return {"uri": uri, "manifest": manifest, "shards": len(shards), "written": written,
            "skipped": len(shards) - written, "chunks_skipped": chunks_skipped, "bytes": _total_bytes(manifest),
            "already_complete": False}  # fmt: skip


def _remove_parts(uri: str) -> None:
    fs, path = storage._resolve(storage.join(uri, PARTS))  # noqa: SLF001 - the storage layer's own resolver
    try:
        fs.delete_dir(path)
    except OSError:  # best effort: a later prepare or a person may remove them
        pass


def _total_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(e["bytes"]) for e in manifest["shards"].values())


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
