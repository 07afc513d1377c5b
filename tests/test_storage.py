"""l3rs.storage (local paths, file:// URIs) and l3rs.checkpoint (atomic, verified, bit-exact checkpoints)."""

import logging
import os
import struct

import numpy as np
import pytest

from l3rs import checkpoint, storage
from l3rs.meta import nes


# ------------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("scheme", ["path", "file"])
def test_storage_round_trip(tmp_path, scheme):
    root = str(tmp_path) if scheme == "path" else f"file://{tmp_path}"
    uri = storage.join(root, "a", "b", "x.bin")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"\x00\x01hello")  # creates parents
    assert storage.exists(uri) and storage.read_bytes(uri) == b"\x00\x01hello"
    storage.write_bytes_atomic(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    assert storage.listdir(storage.join(root, "a", "b")) == ["x.bin"]
    assert storage.listdir(storage.join(root, "missing")) == []
    storage.makedirs(storage.join(root, "a", "c"))
    assert storage.listdir(storage.join(root, "a")) == ["b", "c"]
    storage.delete_file(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


def test_join():
    assert storage.join("runs", "r1", "psi") == os.path.join("runs", "r1", "psi")
    assert storage.join("s3://bucket/runs/", "r1", "/psi") == "s3://bucket/runs/r1/psi"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.is_local("runs") and storage.is_local("file:///tmp") and not storage.is_local("s3://b")


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes_atomic(storage.join("rel", "f.txt"), b"x")
    assert (tmp_path / "rel" / "f.txt").read_bytes() == b"x"


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "f.bin")
    for i in range(5):
        storage.write_bytes_atomic(uri, bytes([i]) * 1000)
    assert os.listdir(tmp_path) == ["f.bin"]
    assert oct(os.stat(uri).st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch, failing):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(uri, b"old content")

    def boom(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        storage.write_bytes_atomic(uri, b"new content that never lands")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_copy_tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"\xff" * 10)
    (src / "sub" / "deeper" / "c").write_bytes(b"")
    dst = str(tmp_path / "out" / "dst")
    storage.copy_tree(str(src), dst)
    assert storage.read_bytes(storage.join(dst, "a.txt")) == b"a"
    assert storage.read_bytes(storage.join(dst, "sub", "b.bin")) == b"\xff" * 10
    assert storage.read_bytes(storage.join(dst, "sub", "deeper", "c")) == b""
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.copy_tree(str(tmp_path / "missing"), dst)


def test_check_writable(tmp_path):
    ok = str(tmp_path / "new" / "runs")
    storage.check_writable(ok)
    assert os.path.isdir(ok) and os.listdir(ok) == []  # the probe is gone


def test_check_writable_refuses_path_under_a_file(tmp_path):
    # A directory cannot be created below a regular file, not even by root (CI runs tests as root,
    # which ignores permission bits, so a chmod-ed read-only directory would not fail there).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("I am a file")
    uri = str(blocker / "runs")
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable(uri)
    assert uri in str(e.value) and "not writable" in str(e.value)
    assert isinstance(e.value, OSError)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_check_writable_refuses_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(storage.StorageError, match="ro"):
            storage.check_writable(str(ro))
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------- checkpoint
def _tricky_state():
    rng = np.random.default_rng(0)
    weird = np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324, 1e-45, np.finfo(np.float32).max], np.float32)
    nan_payload = np.array([0x7FC00001, 0xFFF00000DEADBEEF], np.uint64)[1:].view(np.float64)  # NaN with a payload
    return {
        "nes": {
            "mean": rng.normal(size=1000).astype(np.float32),
            "m": weird,
            "v": np.arange(6, dtype=np.float64).reshape(2, 3) / 3.0,
            "generation": 123,
        },
        "nan_payload": nan_payload,
        "ints": np.arange(5, dtype=np.int64),
        "scalar": np.float32(0.1),
        "pyfloat": 0.1 + 0.2,
        "neg_zero": -0.0,
        "subnormal": 5e-324,
        "big_int": 2**62 + 1,
        "text": "σ ψ ok",
        "history": '[{"generation": 0}]',
        "flag": True,
        "nothing": None,
        "empty": {},
    }


def _assert_bit_equal(a, b, where="state"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _assert_bit_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, np.ndarray | np.generic):
        b = np.asarray(b)
        assert np.asarray(a).dtype == b.dtype and np.shape(a) == b.shape, where
        assert np.asarray(a).tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert type(a) is type(b) and a == b, where


def test_checkpoint_round_trip_bit_exact(tmp_path):
    run_dir = str(tmp_path / "run")
    assert checkpoint.load_latest_checkpoint(run_dir) is None
    state = _tricky_state()
    uri = checkpoint.save_checkpoint(run_dir, 123, state)
    assert uri.endswith(os.path.join("checkpoints", "gen_000123.ckpt"))
    gen, loaded = checkpoint.load_latest_checkpoint(run_dir)
    assert gen == 123
    _assert_bit_equal(state, loaded)
    loaded["nes"]["mean"][0] = 1.0  # restored arrays are ordinary writeable arrays


def test_nes_state_survives_checkpoint(tmp_path):
    c = nes.NESConfig(population_size=4, sigma=0.1, learning_rate=0.1, decay_every=10)
    state = nes.init(c, np.random.default_rng(0).normal(size=33))
    for _ in range(3):
        eps, cand = nes.ask(c, state, seed=1)
        state, _ = nes.tell(c, state, eps, -np.sum(cand.astype(np.float64) ** 2, axis=1))
    checkpoint.save_checkpoint(f"file://{tmp_path}", state.generation, {"nes": nes.state_to_dict(state)})
    gen, payload = checkpoint.load_latest_checkpoint(f"file://{tmp_path}")
    resumed = nes.state_from_dict(payload["nes"])
    assert gen == resumed.generation == 3
    for a, b in zip(state[:3], resumed[:3], strict=True):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(nes.ask(c, state, 1)[1], nes.ask(c, resumed, 1)[1])


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_newest_checkpoint_is_skipped_with_warning(tmp_path, caplog, damage):
    run_dir = str(tmp_path)
    checkpoint.save_checkpoint(run_dir, 1, {"x": np.ones(100, np.float32), "g": 1})
    newest = checkpoint.save_checkpoint(run_dir, 2, {"x": np.full(100, 2.0, np.float32), "g": 2})
    blob = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[-50] ^= 0x01  # inside the body's array bytes: only the checksum can tell
    elif damage == "empty":
        blob = b""
    else:
        blob = b"\x93not a checkpoint at all"
    with open(newest, "wb") as f:
        f.write(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="l3rs.checkpoint"):
        gen, state = checkpoint.load_latest_checkpoint(run_dir)
    assert gen == 1 and state["g"] == 1
    np.testing.assert_array_equal(state["x"], np.ones(100, np.float32))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and newest in warnings[0]
    if damage == "flip":
        assert "sha256 mismatch" in warnings[0]


def test_all_checkpoints_corrupt_returns_none(tmp_path, caplog):
    uri = checkpoint.save_checkpoint(str(tmp_path), 0, {"a": 1})
    with open(uri, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="l3rs.checkpoint"):
        assert checkpoint.load_latest_checkpoint(str(tmp_path)) is None
    assert any(uri in r.getMessage() for r in caplog.records)


def test_checkpoint_renamed_to_wrong_generation_is_rejected(tmp_path):
    uri = checkpoint.save_checkpoint(str(tmp_path), 4, {"a": 1})
    os.replace(uri, checkpoint.checkpoint_uri(str(tmp_path), 9))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="generation 4"):
        checkpoint.load_checkpoint(checkpoint.checkpoint_uri(str(tmp_path), 9))


def test_retention_keeps_the_newest(tmp_path):
    run_dir = str(tmp_path)
    for g in range(0, 50, 5):
        checkpoint.save_checkpoint(run_dir, g, {"g": g}, keep_last=3)
    assert [g for g, _ in checkpoint.list_checkpoints(run_dir)] == [35, 40, 45]
    checkpoint.save_checkpoint(run_dir, 46, {"g": 46}, keep_last=1)
    assert [g for g, _ in checkpoint.list_checkpoints(run_dir)] == [46]
    # Only checkpoint files are counted or touched; no temp files are left behind.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["gen_000046.ckpt"]
    for g in (47, 48, 49, 50):
        checkpoint.save_checkpoint(run_dir, g, {"g": g}, keep_last=None)  # None: every one stays
    assert [g for g, _ in checkpoint.list_checkpoints(run_dir)] == [46, 47, 48, 49, 50]


def test_saving_an_older_generation_drops_the_abandoned_newer_ones(tmp_path, caplog):
    run_dir = str(tmp_path)
    for g in (1, 2, 3):
        checkpoint.save_checkpoint(run_dir, g, {"g": g})
    with caplog.at_level(logging.WARNING, logger="l3rs.checkpoint"):
        checkpoint.save_checkpoint(run_dir, 2, {"g": "redo"})
    assert [g for g, _ in checkpoint.list_checkpoints(run_dir)] == [1, 2]
    assert checkpoint.load_latest_checkpoint(run_dir) == (2, {"g": "redo"})
    assert any("gen_000003.ckpt" in r.getMessage() for r in caplog.records)


def test_save_checkpoint_rejects_bad_input(tmp_path):
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="keep_last"):
            checkpoint.save_checkpoint(str(tmp_path), 0, {}, keep_last=bad)
    with pytest.raises(ValueError, match="generation"):
        checkpoint.save_checkpoint(str(tmp_path), -1, {})
    with pytest.raises(ValueError, match=r"state\.a\.b"):
        checkpoint.save_checkpoint(str(tmp_path), 0, {"a": {"b": object()}})
    with pytest.raises(ValueError, match="keys must be strings"):
        checkpoint.save_checkpoint(str(tmp_path), 0, {1: 2})
    assert checkpoint.list_checkpoints(str(tmp_path)) == []


def test_json_helpers(tmp_path):
    uri = str(tmp_path / "sub" / "h.json")
    obj = {"a": [1, 2.5, "x"], "b": None, "c": float("nan")}
    checkpoint.save_json_atomic(uri, obj)
    back = checkpoint.load_json(uri)
    assert back["a"] == [1, 2.5, "x"] and back["b"] is None and np.isnan(back["c"])
    assert os.listdir(tmp_path / "sub") == ["h.json"]
