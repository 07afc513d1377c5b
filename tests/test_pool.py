"""The elastic worker pool on a real local Ray cluster: results are the same whatever happens to the workers.

The worker class lives in this module (not a package, so Ray workers could not import it): it is shipped to the workers
by value (``ray.cloudpickle.register_pickle_by_value``). Faults are chosen by the payload; "only the first time" is
decided by a marker file on disk, which survives the worker that created it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psutil
import pytest
import ray

from l3rs.service.pool import ElasticPool, PoolError, WorkUnit, actor_options
from l3rs.service.raycluster import is_loopback_address, loopback_env

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def expected(x: int) -> dict[str, Any]:
    """The result of unit x, whichever worker runs it and however often."""
    return {"x": x, "square": x * x, "digest": hashlib.sha256(str(x).encode()).hexdigest()[:16]}


def _first_time(marker: str, content: str = "") -> bool:
    """True exactly once per marker path (atomically creates the file)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


class SlowSquare:
    """A test worker: sleeps a payload-dependent time, returns ``expected(x)``, or fails as the payload asks.

    payload keys: ``x``; ``sleep`` (s); ``trace`` (a folder: every attempt first writes ``ran-<x>-<node>-<pid>``
    there); ``log`` (a file: every attempt appends x); ``gate`` (a path: wait until it exists, at most 60 s);
    ``fault`` with ``marker`` (a path): ``exit_once`` (``os._exit(1)`` the first time), ``hang_once`` (sleep 120 s
    the first time), ``pid_once`` (write the pid to ``marker`` and sleep 120 s the first time: the test kills the
    process), ``exit_always``, ``raise``.
    """

    def __init__(self, setup_s: float = 0.0, broken: bool = False) -> None:
        time.sleep(setup_s)  # a slow setup (loading data, compiling) is not a unit timeout
        if broken:
            raise FileNotFoundError("no dataset at /nonexistent")

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        x = payload["x"]
        if payload.get("trace"):
            node = ray.get_runtime_context().get_node_id()
            open(os.path.join(payload["trace"], f"ran-{x}-{node}-{os.getpid()}"), "w").close()
        if payload.get("log"):
            with open(payload["log"], "a") as f:
                f.write(f"{x}\n")
        if payload.get("gate"):
            deadline = time.monotonic() + 60.0
            while not os.path.exists(payload["gate"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        fault, marker = payload.get("fault"), payload.get("marker", "")
        if fault == "exit_always" or (fault == "exit_once" and _first_time(marker)):
            os._exit(1)
        if fault == "hang_once" and _first_time(marker):
            time.sleep(120.0)
        if fault == "pid_once" and not os.path.exists(marker):
            tmp = f"{marker}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.replace(tmp, marker)
            time.sleep(120.0)
        if fault == "raise":
            raise ValueError(f"bad payload x={x}")
        time.sleep(payload.get("sleep", 0.0))
        return expected(x)


def make_units(n: int, gen: int = 0, sleep: float = 0.1, **extra: Any) -> list[WorkUnit]:
    """n units with keys (gen, i, 0); costs deliberately not sorted."""
    return [
        WorkUnit(key=(gen, i, 0), payload={"x": i, "sleep": sleep * (1 + i % 3), **extra}, cost=float((7 * i) % n))
        for i in range(n)
    ]


def with_fault(units: list[WorkUnit], i: int, **payload: Any) -> list[WorkUnit]:
    out = list(units)
    out[i] = out[i]._replace(payload={**out[i].payload, **payload})
    return out


def check_results(results: dict, units: list[WorkUnit]) -> None:
    assert list(results) == [u.key for u in units]
    assert results == {u.key: expected(u.payload["x"]) for u in units}


def new_pool(**kw: Any) -> ElasticPool:
    options = dict(resources={"CPU": 1.0}, min_workers=1, max_workers=2, unit_timeout_s=60.0, poll_s=0.2)
    options.update(kw)
    args = (options.pop("setup_s", 0.0), options.pop("broken", False))
    return ElasticPool(SlowSquare, args=args, **options)


def ran_on(trace: str, node_id: str) -> list[str]:
    return glob.glob(os.path.join(trace, f"ran-*-{node_id}-*"))


def on_node(worker: dict[str, Any], node_id: str) -> bool:
    return worker["info"] is not None and worker["info"]["node_id"] == node_id


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------------------------------------
# without Ray
# ----------------------------------------------------------------------------------------------------------------
def test_actor_options_and_validation():
    assert actor_options({"CPU": 1.0}) == {"num_cpus": 1.0}
    assert actor_options({"GPU": 1}) == {"num_cpus": 0.0, "num_gpus": 1.0}
    assert actor_options({"CPU": 2, "GPU": 0.5, "TPU": 4}) == {
        "num_cpus": 2.0,
        "num_gpus": 0.5,
        "resources": {"TPU": 4.0},
    }
    assert WorkUnit(key=1, payload=None).cost == 1.0
    with pytest.raises(ValueError, match="min_workers"):
        ElasticPool(SlowSquare, min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="pipeline_depth"):
        ElasticPool(SlowSquare, pipeline_depth=3)
    pool = ElasticPool(SlowSquare)
    with pytest.raises(ValueError, match="duplicate"):
        pool.run([WorkUnit(key=(0, 1, 0), payload={}), WorkUnit(key=(0, 1, 0), payload={})])
    assert pool.run([]) == {}


def test_loopback_helpers():
    assert is_loopback_address("127.0.0.1:6379")
    assert is_loopback_address("localhost:6379")
    assert is_loopback_address("ray://127.0.0.1:10001")
    assert not is_loopback_address("10.0.0.5:6379")
    env = loopback_env({"PATH": "/bin", "RAY_AUTH_MODE": "token"})
    assert env == {"PATH": "/bin", "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ----------------------------------------------------------------------------------------------------------------
# on a real cluster (head: 2 logical CPUs)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_undisturbed_results_do_not_depend_on_worker_count(ray_connected, tmp_path):
    units = make_units(10)
    with new_pool(max_workers=2) as pool:
        two = pool.run(units)
        stats = pool.stats()
        again = pool.run(make_units(4, gen=1))
    check_results(two, units)
    check_results(again, make_units(4, gen=1))
    assert stats["units_done"] == 10 and stats["retries"] == 0 and stats["failures"] == 0
    assert stats["live_workers"] == 2
    assert sum(w["units_done"] for w in stats["workers"]) == 10
    assert len({w["info"]["pid"] for w in stats["workers"]}) == 2
    log = str(tmp_path / "order")
    with new_pool(max_workers=1, pipeline_depth=2) as pool:
        one = pool.run([u._replace(payload={**u.payload, "log": log}) for u in units], method="run")
        assert pool.stats()["live_workers"] == 1
    assert one == two
    # One worker runs the units in dispatch order: longest (highest cost) first.
    with open(log) as f:
        order = [int(line) for line in f]
    assert order == [u.payload["x"] for u in sorted(units, key=lambda u: -u.cost)]
    pool.shutdown()  # idempotent


@pytest.mark.ray
@pytest.mark.parametrize("how", ["own_exit", "sigkill"])
def test_killed_worker_is_replaced_and_results_unchanged(ray_connected, tmp_path, how):
    marker = str(tmp_path / "marker")
    units = make_units(10)
    # The costliest unit (dispatched first) takes its worker down the first time it runs.
    victim = max(range(10), key=lambda i: units[i].cost)
    fault = "exit_once" if how == "own_exit" else "pid_once"
    units = with_fault(units, victim, fault=fault, marker=marker)
    killer = None
    if how == "sigkill":

        def kill() -> None:
            if wait_for(lambda: os.path.exists(marker)):
                with open(marker) as f:
                    os.kill(int(f.read()), signal.SIGKILL)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
    with new_pool(max_workers=2) as pool:
        results = pool.run(units)
        stats = pool.stats()
        # The replacement: a third worker starts once the dead one's CPU is free, and the pool is back to two.
        assert pool.warm_up(2, timeout_s=60) == 2
        after = pool.stats()
    if killer is not None:
        killer.join()
    check_results(results, units)
    assert stats["failures"] == 1
    assert stats["retries"] == 1
    assert stats["units_done"] == 10
    assert after["workers_started"] == 3


@pytest.mark.ray
def test_hung_unit_times_out_and_is_requeued_slow_setup_is_not_a_timeout(ray_connected, tmp_path):
    units = with_fault(make_units(6, sleep=0.05), 2, fault="hang_once", marker=str(tmp_path / "hang"))
    # Setup (3 s) is longer than the unit timeout (2 s): it must not count.
    with new_pool(max_workers=2, unit_timeout_s=2.0, setup_s=3.0) as pool:
        results = pool.run(units)
        stats = pool.stats()
        assert pool.warm_up(2, timeout_s=60) == 2  # the hung worker was killed and is replaced
        assert pool.stats()["workers_started"] == 3
    check_results(results, units)
    assert stats["failures"] == 1
    assert stats["retries"] == 1


@pytest.mark.ray
def test_application_error_is_not_retried(ray_connected):
    units = with_fault(make_units(6), 4, fault="raise")
    with new_pool(max_workers=2, max_unit_retries=5) as pool:
        with pytest.raises(PoolError, match=r"\(0, 4, 0\).*ValueError.*bad payload x=4") as info:
            pool.run(units)
        assert info.value.key == (0, 4, 0)
        stats = pool.stats()
        assert stats["retries"] == 0 and stats["failures"] == 0
        # The pool is still usable; leftovers of the aborted run don't leak into the next.
        clean = make_units(6, gen=1)
        check_results(pool.run(clean), clean)
        assert pool.stats()["failures"] == 0


@pytest.mark.ray
def test_broken_worker_setup_is_not_retried(ray_connected):
    with new_pool(max_workers=2, broken=True) as pool:
        with pytest.raises(PoolError, match="constructor failed.*FileNotFoundError: no dataset at /nonexistent"):
            pool.run(make_units(4))
        assert pool.stats()["failures"] == 0


@pytest.mark.ray
def test_unit_that_keeps_killing_workers_raises(ray_connected):
    units = with_fault(make_units(4), 1, fault="exit_always")
    with new_pool(max_workers=2, max_unit_retries=1) as pool:
        with pytest.raises(PoolError, match=r"\(0, 1, 0\) failed 2 times \(max_unit_retries=1\)") as info:
            pool.run(units)
        assert info.value.key == (0, 1, 0)
        assert pool.stats()["failures"] == 2


class Background:
    """Runs ``pool.run(units)`` in a thread: cluster nodes can only be added/removed from the main thread."""

    def __init__(self, pool: ElasticPool, units: list[WorkUnit]) -> None:
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(pool, units), daemon=True)
        self.thread.start()

    def _run(self, pool: ElasticPool, units: list[WorkUnit]) -> None:
        try:
            self.result = pool.run(units)
        except BaseException as e:  # noqa: B036 - handed to the main thread
            self.error = e

    def join(self) -> dict:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "pool.run did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.mark.ray
def test_node_added_mid_run_gets_workers_in_the_same_run(ray_connected, tmp_path):
    cluster = ray_connected
    trace, gate = str(tmp_path), str(tmp_path / "gate")
    # Every unit waits at the gate; it opens once both workers of the new node have started a unit (or after 60 s).
    units = make_units(8, sleep=0.05, trace=trace, gate=gate)
    node = None
    with new_pool(min_workers=1, max_workers=4) as pool:
        try:
            run = Background(pool, units)
            assert wait_for(lambda: glob.glob(os.path.join(trace, "ran-*")))
            node = cluster.add_node(num_cpus=2)
            wait_for(lambda: len(ran_on(trace, node.node_id)) >= 2)
        finally:
            open(gate, "w").close()
        results = run.join()
        stats = pool.stats()
    if node is not None:
        cluster.remove_node(node)
    check_results(results, units)
    assert ran_on(trace, node.node_id), "no unit ran on the node added mid-run"
    assert stats["live_workers"] == 4
    assert {w["info"]["node_id"] for w in stats["workers"]} == {node.node_id, cluster.head.node_id}


@pytest.mark.ray
@pytest.mark.parametrize("graceful", [True, False], ids=["removed", "crashed"])
def test_node_removed_mid_run_results_complete_and_equal(ray_connected, tmp_path, graceful):
    cluster = ray_connected
    node = cluster.add_node(num_cpus=2)
    trace, gate = str(tmp_path), str(tmp_path / "gate")
    units = make_units(10, sleep=0.05, trace=trace, gate=gate)
    try:
        with new_pool(min_workers=1, max_workers=4) as pool:
            try:
                run = Background(pool, units)
                # Remove the node while one of its workers is inside a unit.
                assert wait_for(lambda: ran_on(trace, node.node_id)), "no unit started on the extra node"
                doomed = [w["info"]["pid"] for w in pool.stats()["workers"] if on_node(w, node.node_id)]
                cluster.remove_node(node, allow_graceful=graceful)
                # After a crash a worker outlives its raylet by up to ~1 s: let it go before the units may finish.
                assert doomed and wait_for(lambda: not any(map(process_alive, doomed)))
            finally:
                open(gate, "w").close()
            results = run.join()
            stats = pool.stats()
            # A worker of the lost node that was idle at the end is found out when the next run gives it a unit.
            # (4 units: one for each worker the pool may still believe in.)
            check_results(pool.run(make_units(4, gen=1)), make_units(4, gen=1))
            after = pool.stats()
    finally:
        if node in cluster.nodes:
            cluster.remove_node(node)
    check_results(results, units)
    assert stats["failures"] >= 1 and stats["retries"] >= 1
    assert stats["units_done"] == 10
    assert after["live_workers"] == 2  # only the head's two CPUs are left
    # (After a crash the pool may already try a worker on the dead node, which Ray still lists for a while.)
    assert {w["info"]["node_id"] for w in after["workers"] if w["state"] == "ready"} == {cluster.head.node_id}


@pytest.mark.ray
def test_init_local_binds_to_loopback(tmp_path):
    """``init_local`` in a fresh process: the node is on 127.0.0.1, with token auth as configured by the env."""
    script = textwrap.dedent(
        """
        import json, ray
        from l3rs.service.raycluster import init_local
        ctx = init_local(num_cpus=1, object_store_memory=100 * 2**20)
        nodes = ray.nodes()
        print(json.dumps({"addr": ctx.address_info["node_ip_address"],
                          "nodes": [n["NodeManagerAddress"] for n in nodes]}))
        ray.shutdown()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"addr": "127.0.0.1", "nodes": ["127.0.0.1"]}
