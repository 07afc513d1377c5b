"""Submit → monitor → fetch, as a user does it: a real `ray start --head` with the dashboard (via
cluster/start_local.sh, on 127.0.0.1), `l3rs submit`, the job seen through the dashboard's Jobs API, `l3rs status`,
`l3rs logs`, `l3rs fetch`, and the fetched ψ loaded with `l3rs.load`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def l3rs(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "l3rs.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"l3rs {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def head(tmp_path):
    from l3rs.service.raycluster import loopback_env

    env = loopback_env()
    env.pop("RAY_ADDRESS", None)
    env["L3RS_CLUSTER_DIR"] = str(tmp_path / "cluster")
    # This interpreter's environment, also for the job (its entrypoint runs `python -m l3rs.cli`) and the scripts.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_BIN"] = os.path.join(bin_dir, "ray")
    ports = {name: free_port() for name in ("port", "dashboard-port", "metrics-port", "client-port")}
    args = [str(REPO / "cluster" / "start_local.sh"), "--num-cpus", "2"]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        subprocess.run([str(REPO / "cluster" / "stop_local.sh")], env=env, capture_output=True, timeout=120)


def test_submit_monitor_fetch_load(head, tmp_path):
    import jax

    import l3rs as lib
    from l3rs import models

    address, env = head
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.toml").write_text(JOB_TOML.format(storage=tmp_path / "runs"))
    out = l3rs("submit", "--address", address, "--config", "job.toml", env=env, cwd=work)
    job_id = next(line.split()[1] for line in out.splitlines() if line.startswith("job:"))
    assert f"{address}/#/jobs/{job_id}" in out

    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline:
        status = json.loads(l3rs("status", job_id, "--address", address, env=env, cwd=work))
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = l3rs("logs", job_id, "--address", address, env=env, cwd=work)
    assert status["status"] == "SUCCEEDED", logs
    assert status["metadata"]["l3rs_run"] == "submitted"
    assert "gen 2/2" in logs

    # What the dashboard's job page shows comes from its Jobs API.
    from ray.job_submission import JobSubmissionClient

    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_AUTH")})
    jobs = {j.submission_id: j for j in JobSubmissionClient(address).list_jobs()}
    assert str(jobs[job_id].status) == "SUCCEEDED" and "l3rs.cli train" in jobs[job_id].entrypoint

    fetched = tmp_path / "fetched"
    meta = json.loads(l3rs("fetch", job_id, "--address", address, "--to", str(fetched), env=env, cwd=work))
    assert meta["generations"] == 2 and len(meta["sha256"]) == 64
    params = models.init_variables(models.create("small_cnn", num_classes=3), jax.random.key(0), (16, 16, 1))["params"]
    tx = lib.load(str(fetched), total_steps=10, params=params)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p), params)
    updates, _ = tx.update(grads, state, params, value=jax.numpy.float32(1.0))
    assert all(bool(jax.numpy.isfinite(u).all()) for u in jax.tree.leaves(updates))
