"""``cluster/start_local.sh``'s port checks: Ray 2.60 refuses fixed ports inside its default worker port range
(10002-19999) at ``ray start``, so the script refuses them first, and its hints for a second cluster name ports above
it that are free. Nothing here starts Ray (each case stops before ``ray start``)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _start_local(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "RAY_BIN": str(Path(sys.executable).parent / "ray"),
        "L3RS_CLUSTER_DIR": str(tmp_path / "cluster"),
    }
    return subprocess.run([str(CLUSTER / "start_local.sh"), *args], env=env, capture_output=True, text=True, timeout=60)


def _hinted_ports(stderr: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(--[a-z-]*port) (\d+)", stderr.split("e.g.", 1)[1])}


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("option", ["--port", "--dashboard-port", "--metrics-port", "--client-port"])
def test_ports_in_rays_worker_range_are_refused_with_a_usable_hint(tmp_path, option):
    result = _start_local(option, "16379", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"{option} 16379 is inside Ray's worker port range (10002-19999)" in result.stderr
    hint = _hinted_ports(result.stderr)
    assert set(hint) == {"--port", "--dashboard-port", "--metrics-port", "--client-port"}
    assert all(p > 20000 and _free(p) for p in hint.values()), hint
    assert not (tmp_path / "cluster" / "head.pid").exists()


def test_busy_port_hint_names_free_ports_outside_the_worker_range(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _start_local("--port", str(port), tmp_path=tmp_path)
    assert result.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in result.stderr
    hint = _hinted_ports(result.stderr)
    assert len(hint) == 4 and all(p > 20000 and _free(p) for p in hint.values()), hint


def test_a_moved_worker_range_lifts_the_refusal_and_bad_numbers_are_named(tmp_path):
    bad = _start_local("--client-port", "http", tmp_path=tmp_path)
    assert bad.returncode == 1 and "--client-port must be a port number, got 'http'" in bad.stderr
    big = _start_local("--port", "70000", tmp_path=tmp_path)
    assert big.returncode == 1 and "--port must be a port number (1-65535), got 70000" in big.stderr
    # With the worker range moved (passed on to ray start), 16379 is no longer refused by this check; the busy-port
    # check comes next (and stops the script before Ray starts).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 16379))
        busy.listen()
        moved = _start_local("--port", "16379", "--", "--min-worker-port=30000", "--max-worker-port=30999",
                             tmp_path=tmp_path)  # fmt: skip
    assert moved.returncode == 1 and "is in use" in moved.stderr and "worker port range" not in moved.stderr
