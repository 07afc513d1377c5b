"""Writing the class-indexed data cache (``l3rs data prepare``): see :mod:`l3rs.data.cache` for the layout and the
steps. Each step is a list of independent tasks (:class:`ChunkTask`, :class:`ClassTask`) that ``map_fn`` may run in
parallel (Ray tasks: :mod:`l3rs.service.dataprep`); every file is written atomically, the manifest last.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.data.cache_layout import (
    FORMAT,
    MANIFEST,
    PARTS,
    PLAN,
    CacheError,
    DatasetSpec,
    _from_npy,
    _npy_bytes,
    _sha256_uri,
    _write,
    cache_uri,
    check_identity,
    identity,
    read_manifest,
    shard_name,
    stored_classes,
)
from l3rs.data.records import read_records, tfds_builder

__all__ = ["ChunkTask", "ClassTask", "MapFn", "prepare", "prepare_chunk", "prepare_classes"]

DEFAULT_CHUNK_RECORDS = 10_000
DECODE_BATCH = 512  # records decoded at once inside a chunk (full-size JPEGs are large before the resize)
GROUP_BYTES = 256 << 20  # class bytes gathered by one step-2 task


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


class _PartReader:
    """Reads row ranges of a part's ``.npy``: a memory map for a local file, byte-range reads on an object store (so
    each class group fetches only its own rows, not every part whole)."""

    def __init__(self, uri: str, local: bool | None = None) -> None:
        self.local = storage.is_local(uri) if local is None else local
        if self.local:
            self.array = np.load(uri.removeprefix("file://"), mmap_mode="r")
            return
        fs, path = storage._resolve(uri)  # noqa: SLF001 - the storage layer's own resolver
        self.file = fs.open_input_file(path)
        head = io.BytesIO(self.file.read_at(min(self.file.size(), 65536), 0))
        version = np.lib.format.read_magic(head)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, _, self.dtype = reader(head)
        self.offset = head.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, a: int, b: int) -> np.ndarray:
        if self.local:
            return np.array(self.array[a:b])
        data = self.file.read_at((b - a) * self.row_bytes, self.offset + a * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(b - a, *self.shape[1:]).copy()

    def close(self) -> None:
        if not self.local:
            self.file.close()


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
        part = _PartReader(_part(task.uri, task.split, chunk["index"], "images.npy"))
        offset = 0
        for c in sorted(counts):  # the part's rows are sorted by class
            if c in rows:
                rows[c].append(part.rows(offset, offset + counts[c]))
            offset += counts[c]
        part.close()
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
