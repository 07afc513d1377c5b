"""Shared fixtures: one real local Ray cluster (``ray.cluster_utils.Cluster``) on loopback for the whole session.

Environment (set when this file is imported, before any Ray process starts, inherited by every child):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray honours ``127.0.0.1`` as node address; every Ray socket is on loopback.
- ``RAY_AUTH_MODE=token`` with a fresh per-session ``RAY_AUTH_TOKEN``: token auth stays on, every process of the
  session (cluster, drivers, ``ray start`` / ``l3rs`` subprocesses, which inherit ``os.environ``) agrees on one
  token, and ``~/.ray/auth_token`` is neither read nor written.
- ``RAY_ADDRESS`` is removed, so no test joins a cluster it did not start.
- ``JAX_COMPILATION_CACHE_DIR``: one persistent XLA compilation cache for the session, in a fresh temporary folder
  removed at exit (unless the variable is already set). Ray workers, evaluation processes and ``l3rs`` subprocesses of
  different tests compile the same small inner loops; from the second process on they load the program instead of
  compiling it. Fresh per session, so a run here costs what CI's cold start costs. Compiled programs give the same
  numbers whether compiled or loaded, so no result depends on the cache.
- ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`` (unless set): that cache keeps every program, not only those that
  took JAX's default of 1 s to compile. Each of the session's many Ray workers and subprocesses compiles dozens of
  small programs (initialisation, data preparation, the tiny test models' loops), each under a second; loading them
  is faster (README, "Time").

Fixtures:

``ray_cluster`` (session scope) -> :class:`LocalCluster`
    A started cluster: a head node with ``HEAD_CPUS`` (2) logical CPUs, no GPUs, ~150 MB object store, no dashboard,
    all on 127.0.0.1. The driver of the test process is *not* connected by this fixture (use ``ray_connected``).
    ``.address`` (``"127.0.0.1:PORT"``), ``.add_node(num_cpus=1, num_gpus=0, **kw) -> node`` (waits until the node
    is registered; logical GPUs work on CPU machines), ``.remove_node(node)`` (returns once the GCS lists the node as
    dead), ``.remove_added_nodes()``, ``.nodes``
    (nodes added by tests), ``.head``, ``.cluster`` (the underlying ``ray.cluster_utils.Cluster``),
    ``.loopback_env()`` (environment for subprocesses, e.g. ``l3rs train --address <address>``).

``ray_connected`` (module scope) -> :class:`LocalCluster`
    ``ray.init(address=ray_cluster.address)`` on loopback for the tests of one module; on teardown ``ray.shutdown()``
    (which ends every actor the module's tests created) and removal of any node a test added and left behind, so the
    next module starts with just the head again. A test that adds nodes should remove them itself too.

Add and remove nodes from the main thread only (Ray installs signal handlers there); run the code under test in a
thread when a node must come or go while it runs (see ``tests/test_pool.py``: ``Background``).

Tests that use Ray are marked ``@pytest.mark.ray`` (``pytest -m "not ray"`` skips them); a test that uses one of these
fixtures gets the mark automatically.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="l3rs-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

LOOPBACK = "127.0.0.1"
HEAD_CPUS = 2
OBJECT_STORE_BYTES = 150 * 1024 * 1024


class LocalCluster:
    """A ``ray.cluster_utils.Cluster`` on loopback with small nodes; see the module docstring."""

    def __init__(self, head_cpus: int = HEAD_CPUS) -> None:
        from ray._private.utils import get_ray_address_file, read_ray_address
        from ray.cluster_utils import Cluster

        previous = read_ray_address()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args=self._node_args(num_cpus=head_cpus, include_dashboard=False),
        )
        # Cluster records its address in /tmp/ray/ray_current_cluster, where any plain ray.init() on this machine
        # (other people's too) would pick it up and join us: put back what was there before.
        address_file = get_ray_address_file(None)
        if read_ray_address() == self.cluster.address:
            if previous is None:
                os.remove(address_file)
            else:
                with open(address_file, "w") as f:
                    f.write(previous)
        self.head = self.cluster.head_node
        self.nodes: list[Any] = []

    @staticmethod
    def _node_args(**kw: Any) -> dict[str, Any]:
        args = {
            "node_ip_address": LOOPBACK,
            "object_store_memory": OBJECT_STORE_BYTES,
            "num_gpus": 0,
            "dashboard_port": None,  # any free port: 8265 may belong to someone else's cluster on this machine
        }
        args.update(kw)
        return args

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, num_cpus: float = 1, num_gpus: float = 0, **kw: Any) -> Any:
        """Starts one more node (``ray.cluster_utils.Cluster.add_node``) and waits until it is registered."""
        node = self.cluster.add_node(wait=True, **self._node_args(num_cpus=num_cpus, num_gpus=num_gpus, **kw))
        self.nodes.append(node)
        return node

    def remove_node(self, node: Any, allow_graceful: bool = True, timeout_s: float = 120) -> None:
        """Kills a node's processes (its actors die with ``ActorDiedError``) and waits until the GCS lists it as dead.

        Not the head. After a crash (``allow_graceful=False``) the GCS finds the node dead only when it has missed
        enough health checks (about 15 s with Ray's defaults). Until then it still offers the node's resources, and a
        later test's actor can be placed there and die before it starts, which that test would see as a fault of
        its own. Waiting here keeps one test's removed node out of the next test.
        """
        from ray._raylet import GcsClient

        if node is self.head:
            raise ValueError("the head node belongs to the session; remove nodes you added")
        self.cluster.remove_node(node, allow_graceful=allow_graceful)
        self.nodes.remove(node)
        gcs, deadline = GcsClient(address=self.address), time.monotonic() + timeout_s
        while self._alive_in_gcs(gcs, node.node_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.node_id} was killed; the GCS still lists it alive after {timeout_s} s")
            time.sleep(0.2)

    @staticmethod
    def _alive_in_gcs(gcs: Any, node_id: str) -> bool:
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        info = gcs.get_all_node_info(timeout=30)
        return any(key.hex() == node_id and entry.state == GcsNodeInfo.ALIVE for key, entry in info.items())

    def remove_added_nodes(self) -> None:
        for node in list(self.nodes):
            self.remove_node(node)

    def loopback_env(self) -> dict[str, str]:
        from l3rs.service.raycluster import loopback_env

        return loopback_env()

    def shutdown(self) -> None:
        self.nodes.clear()
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_connected(ray_cluster: LocalCluster) -> Iterator[LocalCluster]:
    import ray

    from l3rs.service.raycluster import connect

    if ray.is_initialized():  # a previous module left its driver connected
        ray.shutdown()
    connect(ray_cluster.address)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
        ray_cluster.remove_added_nodes()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that uses a Ray fixture with ``ray``."""
    for item in items:
        if {"ray_cluster", "ray_connected"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
