"""Dataset preparation under concurrency: several processes asking for the same dataset on a fresh data dir at once.

This is a first ``l3rs train`` with two workers on an empty data folder: each worker prepares the data it needs. The
processes here are plain Python processes calling :func:`l3rs.data.load`, the call a worker makes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import l3rs

REPO = Path(l3rs.__file__).resolve().parent.parent
PROCESSES = 3

# Imports first (the slow part), then "ready", then wait for the go file: the test decides when all of them ask.
CHILD = """
import os, sys, time
import tensorflow_datasets  # noqa: F401
import l3rs.data as data
data_dir, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
split = data.load("sklearn_digits", "train", data_dir=data_dir)
print("loaded", len(split.labels), split.images.shape, flush=True)
"""


def test_processes_asking_at_once_on_a_fresh_data_dir_all_get_the_prepared_data(tmp_path):
    from filelock import FileLock

    from l3rs import data

    data_dir = tmp_path / "data"  # does not exist yet
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)
        # Hold the preparation lock while all of them start asking, so that every one creates its tfds builder
        # before the data exists (the race of issue 12); then let them prepare.
        data_dir.mkdir()
        with FileLock(str(data_dir / ".sklearn_digits.lock")):
            go.touch()
            time.sleep(1.0)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The data was prepared once, completely, and reads back here as each of them read it.
    here = data.load("sklearn_digits", "train", data_dir=str(data_dir))
    assert len(here.labels) == 1077
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert f"loaded {len(here.labels)} {here.images.shape}" in out, out
    assert not [n for n in os.listdir(data_dir / "sklearn_digits") if "incomplete" in n]
