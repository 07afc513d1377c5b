"""Holding a CPU worker process to exactly ``n`` cores of the machine, whatever else runs there.

Why pinning: XLA:CPU runs one program on a thread pool as large as the process's CPU affinity, whatever ``XLA_FLAGS``
say about Eigen. Measured here (2 cores): one unpinned worker kept both cores busy, and two unpinned workers each ran
at half speed; pinned to one core each, two workers gave 2.2x the throughput of one pinned worker
(``benchmarks/service_scaling.py``). And the *numbers* depend on it: the same work unit run pinned to one core and run
unpinned gives different losses (environment.md; issue 12), while pinned to core 0 and to core 1 it gives the same.
So a process whose results must be bit-for-bit (a meta-training worker, an evaluation process) must always start
with the same number of cores in its affinity, whatever else the machine is running.

:func:`claim_cores` therefore always pins the calling process to ``n`` cores (capped at the cores it may use):

1. *Exclusive* when it can: ``n`` cores no other claimant holds, each held through an exclusive ``flock`` on
   ``core-C.lock``. This is the common case (the demo's two workers on two cores) and the fastest.
2. *Shared* otherwise: when another job, an evaluation or a dying predecessor holds the cores, the process still pins
   to ``n`` cores, the least loaded ones, holding a share slot ``core-C.sK.lock`` (K = 1, 2, ...: slots are taken
   level by level, so sharers spread over the cores). It runs slower but computes the same numbers. Never unpinned.
3. :func:`rebalance` (called by a worker between units) moves a process on a share slot to a core that has become
   free since, e.g. once a killed predecessor is gone: all its threads move, so the thread pool size, fixed when JAX
   started, stays what it was and so do the numbers.

Call :func:`claim_cores` before JAX's first computation (which starts XLA's thread pool, sized from the affinity);
threads created afterwards inherit the affinity, and threads that exist already are moved.

Locks are ``flock`` s: the kernel releases them when the process exits, SIGKILL included, so a killed process never
keeps a core. The lock folder (:func:`default_lock_dir`) is one per user and machine, ``<tmp>/l3rs-cores-<uid>``
(mode 0700, checked to be the user's own): cores are a machine resource, so every l3rs process of the user on the
machine (the workers of any run or Ray cluster, evaluation processes) must see the same locks to spread over the
cores. A folder per run or per Ray session would let two runs on one machine pile onto the same core. Sharing the
folder cannot make runs interfere in their results: a lock decides only *which* core a process runs on, never whether
it is pinned.
A process that exits normally removes its lock files and every other unheld one, and the folder once it is empty;
files of killed processes are reused by name (at most one per core and share level) until then.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import stat
import tempfile

__all__ = ["claim_cores", "claim_from_env", "default_lock_dir", "is_shared", "rebalance", "release_cores", "PIN_ENV"]

log = logging.getLogger(__name__)

PIN_ENV = "L3RS_PIN_CORES"
"""Environment variable: number of cores a worker process should claim (unset or 0: do not pin)."""

_MAX_SHARE_LEVEL = 64  # share slots per core; past that a claimant pins without a lock (still one core)


class _Slot:
    """One held lock: ``core`` at share ``level`` (0: exclusive), the open file and its path."""

    def __init__(self, core: int, level: int, fd: int, path: str) -> None:
        self.core, self.level, self.fd, self.path = core, level, fd, path


_held: list[_Slot] = []  # kept open for the life of the process (or until rebalance/release)
_pinned: list[int] = []  # the cores this process is pinned to (also when pinned without a lock)
_dir: list[str] = []  # the lock folder in use
_allowed: list[int] = []  # the cores this process could use before it was pinned
_atexit_registered = False


def default_lock_dir() -> str:
    """The per-user core-lock folder of this machine: ``<tmp>/l3rs-cores-<uid>`` (see the module docstring)."""
    return os.path.join(tempfile.gettempdir(), f"l3rs-cores-{os.getuid()}")


def _slot_name(core: int, level: int) -> str:
    return f"core-{core}.lock" if level == 0 else f"core-{core}.s{level}.lock"


def _ensure_dir(path: str) -> bool:
    """Creates the folder (0700) if needed; False unless it is a real folder owned by this user and private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    if st.st_mode & 0o022:  # ours, but others may write into it (an old folder made under umask 0)
        os.chmod(path, 0o700)
    return True


def _try_lock(directory: str, core: int, level: int) -> _Slot | None:
    """An exclusive non-blocking ``flock`` on one slot file, or None if another process holds it.

    The file may be unlinked by an exiting process between our open and our lock (:func:`_sweep`): the lock then
    holds a file nobody else will see, so the path is checked to still name the locked file, and the slot is retried.
    """
    path = os.path.join(directory, _slot_name(core, level))
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # the folder itself was just removed by an exiting process
            _ensure_dir(directory)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return _Slot(core, level, fd, path)
        os.close(fd)  # a stale, unlinked file: take the new one
    return None


def _release(slot: _Slot, unlink: bool) -> None:
    if unlink:  # while still holding the lock, so nobody else holds this file (see _try_lock)
        with contextlib.suppress(OSError):
            os.unlink(slot.path)
    os.close(slot.fd)


def _sweep(directory: str) -> None:
    """Removes the unheld lock files of ``directory`` and the folder if that leaves it empty."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith("core-") and name.endswith(".lock")):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except OSError:
            pass  # held by someone, or already gone
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # fails while any file is left


def _at_exit() -> None:
    release_cores()


def _claim(directory: str, cores: list[int], n: int) -> list[_Slot]:
    """``n`` slots on distinct cores: free cores first, then the lowest free share level, core by core."""
    slots: list[_Slot] = []
    for core in cores:
        if len(slots) == n:
            return slots
        slot = _try_lock(directory, core, 0)
        if slot is not None:
            slots.append(slot)
    for level in range(1, _MAX_SHARE_LEVEL + 1):
        for core in cores:
            if len(slots) == n:
                return slots
            if any(s.core == core for s in slots):
                continue
            slot = _try_lock(directory, core, level)
            if slot is not None:
                slots.append(slot)
    return slots


def claim_cores(n: int, lock_dir: str | None = None) -> list[int]:
    """Pins this process to ``n`` cores and returns them; always pinned, sharing cores if none are free.

    ``n`` is capped at the cores in the process's current affinity mask (only those are considered). Free cores are
    claimed exclusively; if fewer than ``n`` are free, the rest are shared with other claimants, least loaded first
    (:func:`is_shared` then says True). Returns [] only for ``n <= 0`` or where the OS cannot pin
    (no ``sched_setaffinity``). Idempotent: a second call returns the cores already claimed. Call it before JAX's
    first computation (XLA sizes its thread pool from the affinity then). All threads of the process are pinned.
    """
    global _atexit_registered
    if _pinned:
        return list(_pinned)
    if n <= 0 or not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    n = min(n, len(cores))
    directory = lock_dir or default_lock_dir()
    if _ensure_dir(directory):
        slots = _claim(directory, cores, n)
    else:
        log.warning("core-lock folder %s is not a private folder of this user: pinning without locks", directory)
        slots = []
    chosen = sorted(s.core for s in slots)
    if len(chosen) < n:  # no lock to be had (or no usable folder): still pinned, to cores chosen by pid
        rest = [c for c in cores if c not in chosen]
        start = os.getpid() % len(rest)
        chosen = sorted(chosen + (rest[start:] + rest[:start])[: n - len(chosen)])
    # Every thread: importing l3rs already imported numpy and JAX, whose BLAS threads exist by now (XLA's thread pool
    # does not: it is sized from the affinity when the backend starts, at the first computation).
    _set_process_affinity(set(chosen))
    _held.extend(slots)
    _pinned.extend(chosen)
    _dir[:] = [directory]
    _allowed[:] = cores
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True
    return list(chosen)


def is_shared() -> bool:
    """True if this process is pinned but shares at least one of its cores with another claimant."""
    return bool(_pinned) and (len(_held) < len(_pinned) or any(s.level > 0 for s in _held))


def _set_process_affinity(cores: set[int]) -> None:
    """Moves every thread of this process to ``cores`` (``sched_setaffinity(0)`` affects the calling thread only)."""
    for _ in range(3):  # a thread started meanwhile inherits its creator's old mask: go over them again
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(tid, cores)
        if sorted(int(t) for t in os.listdir("/proc/self/task")) == sorted(tids):
            return


def rebalance() -> list[int]:
    """Moves a process that shares a core to a core that has become free since, if there is one; returns the cores.

    The number of cores stays the same (so do XLA's thread pool and the numbers it computes); only which cores
    changes. Cheap when nothing is shared (no system call). Call it between units, not while computing.
    """
    if not is_shared() or not _dir:
        return list(_pinned)
    directory = _dir[0]
    mine = set(_pinned)
    moved = False
    for i, slot in enumerate(list(_held)):
        if slot.level == 0:
            continue
        for core in [slot.core] + [c for c in _allowed if c not in mine]:  # its own core first: no move at all
            new = _try_lock(directory, core, 0)
            if new is not None:
                _held[i] = new
                mine.discard(slot.core)
                mine.add(core)
                _release(slot, unlink=True)
                moved = True
                break
    if moved:
        _set_process_affinity(mine)
        _pinned[:] = sorted(mine)
    return list(_pinned)


def release_cores() -> None:
    """Releases this process's core locks (their files are removed) and tidies the lock folder. The affinity stays.

    Runs by itself when the process exits normally; the kernel releases the locks of a killed process anyway.
    """
    while _held:
        _release(_held.pop(), unlink=True)
    if _dir:
        _sweep(_dir[0])


def claim_from_env() -> list[int]:
    """:func:`claim_cores` with the count from ``$L3RS_PIN_CORES`` (set by the service for CPU workers)."""
    try:
        n = int(os.environ.get(PIN_ENV, "0") or 0)
    except ValueError:
        return []
    return claim_cores(n)
