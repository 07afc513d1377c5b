"""Every bad input and fault of docs/operations.md's table: the one-line message, the exit code, and what was written.

One real head with the dashboard (cluster/start_local.sh on 127.0.0.1) serves the module. Most cases call
``l3rs.cli.main`` in this process (fast); ``test_no_traceback_in_subprocesses`` runs the real ``l3rs`` command for
the cases that used to print tracebacks and checks that none does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _local_head import free_port, local_head

from l3rs.cli import main

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray

JOB_TOML = """
[run]
name = "{name}"
storage = "{storage}"
[data]
dataset = "sklearn_digits"
[model]
checkpoint = "{checkpoint}"
[task]
num_classes = 3
k_min = 3
k_max = 6
[nes]
population_size = 4
meta_batch_size = 1
generations = 2
[workers]
max_workers = 1
[evaluate]
k_grid = [5, 10]
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real head with the dashboard: (dashboard URL, GCS address, environment of its clients)."""
    from l3rs.service.jobclient import cluster_nodes

    with local_head(tmp_path_factory.mktemp("head") / "cluster", num_cpus=1) as (url, gcs, env):
        # The head's autoscaler reports its (fixed) node types a few seconds after start; until then the client
        # cannot tell that no node will ever come, and rightly leaves the resource check to the driver. Wait for it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes, may_grow = cluster_nodes(url)
            if nodes and not may_grow:
                break
            time.sleep(0.5)
        yield url, gcs, env


@pytest.fixture(scope="module")
def failed_job(head):
    """A job submitted as `l3rs submit` would (l3rs metadata), whose entrypoint fails at once."""
    from ray.job_submission import JobSubmissionClient

    address, _, _ = head
    client = JobSubmissionClient(address)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -c 'import sys; sys.exit(7)'",
        metadata={"l3rs_run": "never-ran", "l3rs_storage": "runs"},
    )
    deadline = time.monotonic() + 120
    while str(client.get_job_status(job)) not in ("FAILED", "SUCCEEDED") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(job)) == "FAILED"
    return job


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("l3rs ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def write_job(tmp_path: Path, name: str = "job", checkpoint: str = "random", storage: str | None = None) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB_TOML.format(name=name, storage=storage or tmp_path / "runs", checkpoint=checkpoint))
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import jax

    import l3rs
    from l3rs import models
    from l3rs.artifact import save_artifact

    params = models.init_variables(models.create("small_cnn", num_classes=3), jax.random.key(0), (16, 16, 1))["params"]
    config = l3rs.L3RSConfig()
    runs = tmp_path_factory.mktemp("artifact") / "runs"
    save_artifact(str(runs / "done" / "psi"), l3rs.init_psi(config, params, jax.random.key(1)), config, {})
    return runs


# ------------------------------------------------------------------------------------------------------------------
# cluster addresses and auth
# ------------------------------------------------------------------------------------------------------------------
def test_submit_to_a_port_where_nothing_listens(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_job(tmp_path)
    code, _, err = run_cli(capsys, "submit", "--config", "job.toml", "--address", f"http://127.0.0.1:{free_port()}")
    assert code == 3 and "cannot reach a Ray dashboard" in one_line(err)


def test_address_without_scheme_and_gcs_port(head, capsys):
    address, gcs, _ = head
    # HOST:PORT of the dashboard is normalised to http://HOST:PORT
    code, _, err = run_cli(capsys, "status", "raysubmit_nope", "--address", address.removeprefix("http://"))
    assert code == 2 and "no job 'raysubmit_nope'" in one_line(err)
    # the GCS address given to a job command: refused at once, saying which address is expected
    code, _, err = run_cli(capsys, "status", "raysubmit_nope", "--address", gcs)
    assert code == 3 and "dashboard" in one_line(err) and "HOST:6379" in err


@pytest.mark.parametrize("command", ["status", "logs", "stop", "fetch"])
def test_unknown_job_id(head, capsys, command, tmp_path):
    extra = ["--to", str(tmp_path / "out")] if command == "fetch" else []
    code, _, err = run_cli(capsys, command, "raysubmit_nope", "--address", head[0], *extra)
    assert code == 2 and "no job 'raysubmit_nope'" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_status_and_fetch_of_a_failed_job(head, failed_job, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "status", failed_job, "--address", head[0])
    assert code == 1 and json.loads(out)["status"] == "FAILED"
    code, _, err = run_cli(capsys, "fetch", failed_job, "--address", head[0], "--to", str(tmp_path / "out"))
    assert code == 1 and "FAILED" in one_line(err) and "exit code 7" in err
    assert not (tmp_path / "out").exists()


def test_flag_wins_over_ray_address_and_l3rs_dashboard(head, capsys, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://{dead}")
    monkeypatch.setenv("L3RS_DASHBOARD", f"http://{dead}")
    code, _, err = run_cli(capsys, "status", "raysubmit_nope", "--address", head[0])
    assert code == 2 and "no job" in one_line(err)
    # without the flag: L3RS_DASHBOARD
    monkeypatch.setenv("L3RS_DASHBOARD", head[0])
    code, _, err = run_cli(capsys, "status", "raysubmit_nope")
    assert code == 2 and "no job" in one_line(err)


def test_token_file_is_read_without_auth_mode(head, capsys, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text(os.environ["RAY_AUTH_TOKEN"] + "\n")
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    code, _, err = run_cli(capsys, "status", "raysubmit_nope", "--address", head[0])
    assert code == 2 and "no job" in one_line(err)
    assert os.environ["RAY_AUTH_MODE"] == "token"  # adopted for Ray's own clients too
    token.write_text("0" * 64)
    code, _, err = run_cli(capsys, "status", "raysubmit_nope", "--address", head[0])
    assert code == 3 and "refused our credentials" in one_line(err)


def test_local_head_is_decided_by_its_session_folder(head):
    from l3rs.service.jobclient import head_shares_filesystem, probe_dashboard

    info = probe_dashboard(head[0])
    assert head_shares_filesystem(info)
    # a tunnel to another machine's head is 127.0.0.1 too, but its session folder is not here
    assert not head_shares_filesystem({**info, "session_name": "session_2020-01-01_00-00-00_000000_1"})


def test_train_address_family(capsys):
    random = ["--set", 'model.checkpoint="random"']
    code, _, err = run_cli(capsys, "train", "--address", "http://127.0.0.1:8265", *random)
    assert code == 2 and "GCS address" in one_line(err)
    code, _, err = run_cli(capsys, "train", "--address", f"127.0.0.1:{free_port()}", *random)
    assert code == 3 and "cannot reach a Ray cluster" in one_line(err)


# ------------------------------------------------------------------------------------------------------------------
# pre-flight checks of `l3rs submit`: refused, nothing written, no job
# ------------------------------------------------------------------------------------------------------------------
def _jobs(address: str) -> int:
    from ray.job_submission import JobSubmissionClient

    return len(JobSubmissionClient(address).list_jobs())


@pytest.mark.parametrize(
    "case, override, expected",
    [
        ("checkpoint", ["--set", 'model.checkpoint="missing-theta0"'], "model.checkpoint: no θ0 at"),
        ("resources", ["--set", "workers.resources={ GPU = 1 }"], "workers.resources: no node"),
        ("scheme", ["--set", 'run.storage="ftp://host/runs"'], "run.storage: unknown storage scheme"),
        ("unwritable", ["--set", 'run.storage="a-file/runs"'], "run.storage: cannot create"),
        ("placement", ["--set", "workers.placement_timeout_s=0"], "workers.placement_timeout_s"),
    ],
)
def test_submit_preflight_refuses(head, capsys, tmp_path, monkeypatch, case, override, expected):
    monkeypatch.chdir(tmp_path)
    write_job(tmp_path, storage="runs")
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    jobs = _jobs(head[0])
    code, _, err = run_cli(capsys, "submit", "--config", "job.toml", "--address", head[0], *override)
    assert code == 2 and expected in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and _jobs(head[0]) == jobs


def test_submit_refuses_a_changed_config_naming_every_field(head, capsys, tmp_path, monkeypatch):
    from l3rs.cli import _load
    from l3rs.service.driver import resolve_paths

    monkeypatch.chdir(tmp_path)
    write_job(tmp_path, name="existing")
    cfg = resolve_paths(_load(type("A", (), {"config": "job.toml", "set": ["task.k_max=9", "nes.sigma=0.1"]})()))
    run_dir = tmp_path / "runs" / "existing"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    jobs = _jobs(head[0])
    code, _, err = run_cli(capsys, "submit", "--config", "job.toml", "--address", head[0])
    line = one_line(err)
    assert code == 2 and "task.k_max was 9, now 6" in line and "nes.sigma was 0.1, now 0.03" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"] and _jobs(head[0]) == jobs


def test_driver_rechecks_resources_on_the_cluster(ray_connected, tmp_path):
    from l3rs.config import config_from_dict
    from l3rs.service.driver import Driver
    from l3rs.service.preflight import PreflightError

    cfg = config_from_dict(
        {
            "run": {"name": "gpu", "storage": str(tmp_path / "runs")},
            "data": {"dataset": "sklearn_digits"},
            "model": {"checkpoint": "random"},
            "task": {"num_classes": 3, "k_min": 3, "k_max": 6},
            "workers": {"resources": {"GPU": 1.0}},
            "evaluate": {"k_grid": [5, 10]},
        }
    )
    with pytest.raises(PreflightError, match="workers.resources: no node"):
        Driver(cfg, progress=False).run()
    assert not (tmp_path / "runs").exists()


def test_pretrain_output_unwritable_before_work(capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli(capsys, "pretrain", "--set", f'pretrain.output="{tmp_path}/a-file/theta0"')
    assert code == 2 and "pretrain.output: cannot create" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ------------------------------------------------------------------------------------------------------------------
# fetch and load
# ------------------------------------------------------------------------------------------------------------------
def test_fetch_unknown_run(capsys, tmp_path, artifact):
    code, _, err = run_cli(capsys, "fetch", "nope", "--storage", str(artifact), "--to", str(tmp_path / "out"))
    assert code == 2 and "no run 'nope'" in one_line(err) and "done" in err
    (artifact / "young").mkdir(exist_ok=True)  # a run that has not reached its first checkpoint
    code, _, err = run_cli(capsys, "fetch", "young", "--storage", str(artifact), "--to", str(tmp_path / "out"))
    assert code == 1 and "has no ψ artifact yet" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_fetch_never_overwrites(capsys, tmp_path, artifact):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "metadata.json").write_text("the user's own")
    (dst / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "fetch", "done", "--storage", str(artifact), "--to", str(dst))
    assert code == 2 and "not empty" in one_line(err) and "--force" in err
    assert (dst / "metadata.json").read_text() == "the user's own" and sorted(os.listdir(dst)) == [
        "metadata.json",
        "notes.txt",
    ]
    # --force replaces exactly the artifact's files
    code, out, _ = run_cli(capsys, "fetch", "done", "--storage", str(artifact), "--to", str(dst), "--force")
    assert code == 0 and len(json.loads(out)["sha256"]) == 64
    assert sorted(os.listdir(dst)) == ["metadata.json", "notes.txt", "psi.msgpack"]
    assert (dst / "notes.txt").read_text() == "keep me"
    # a new folder, and an empty one: the whole artifact and nothing else (no temporary folder left behind)
    for new in (tmp_path / "new", tmp_path / "empty"):
        if new.name == "empty":
            new.mkdir()
        assert run_cli(capsys, "fetch", "done", "--storage", str(artifact), "--to", str(new))[0] == 0
        assert sorted(os.listdir(new)) == ["metadata.json", "psi.msgpack"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_load_refuses_non_positive_total_steps(artifact, bad):
    import l3rs

    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        l3rs.load(str(artifact / "done" / "psi"), total_steps=bad)


# ------------------------------------------------------------------------------------------------------------------
# no tracebacks without --verbose
# ------------------------------------------------------------------------------------------------------------------
def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--verbose", "fetch", "nope", "--storage", str(tmp_path), "--to", "x")
    assert code == 2 and "Traceback" in err
    code, _, err = run_cli(capsys, "fetch", "nope", "--storage", str(tmp_path), "--to", "x", "-v")
    assert code == 2 and "Traceback" in err


def test_ctrl_c_is_exit_130_also_when_a_c_extension_wraps_it(capsys, monkeypatch):
    """Ctrl-C in any command: one line, exit 130, also when it surfaced inside a C extension's call as SystemError
    (its cause the KeyboardInterrupt); a SystemError of another cause stays a failure (exit 1)."""
    import l3rs.cli as cli

    def wrapped(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from e

    for fail, code, line in (
        (wrapped, 130, "l3rs status: interrupted"),
        (_raise_system_error, 1, "failed: SystemError"),
    ):
        monkeypatch.setattr(cli, "cmd_status", fail)
        got, _, err = run_cli(capsys, "status", "job", "--address", "http://127.0.0.1:1")
        assert got == code and line in err and "Traceback" not in err and err.count("\n") == 1


def _raise_system_error(args):
    raise SystemError("boom")


def test_no_traceback_in_subprocesses(head, failed_job, tmp_path):
    """The real command, as a user runs it, for the cases that printed tracebacks before."""
    address, gcs, env = head
    env = {**env, "PYTHONPATH": str(REPO), "RAY_ADDRESS": gcs}  # env.sh's RAY_ADDRESS must not get in the way
    cases = [
        (["status", "raysubmit_nope", "--address", address], 2),
        (["fetch", failed_job, "--address", address, "--to", str(tmp_path / "o")], 1),
        (["status", "raysubmit_nope", "--address", f"127.0.0.1:{free_port()}"], 3),
    ]
    for args, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "l3rs.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == expected, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\nl3rs ") + proc.stderr.startswith("l3rs ") == 1
