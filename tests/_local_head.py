"""A real local Ray head started as a user starts it (``cluster/start_local.sh``: loopback, dashboard, token auth),
for the tests that drive the job commands (``l3rs submit / status / logs / fetch``) against it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: all sockets stay bound until every port is picked, so the kernel
    cannot hand the same port out twice (picked one at a time, two of them did collide)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def run_l3rs(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    """``python -m l3rs.cli ARGS`` in a subprocess; asserts it succeeds and returns its stdout."""
    proc = subprocess.run([sys.executable, "-m", "l3rs.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"l3rs {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def local_head(cluster_dir: Path, num_cpus: int) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Starts a head with ``cluster/start_local.sh`` on free ports; yields ``(dashboard URL, GCS address, env)``,
    ``env`` being the environment of its clients (this interpreter on PATH, also for the jobs and the scripts).
    Stops it with ``cluster/stop_local.sh`` on exit."""
    from l3rs.service.raycluster import loopback_env

    env = loopback_env()
    env.pop("RAY_ADDRESS", None)
    env["L3RS_CLUSTER_DIR"] = str(cluster_dir)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_BIN"] = os.path.join(bin_dir, "ray")
    names = ("port", "dashboard-port", "metrics-port", "client-port")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    args = [str(REPO / "cluster" / "start_local.sh"), "--num-cpus", str(num_cpus)]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}", env
    finally:
        subprocess.run([str(REPO / "cluster" / "stop_local.sh")], env=env, capture_output=True, timeout=120)
