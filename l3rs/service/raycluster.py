"""Starting or joining Ray, on loopback unless told otherwise.

A local Ray instance started by l3rs (``l3rs train`` without ``--address``, ``l3rs demo``, tests) binds every socket to
127.0.0.1: Ray only honours ``_node_ip_address`` when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment
*before* ``ray`` is imported (:func:`init_local` sets it, and fixes Ray's import-time flag if ``ray`` was imported
first). :func:`connect` does the same only for a loopback address: a driver joining a real cluster (e.g. a job on a
head node with ``RAY_ADDRESS=10.0.0.5:6379``) must keep the node's real address.

Token authentication (on by default for local clusters in Ray >= 2.59) is left as Ray configures it: nothing here
disables it. Processes that must talk to the same cluster need the same ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH``; :func:`loopback_env` passes the current ones on to subprocesses.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["LOOPBACK", "connect", "init_local", "is_loopback_address", "loopback_env"]

log = logging.getLogger("l3rs.service.raycluster")

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _force_loopback_env() -> None:
    """Makes Ray honour ``_node_ip_address`` (and default to loopback) in this process and its children."""
    os.environ[_CLUSTER_ENV] = "0"
    rc = sys.modules.get("ray._private.ray_constants")
    if rc is not None and getattr(rc, "ENABLE_RAY_CLUSTER", False):
        # ray was imported before us: its import-time flag missed the variable. Ray reads the flag at call time.
        rc.ENABLE_RAY_CLUSTER = False


def loopback_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A complete environment for a subprocess that starts or joins a loopback Ray cluster (``ray start``, ``l3rs``).

    Args:
      base: the environment to start from (default: this process's ``os.environ``), so its Ray auth settings
        (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) carry over unchanged.

    Returns:
      A new dict: ``base`` plus ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Pass ``--node-ip-address=127.0.0.1`` to
      ``ray start`` as well.
    """
    env = dict(os.environ if base is None else base)
    env[_CLUSTER_ENV] = "0"
    return env


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``, ``auto``) points at this machine's loopback."""
    addr = address.strip()
    if addr in ("auto", "local"):
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address(addr)
        except Exception:  # no cluster recorded: nothing to keep on loopback
            return False
        if resolved is None:
            return False
        addr = resolved
    if "://" in addr:
        addr = addr.split("://", 1)[1]
    host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 or addr.startswith("[") else addr
    return host in _LOOPBACK_HOSTS


def init_local(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    **kwargs: Any,
) -> Any:
    """Starts a new local Ray instance bound to 127.0.0.1 (or reuses the one this process is already connected to).

    Args:
      num_cpus, num_gpus: logical resources of the local node (default: Ray's detection). Logical GPUs work on a
        CPU-only machine (actors get ``CUDA_VISIBLE_DEVICES``; JAX still runs on CPU).
      include_dashboard: start the dashboard (on 127.0.0.1) for monitoring.
      **kwargs: passed on to ``ray.init`` (e.g. ``object_store_memory``, ``runtime_env``); they override ours.

    Returns:
      The ``RayContext`` that ``ray.init`` returns.
    """
    _force_loopback_env()
    import ray

    options: dict[str, Any] = {
        # "local": always a new instance. Without it ray.init() joins whatever cluster was started last on this
        # machine (/tmp/ray/ray_current_cluster), possibly someone else's; use connect() to join one on purpose.
        "address": "local",
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "include_dashboard": include_dashboard,
        "dashboard_host": LOOPBACK,
        "_node_ip_address": LOOPBACK,
        "log_to_driver": True,
        "ignore_reinit_error": True,
    }
    options.update(kwargs)
    if ray.is_initialized():
        log.info("Ray is already initialized in this process; reusing it")
    context = ray.init(**options)
    log.info("local Ray on %s: %s", LOOPBACK, ray.cluster_resources())
    return context


def connect(address: str, **kwargs: Any) -> Any:
    """Joins an existing Ray cluster: ``ray.init(address=address)``.

    When the address is this machine's loopback (``127.0.0.1:6379``, ``localhost:...``, or ``auto`` resolving to
    one) the driver also stays on loopback (``_node_ip_address="127.0.0.1"``). ``ray://`` client addresses are passed
    through unchanged.

    Args:
      address: the cluster address (``host:port``, ``auto``, ``ray://host:10001``).
      **kwargs: passed on to ``ray.init``.

    Returns:
      The context that ``ray.init`` returns.
    """
    options: dict[str, Any] = {"address": address, "log_to_driver": True}
    if not address.startswith("ray://") and is_loopback_address(address):
        _force_loopback_env()
        options["_node_ip_address"] = LOOPBACK
    import ray

    options.update(kwargs)
    context = ray.init(**options)
    log.info("connected to Ray cluster at %s: %s", address, ray.cluster_resources())
    return context
