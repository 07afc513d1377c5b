"""The class-indexed data cache (issue 14 part 1): prepare, manifest, resume, refusals by field / URI / checksum, and
that every array it serves is the one the direct tfds read gives (so tasks, ψ and results do not change)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from l3rs import cli, data
from l3rs.data import cache
from l3rs.data.spec import resolve_spec

DIGITS = data.get_spec("sklearn_digits")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> str:
    """sklearn_digits prepared into a fresh explicit cache (small chunks: several step-1 tasks per split)."""
    uri = str(tmp_path_factory.mktemp("cache") / "digits")
    summary = cache.prepare(DIGITS, uri, chunk_records=300)
    assert summary["written"] == summary["shards"] == 30 and not summary["already_complete"]
    return uri


def _spec(uri: str, **changes) -> data.DatasetSpec:
    return dataclasses.replace(DIGITS, cache=uri, **changes)


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    cache.read_manifest.cache_clear()
    return str(dst)


def test_manifest_describes_every_shard(digits_cache):
    m = json.load(open(os.path.join(digits_cache, "manifest.json")))
    assert m["format"] == cache.FORMAT
    assert m["dataset"]["name"] == "sklearn_digits" and m["dataset"]["version"] == "1.0.0"
    assert m["image_shape"] == [16, 16, 1]
    assert m["classes"] == {"pretrain": [0, 1, 2, 3, 4], "meta_train": [5, 6, 7, 8, 9], "meta_test": [5, 6, 7, 8, 9]}
    assert sorted(m["splits"]) == ["test", "train", "validation"]
    assert sum(s["records"] for s in m["splits"].values()) == 1797
    assert len(m["shards"]) == 30 and not os.path.exists(os.path.join(digits_cache, "_parts"))
    for split, info in m["splits"].items():
        labels = np.load(os.path.join(digits_cache, info["labels"]["path"]))
        counts = np.bincount(labels, minlength=10)
        for c in range(10):
            entry = m["shards"][f"{split}/class-{c:05d}.npy"]
            raw = open(os.path.join(digits_cache, split, f"class-{c:05d}.npy"), "rb").read()
            assert entry["sha256"] == hashlib.sha256(raw).hexdigest() and entry["bytes"] == len(raw)
            assert entry["count"] == counts[c] and entry["shape"] == [int(counts[c]), 16, 16, 1]


@pytest.mark.parametrize("name", ["sklearn_digits", "glyphs/small"])
def test_cache_serves_exactly_the_direct_read(name, tmp_path):
    """Per class and per split: the cache's arrays are the direct tfds read's, same images, same order; and every
    way a worker or pretraining reads them (load, load_shared, slices) equals the old path bit for bit."""
    spec = data.get_spec(name) if name in data.SPECS else resolve_spec(name)
    spec = dataclasses.replace(spec, cache=str(tmp_path / "c"))
    cache.prepare(spec, spec.cache, chunk_records=100)
    served = cache.open_cache(spec)
    for split in cache.identity(spec)["splits"]:
        images, labels = data._load_split(spec, split, None, True)
        for c in range(spec.num_classes):
            assert np.array_equal(served.class_images(split, c), images[labels == c]), (split, c)
    for split in (spec.train_split, spec.valid_split, spec.test_split, "train[:10]", "train[50%:]"):
        for classes in (list(spec.meta_train_classes), list(spec.pretrain_classes), None):
            old = data._load_direct(spec, split, None, True, classes)
            new = data.load(spec, split, classes=classes)
            assert np.array_equal(new.images, old.images) and np.array_equal(new.labels, old.labels)
            assert new.labels.dtype == np.int32 and new.images.flags.writeable
            if classes is not None:
                shared = data.load_shared(spec, split, classes=classes)
                assert np.array_equal(shared.images, old.images) and np.array_equal(shared.labels, old.labels)
                assert not shared.images.flags.writeable  # a view of the node's one copy


def test_task_pool_is_unchanged():
    """The embedded default path (default local cache, made on first use): the task pool is today's, bit for bit."""
    from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task

    for stage in ("meta_train", "meta_test"):
        dist = TaskDistribution("sklearn_digits", stage=stage, k_max=12)
        pool = load_task_pool(dist)
        eval_split = DIGITS.valid_split if stage == "meta_train" else DIGITS.test_split
        train = data._load_direct(DIGITS, DIGITS.train_split, None, True, list(dist.classes()))
        ev = data._load_direct(DIGITS, eval_split, None, True, list(dist.classes()))
        for got, want in zip(pool, (train.images, train.labels, ev.images, ev.labels), strict=True):
            assert np.array_equal(got, want) and got.dtype == want.dtype
        task = sample_task(7, dist, pool)
        assert np.array_equal(pool.train_images[task.train_idx], train.images[task.train_idx])


def test_resume_skips_what_is_written_and_verified(digits_cache, tmp_path):
    uri = str(tmp_path / "c")

    class Interrupted(Exception):
        pass

    def stop_in_class_step(fn, tasks):
        for i, t in enumerate(tasks):
            if fn is cache.prepare_classes and i == 1:
                raise Interrupted
            yield fn(t)

    with pytest.raises(Interrupted):
        cache.prepare(DIGITS, uri, chunk_records=300, map_fn=stop_in_class_step)
    # Half-written: refused by every reader, by name.
    with pytest.raises(cache.CacheError, match=r"cache at .* is incomplete: rerun `l3rs data prepare`"):
        data.load(_spec(uri), "train", classes=[5])
    # A shard whose bytes no longer match its checksum record is rewritten, the verified ones are skipped.
    written = sorted(n for n in os.listdir(os.path.join(uri, "test")) if n.endswith(".npy"))
    assert written
    with open(os.path.join(uri, "test", written[0]), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    seen = []

    def count(fn, tasks):
        for t in tasks:
            out = fn(t)
            seen.append(out)
            yield out

    summary = cache.prepare(DIGITS, uri, chunk_records=300, map_fn=count)
    chunks = [s for s in seen if "counts" in s]
    assert chunks and all(c["skipped"] for c in chunks)  # every step-1 part was there and verified
    assert summary["skipped"] == len(written) - 1 and summary["written"] == 30 - summary["skipped"]
    assert json.load(open(os.path.join(uri, "manifest.json")))["shards"] == cache.read_manifest(digits_cache)["shards"]
    assert cache.prepare(DIGITS, uri)["already_complete"]


def test_a_cache_for_another_config_is_refused_by_field(digits_cache, tmp_path):
    with pytest.raises(cache.CacheError, match=r"^data\.image_size: the cache at .* holds \[16, 16, 1\] images"):
        data.load(_spec(digits_cache, image_shape=(8, 8, 1)), "train", classes=[5])
    with pytest.raises(cache.CacheError, match=r"^data\.classes\.meta_train: the cache at .* was prepared for"):
        data.load(_spec(digits_cache, meta_train_classes=(5, 6, 7)), "train", classes=[5])
    glyphs = dataclasses.replace(resolve_spec("glyphs/small"), cache=digits_cache)
    with pytest.raises(cache.CacheError, match=r"^data\.dataset: the cache at .* holds 'sklearn_digits'"):
        data.load(glyphs, "train", classes=[0])
    with pytest.raises(cache.CacheError, match=r"^data\.valid_split: the cache at .* has no split 'extra'"):
        cache.open_cache(_spec(digits_cache, valid_split="extra"))
    # Preparing into it with another config is refused too, and writes nothing.
    before = sorted(os.listdir(digits_cache))
    with pytest.raises(cache.CacheError, match=r"^data\.image_size"):
        cache.prepare(dataclasses.replace(DIGITS, image_shape=(8, 8, 1)), digits_cache)
    assert sorted(os.listdir(digits_cache)) == before
    # A folder of someone else's files is not a cache and is left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(cache.CacheError, match="is not empty and holds no l3rs data cache"):
        cache.prepare(DIGITS, str(tmp_path / "mine"))
    with pytest.raises(cache.CacheError, match=r"no cache at .*: run `l3rs data prepare"):
        data.load(_spec(str(tmp_path / "nothing")), "train", classes=[5])


def test_missing_and_corrupt_shards_are_named_by_uri(digits_cache, tmp_path):
    uri = _copy(digits_cache, tmp_path / "c")
    missing = os.path.join(uri, "train", "class-00006.npy")
    os.remove(missing)
    with pytest.raises(cache.CacheError, match=f"shard {missing} is missing"):
        cache.verify(_spec(uri))
    with pytest.raises(cache.CacheError, match=f"shard {missing} is missing"):
        data.load(_spec(uri), "train", classes=[6])
    data.load(_spec(uri), "train", classes=[5])  # only the classes asked for are read

    uri = _copy(digits_cache, tmp_path / "d")
    corrupt = os.path.join(uri, "validation", "class-00007.npy")
    raw = bytearray(open(corrupt, "rb").read())
    raw[-1] ^= 0xFF  # same size, one bit pattern changed
    open(corrupt, "wb").write(bytes(raw))
    with pytest.raises(cache.CacheError, match=f"shard {corrupt} is corrupt"):
        cache.verify(_spec(uri))
    with pytest.raises(cache.CacheError, match=f"shard {corrupt} is corrupt"):
        data.load_shared(_spec(uri), "validation", classes=[5, 7])


def test_preflight_and_cli_refuse_a_bad_cache_before_any_work(digits_cache, tmp_path, capsys):
    from l3rs.config import Config
    from l3rs.service import preflight

    uri = _copy(digits_cache, tmp_path / "c")
    cfg = Config().replace({"data.dataset": "sklearn_digits", "data.cache": uri, "model.checkpoint": "random"})
    preflight.check_data(cfg)  # a good cache passes
    corrupt = os.path.join(uri, "train", "class-00008.npy")  # a meta-training class the workers will read
    raw = bytearray(open(corrupt, "rb").read())
    raw[200] ^= 0x01
    open(corrupt, "wb").write(bytes(raw))
    with pytest.raises(preflight.PreflightError, match=f"data.cache: shard {corrupt} is corrupt"):
        preflight.check_run(cfg, str(tmp_path / "runs" / "x"))
    assert not (tmp_path / "runs").exists()

    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndataset = "sklearn_digits"\ncache = "{uri}"\n')
    assert cli.main(["data", "verify", "--config", str(config)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l3rs data verify: data.cache: shard ") and "corrupt" in err[0]
    assert cli.main(["data", "prepare", "--config", str(config), "--set", "data.image_size=[8, 8]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l3rs data prepare: data.image_size: the cache at ")


def test_cli_prepare_writes_and_resumes(tmp_path, capsys):
    config = tmp_path / "c.toml"
    uri = tmp_path / "cache"
    config.write_text(f'[data]\ndataset = "sklearn_digits"\ncache = "{uri}"\n')
    assert cli.main(["data", "prepare", "--config", str(config), "--local", "--chunk-records", "500"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cache"] == str(uri) and out["written"] == 30 and not out["ray"]
    assert cli.main(["data", "prepare", "--config", str(config), "--local"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["already_complete"] and out["written"] == 0
    assert cli.main(["data", "verify", "--config", str(config)]) == 0


def test_class_step_reads_only_its_rows_from_an_object_store(tmp_path):
    """Step 2 reads a part's rows by byte range where the cache is not a local path (pyarrow's file system API, the
    same calls as on s3:// or gs://)."""
    from l3rs.data.cache_prepare import _PartReader

    part = np.arange(7 * 4 * 4 * 3, dtype=np.uint8).reshape(7, 4, 4, 3)
    np.save(tmp_path / "part.npy", part)
    reader = _PartReader(f"file://{tmp_path / 'part.npy'}", local=False)
    assert not reader.local
    assert np.array_equal(reader.rows(2, 5), part[2:5]) and reader.rows(3, 3).shape == (0, 4, 4, 3)
    assert np.array_equal(reader.rows(0, 7), part)
    reader.close()
