"""Submit → monitor → fetch, as a user does it: a real `ray start --head` with the dashboard (via
cluster/start_local.sh, on 127.0.0.1), `l3rs submit`, the job seen through the dashboard's Jobs API, `l3rs status`,
`l3rs logs`, `l3rs fetch`, and the fetched ψ loaded with `l3rs.load`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from _local_head import local_head, run_l3rs

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray

JOB_TOML = """
[run]
name = "submitted"
storage = "{storage}"
checkpoint_every = 1
[data]
dataset = "sklearn_digits"
[model]
checkpoint = "random"
[task]
num_classes = 3
batch_size = 16
eval_batch_size = 32
k_min = 3
k_max = 6
[nes]
population_size = 4
meta_batch_size = 1
generations = 2
[workers]
min_workers = 1
max_workers = 1
[evaluate]
k_grid = [5, 10]
"""


@pytest.fixture
def head(tmp_path):
    with local_head(tmp_path / "cluster", num_cpus=2) as (address, _, env):
        yield address, env


def test_submit_monitor_fetch_load(head, tmp_path):
    import jax

    import l3rs as lib
    from l3rs import models

    address, env = head
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.toml").write_text(JOB_TOML.format(storage=tmp_path / "runs"))
    out = run_l3rs("submit", "--address", address, "--config", "job.toml", env=env, cwd=work)
    job_id = next(line.split()[1] for line in out.splitlines() if line.startswith("job:"))
    assert f"{address}/#/jobs/{job_id}" in out

    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline:
        status = json.loads(run_l3rs("status", job_id, "--address", address, env=env, cwd=work))
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = run_l3rs("logs", job_id, "--address", address, env=env, cwd=work)
    assert status["status"] == "SUCCEEDED", logs
    assert status["metadata"]["l3rs_run"] == "submitted"
    assert "gen 2/2" in logs

    # What the dashboard's job page shows comes from its Jobs API.
    from ray.job_submission import JobSubmissionClient

    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_AUTH")})
    jobs = {j.submission_id: j for j in JobSubmissionClient(address).list_jobs()}
    assert str(jobs[job_id].status) == "SUCCEEDED" and "l3rs.cli train" in jobs[job_id].entrypoint

    fetched = tmp_path / "fetched"
    meta = json.loads(run_l3rs("fetch", job_id, "--address", address, "--to", str(fetched), env=env, cwd=work))
    assert meta["generations"] == 2 and len(meta["sha256"]) == 64
    params = models.init_variables(models.create("small_cnn", num_classes=3), jax.random.key(0), (16, 16, 1))["params"]
    tx = lib.load(str(fetched), total_steps=10, params=params)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p), params)
    updates, _ = tx.update(grads, state, params, value=jax.numpy.float32(1.0))
    assert all(bool(jax.numpy.isfinite(u).all()) for u in jax.tree.leaves(updates))
