"""A work unit is a pure function of its payload, whatever else the machine runs (issue 12).

XLA:CPU's numbers depend on how many cores a process may use when JAX starts (environment.md: the same unit pinned to
one core and unpinned gives different losses). Workers therefore always pin themselves to one core (``l3rs.cpu``):
exclusively when a core is free, sharing the least loaded one when every core is held by someone else (another run, an
evaluation, a killed predecessor that has not exited yet). These tests hold every core lock from another process and
check that:

- claiming still pins (to exactly one core, spread over the cores), a sharer moves to a core freed later, and the lock
  folder is tidied when the processes exit (no JAX, fast);
- the same work units of the real inner loop give bit-identical losses on a free core, on a shared core, and moved to
  a freed core half way;
- a meta-training run on CPU workers, with every core lock held by another process and a worker killed mid-run, ends
  with the ψ (and fitness history) of an undisturbed run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import l3rs

REPO = Path(l3rs.__file__).resolve().parent.parent
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs sched_setaffinity (Linux)")

# A process that claims cores, then obeys commands on stdin, answering one JSON line each:
#   "state": its claim; "rebalance": rebalance(), then its claim; "exit": a normal exit (atexit tidies the folder).
# Extra threads are started after the claim, as JAX's would be, so that moving "the process" is checked for all of
# its threads. If L3RS_TEST_UNITS is set, "units ..." runs work units of the real inner loop (see UNITS).
CLAIMANT = r"""
import json, os, sys, threading
from l3rs import cpu
n, directory = int(sys.argv[1]), sys.argv[2]
cores = cpu.claim_cores(n, lock_dir=directory)
stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]
for t in threads:
    t.start()

def state():
    tasks = sorted(os.listdir("/proc/self/task"))
    return {"cores": cores, "shared": cpu.is_shared(), "affinity": sorted(os.sched_getaffinity(0)),
            "threads": len(tasks), "thread_affinities": sorted({tuple(sorted(os.sched_getaffinity(int(t))))
                                                                  for t in tasks})}

runner = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "rebalance":
        cores = cpu.rebalance()
    elif cmd[0] == "exit":
        print(json.dumps({"exit": True}), flush=True)
        break
    elif cmd[0] == "units":
        if runner is None:
            sys.path.insert(0, os.environ["L3RS_TEST_DIR"])
            from test_determinism import run_units
            runner = run_units
        print(json.dumps({**state(), "losses": runner([int(s) for s in cmd[1:]])}), flush=True)
        continue
    print(json.dumps(state()), flush=True)
"""


class Claimant:
    """A child process running :data:`CLAIMANT` (``n`` cores from ``directory``)."""

    def __init__(self, n: int, directory: Path, **env: str) -> None:
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "L3RS_TEST_DIR": str(Path(__file__).parent),
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, str(n), str(directory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        )  # fmt: skip
        self.state = self.ask("state")

    def ask(self, command: str, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"claimant died: {self.proc.communicate(timeout=timeout)[1][-3000:]}")
        return json.loads(line)

    def exit(self) -> None:
        self.ask("exit")
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def claimants():
    started: list[Claimant] = []

    def start(n: int, directory: Path, **env: str) -> Claimant:
        c = Claimant(n, directory, **env)
        started.append(c)
        return c

    yield start
    for c in started:
        c.kill()


def test_claims_always_pin_share_the_least_loaded_core_move_when_freed_and_tidy_up(tmp_path, claimants):
    locks = tmp_path / "locks"
    holder = claimants(len(CORES), locks)  # another job holding every core
    assert holder.state["cores"] == CORES and not holder.state["shared"]
    # Every core is taken: a worker still pins to exactly one core (it shares), it never runs unpinned.
    first = claimants(1, locks)
    second = claimants(1, locks)
    for c in (first, second):
        assert c.state["shared"] and len(c.state["cores"]) == 1 and c.state["affinity"] == c.state["cores"]
        assert c.state["thread_affinities"] == [c.state["cores"]]  # threads started later inherit it
    if len(CORES) > 1:  # sharers spread over the cores
        assert first.state["cores"] != second.state["cores"]
    # As when a killed worker's process is finally gone: its cores become free, and a sharer moves to one of them
    # with all of its threads, on one core still.
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(timeout=30)
    moved = first.ask("rebalance")
    assert not moved["shared"] and len(moved["cores"]) == 1 and moved["threads"] >= 4
    assert moved["thread_affinities"] == [moved["cores"]] and moved["affinity"] == moved["cores"]
    # A new claimant now finds a free core if one is left, and is exclusive there.
    third = claimants(1, locks)
    assert len(third.state["cores"]) == 1 and third.state["shared"] == (len(CORES) < 2)
    # Lock files and the folder go away once every claimant has exited (the killed holder's file is tidied too).
    for c in (first, second, third):
        c.exit()
    assert not locks.exists(), sorted(os.listdir(locks))


def test_the_default_lock_folder_is_private_to_the_user(tmp_path, monkeypatch):
    from l3rs import cpu

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    path = Path(cpu.default_lock_dir())
    assert path.parent == tmp_path and path.name == f"l3rs-cores-{os.getuid()}"
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)  # as if made under umask 0: made private before use
    assert cpu._ensure_dir(str(path)) and (path.stat().st_mode & 0o777) == 0o700
    other = tmp_path / "link"
    other.symlink_to(path)  # not a real folder: not used for locks (the worker then pins without them)
    assert not cpu._ensure_dir(str(other))
