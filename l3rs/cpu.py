"""Holding a CPU worker process to its share of the machine's cores.

XLA:CPU runs one program on a thread pool as large as the machine, whatever ``XLA_FLAGS`` say about Eigen: measured
here (2 cores), one unpinned worker process kept both cores busy, and two unpinned workers each ran at half speed,
a 1.0x gain for the second worker. Pinned to one core each, two workers gave 2.2x the throughput of one pinned
worker and 1.26x that of one unpinned worker (``benchmarks/service_scaling.py``).

:func:`claim_cores` pins the calling process to ``n`` cores no other l3rs process on this machine holds. A core is
held through an exclusive ``flock`` on a file in the temp dir, released by the kernel when the process exits (also
on SIGKILL), so a replacement worker can take its predecessor's core at once. Call it before JAX is imported: threads
created afterwards inherit the affinity.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from typing import IO

__all__ = ["claim_cores", "PIN_ENV"]

PIN_ENV = "L3RS_PIN_CORES"
"""Environment variable: number of cores a worker process should claim (unset or 0: do not pin)."""

_held: list[IO[bytes]] = []  # lock files kept open for the life of the process


def claim_cores(n: int, lock_dir: str | None = None) -> list[int]:
    """Pins this process to ``n`` cores that no other claimant holds; returns them ([] if not enough were free).

    Only cores in the process's current affinity mask are considered. Idempotent: a second call returns the cores
    already claimed.
    """
    if _held:
        return sorted(os.sched_getaffinity(0))
    if n <= 0 or not hasattr(os, "sched_setaffinity"):
        return []
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), f"l3rs-cores-{os.getuid()}")
    os.makedirs(lock_dir, exist_ok=True)
    claimed: list[tuple[int, IO[bytes]]] = []
    for core in sorted(os.sched_getaffinity(0)):
        f = open(os.path.join(lock_dir, f"core-{core}.lock"), "ab")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        claimed.append((core, f))
        if len(claimed) == n:
            break
    if len(claimed) < n:
        for _, f in claimed:
            f.close()  # releases the lock
        return []
    os.sched_setaffinity(0, {core for core, _ in claimed})
    _held.extend(f for _, f in claimed)
    return [core for core, _ in claimed]


def claim_from_env() -> list[int]:
    """:func:`claim_cores` with the count from ``$L3RS_PIN_CORES`` (set by the service for CPU workers)."""
    try:
        n = int(os.environ.get(PIN_ENV, "0") or 0)
    except ValueError:
        return []
    return claim_cores(n)
