"""An elastic, fault-tolerant pool of Ray worker actors that evaluates keyed work units.

Fault model
-----------
A *fault* is anything that takes a worker away from under a unit: the actor process dies (killed, OOM, ``os._exit``,
segfault), its node is removed or dies, or the unit runs longer than ``unit_timeout_s`` (a hung worker). Ray reports
the first two as ``RayActorError`` / ``ActorDiedError`` (or ``WorkerCrashedError``, ``NodeDiedError``,
``ObjectLostError``, ...). On a fault the pool kills the actor (``max_restarts=0``: the pool, not Ray, replaces
workers), re-queues every unit that was in flight on it, and starts a replacement when the cluster has room. A unit
that meets more than ``max_unit_retries`` faults (a "poison" unit that kills every worker it touches) ends the run
with :class:`PoolError`. A worker that dies while idle is found out when it is next given a unit (that unit is
re-queued like any other); one whose node crashed may still deliver the unit it was running, which is just as valid.

An *application error* is an exception raised by the worker's own method (a bug or a bad payload). Running it again
would fail again, so it is not retried: it ends the run at once with :class:`PoolError` naming the unit. The same
holds for an exception in the worker's constructor.

Worker setup (the constructor and ``ready()``: loading data, compiling) is waited for with its own generous
``ready_timeout_s``; a slow setup is never counted against a unit.

Determinism
-----------
``run(units)`` returns only when *every* unit has exactly one result, keyed by ``unit.key`` (design.md,
"Deterministic under faults"). A unit is a pure function of its payload, so which worker ran it, in which order, and
how many times it was retried cannot change the returned mapping; its order is the order of ``units``. The schedule
(longest first, at most ``pipeline_depth`` units in flight per worker, collected with ``ray.wait``) only affects speed.

Elasticity
----------
At the start of every ``run`` and every ``poll_s`` seconds while it runs (and at once after a fault) the pool compares
the cluster's free resources with what one worker needs and starts workers up to ``max_workers``, so a node that
joins mid-run gets workers in the same run. It also asks the autoscaler for room for ``max_workers`` workers
(``ray.autoscaler.sdk.request_resources``). With fewer than ``min_workers`` placeable it carries on with what it has
and logs a warning; with none at all for ``placement_timeout_s`` it raises :class:`PoolError`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import ray
from ray import exceptions as rex

__all__ = ["ElasticPool", "PoolError", "WorkUnit", "actor_options"]

log = logging.getLogger("l3rs.service.pool")

# Ray errors that mean "the worker (or its node, or the result's owner) is gone", not "the code raised".
_FAULTS: tuple[type[BaseException], ...] = (
    rex.RayActorError,  # ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.NodeDiedError,
    rex.LocalRayletDiedError,
    rex.ObjectLostError,  # OwnerDiedError, ObjectFetchTimedOutError, ...
    rex.OutOfMemoryError,
    rex.TaskCancelledError,
    rex.RaySystemError,
)
# Actors spawned this recently may not yet show in the cluster's free resources: count them as placed.
_SETTLE_S = 2.0
# Fewer than min_workers placeable for this long: warn (once, until the pool is back at min_workers).
_BELOW_MIN_GRACE_S = 10.0


class WorkUnit(NamedTuple):
    """One independent piece of work.

    Attributes:
      key: unique, hashable id of the unit; results are returned under it (the driver uses (generation, pair, task)).
      payload: the single argument of the worker method.
      cost: a relative cost hint (e.g. the task's K); higher-cost units are started first.
    """

    key: Hashable
    payload: Any
    cost: float = 1.0


class PoolError(RuntimeError):
    """A run could not complete: an application error, a unit that failed too often, or no workers at all.

    Attributes:
      key: the unit concerned (``None`` when the pool itself could not place workers).
      cause: the last underlying error (an exception or a message).
    """

    def __init__(self, message: str, key: Hashable | None = None, cause: Any = None) -> None:
        super().__init__(message)
        self.key = key
        self.cause = cause


def actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """Translates a resource dict ({"CPU": 1}, {"GPU": 1, "CPU": 4}, {"TPU": 4}, ...) into ``ray.remote`` options.

    The actor asks for exactly these resources (``num_cpus`` defaults to 0 when "CPU" is absent, so a GPU worker does
    not also hold a CPU slot).
    """
    res = {str(k): float(v) for k, v in resources.items() if float(v) > 0}
    options: dict[str, Any] = {"num_cpus": res.pop("CPU", 0.0)}
    if "GPU" in res:
        options["num_gpus"] = res.pop("GPU")
    if "memory" in res:
        options["memory"] = res.pop("memory")
    if res:
        options["resources"] = res
    return options


def _fits(available: dict[str, float], need: dict[str, float]) -> int:
    """How many bundles ``need`` fit into one node's ``available`` resources."""
    counts = [int(available.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(counts) if counts else 0


def _free_slots(need: dict[str, float]) -> int:
    """How many more workers of shape ``need`` the cluster's free resources can place, node by node."""
    try:
        from ray._private.state import available_resources_per_node

        per_node = available_resources_per_node()
        return sum(_fits(avail, need) for avail in per_node.values())
    except Exception:  # developer API moved: the cluster-wide sum is a fine approximation
        return _fits(ray.available_resources(), need)


def _request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # a hint only; no autoscaler is fine
        log.debug("request_resources(%s) failed: %s", bundles[:1], e)


def _describe(e: BaseException) -> str:
    """``ValueError: message`` of the worker's own exception (a RayTaskError carries it as ``cause``)."""
    cause = getattr(e, "cause", None)
    cause = cause if isinstance(cause, BaseException) else e
    return f"{type(cause).__name__}: {cause}"


@dataclasses.dataclass
class _InFlight:
    ref: Any  # ray.ObjectRef
    unit: WorkUnit
    run_id: int
    started: float | None  # when the actor began this unit (None: queued behind another on the actor)


@dataclasses.dataclass
class _Worker:
    index: int
    actor: Any  # ray.actor.ActorHandle
    spawned: float
    ready_ref: Any | None
    ready_at: float | None = None
    info: Any = None
    units_done: int = 0
    inflight: collections.deque = dataclasses.field(default_factory=collections.deque)

    @property
    def ready(self) -> bool:
        return self.ready_at is not None


class ElasticPool:
    """A pool of ``worker_cls`` actors that follows the cluster's resources and survives worker loss.

    Args:
      worker_cls: a plain class (or a ``ray.remote`` actor class) with the method named in ``run`` and, optionally,
        a ``ready()`` method that returns once the worker is set up (its result is kept in
        ``stats()["workers"][i]["info"]``; without one, the end of the constructor counts as ready).
      args, kwargs: constructor arguments of every worker.
      resources: what one worker needs, e.g. ``{"CPU": 1.0}`` or ``{"GPU": 1.0}`` (see :func:`actor_options`).
      min_workers: below this many placeable workers the pool warns (and keeps going).
      max_workers: never more workers than this.
      unit_timeout_s: a unit running longer than this on a ready worker is a fault (the worker is killed, the unit
        re-queued).
      max_unit_retries: a unit may be re-queued after a fault this many times; one more fault raises PoolError.
      env_vars: environment of the worker processes (``runtime_env={"env_vars": ...}``), e.g. XLA flags.
      ready_timeout_s: how long a worker may take to start and finish ``ready()`` before it is replaced.
      placement_timeout_s: how long a run waits with zero workers before raising PoolError.
      poll_s: how often a run re-checks the cluster for room and for timed-out units.
      pipeline_depth: units in flight per worker (1, or 2 to hide the dispatch round trip).
      runtime_env: extra runtime_env entries for the actors (``env_vars`` is merged in).
      name: a label for logs.
      actor_name_prefix: if given, worker ``i`` (counting every worker this pool started, replacements included) is
        the named actor ``f"{actor_name_prefix}{i}"`` (what the dashboard's Actors page shows); a name still held
        by a live actor (e.g. another pool's) gets a suffix ``.2``, ``.3``, ... so names stay unique.
    """

    def __init__(
        self,
        worker_cls: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        resources: dict[str, float] | None = None,
        min_workers: int = 1,
        max_workers: int = 1,
        unit_timeout_s: float = 600.0,
        max_unit_retries: int = 5,
        env_vars: dict[str, str] | None = None,
        ready_timeout_s: float = 900.0,
        placement_timeout_s: float = 300.0,
        poll_s: float = 1.0,
        pipeline_depth: int = 1,
        runtime_env: dict[str, Any] | None = None,
        name: str | None = None,
        actor_name_prefix: str | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if not 0 <= min_workers <= max_workers:
            raise ValueError(f"min_workers must be in [0, max_workers={max_workers}], got {min_workers}")
        if pipeline_depth not in (1, 2):
            raise ValueError(f"pipeline_depth must be 1 or 2, got {pipeline_depth}")
        if unit_timeout_s <= 0 or ready_timeout_s <= 0 or poll_s <= 0:
            raise ValueError("unit_timeout_s, ready_timeout_s and poll_s must be positive")
        if max_unit_retries < 0:
            raise ValueError(f"max_unit_retries must be >= 0, got {max_unit_retries}")
        self.resources = {str(k): float(v) for k, v in (resources or {"CPU": 1.0}).items() if float(v) > 0}
        if not self.resources:
            raise ValueError("resources must ask for something, e.g. {'CPU': 1.0}")
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.min_workers = int(min_workers)
        self.max_workers = int(max_workers)
        self.unit_timeout_s = float(unit_timeout_s)
        self.max_unit_retries = int(max_unit_retries)
        self.ready_timeout_s = float(ready_timeout_s)
        self.placement_timeout_s = float(placement_timeout_s)
        self.poll_s = float(poll_s)
        self.pipeline_depth = int(pipeline_depth)
        self.name = name or getattr(worker_cls, "__name__", "worker")
        self.actor_name_prefix = actor_name_prefix
        env = {str(k): str(v) for k, v in (env_vars or {}).items()}
        renv = dict(runtime_env or {})
        if env or renv.get("env_vars"):
            renv["env_vars"] = {**renv.get("env_vars", {}), **env}
        self._options = {**actor_options(self.resources), "max_restarts": 0, "max_task_retries": 0}
        if renv:
            self._options["runtime_env"] = renv
        self._cls = worker_cls if isinstance(worker_cls, ray.actor.ActorClass) else ray.remote(worker_cls)
        self._workers: dict[int, _Worker] = {}
        self._next_index = 0
        self._run_id = 0
        self._last_scale = -float("inf")
        self._warned_below_min = False
        self._below_min_since: float | None = None
        self._setup_failures = 0  # consecutive worker losses before any worker became ready
        self._closed = False
        self._counts = collections.Counter(retries=0, failures=0, units_done=0, workers_started=0, runs=0)

    # ------------------------------------------------------------------------------------------------------------
    # public
    # ------------------------------------------------------------------------------------------------------------
    def run(self, units: Iterable[WorkUnit], method: str = "run") -> dict[Hashable, Any]:
        """Evaluates every unit on the pool; returns ``{unit.key: result}`` (in the order of ``units``).

        Returns only once every unit has a result. Faults are retried (see the module docstring); an application
        error, a unit that faulted more than ``max_unit_retries`` times, or no placeable worker for
        ``placement_timeout_s`` raise :class:`PoolError`.
        """
        if self._closed:
            raise PoolError(f"pool {self.name!r} is shut down")
        units = list(units)
        keys = [u.key for u in units]
        dupes = [repr(k) for k, n in collections.Counter(keys).items() if n > 1]
        if dupes:
            raise ValueError(f"duplicate work unit keys: {', '.join(dupes[:5])}")
        if not units:
            return {}
        self._run_id += 1
        self._counts["runs"] += 1
        run_id = self._run_id
        # Longest first (stable: ties keep the caller's order); re-queued units jump the queue.
        pending = collections.deque(sorted(units, key=lambda u: -float(u.cost)))
        results: dict[Hashable, Any] = {}
        faults: collections.Counter = collections.Counter()
        _request_from_autoscaler([dict(self.resources)] * self.max_workers)
        self._scale(force=True)
        no_worker_since: float | None = None
        while len(results) < len(units):
            self._dispatch(pending, run_id, method)
            refs = self._watched_refs()
            now = time.monotonic()
            if not refs:
                # No worker at all: wait for the cluster to make room (or the autoscaler to add a node).
                no_worker_since = no_worker_since or now
                if now - no_worker_since > self.placement_timeout_s:
                    raise PoolError(
                        f"pool {self.name!r}: no worker with {self.resources} could be placed for "
                        f"{self.placement_timeout_s:.0f} s (workers.placement_timeout_s); cluster resources: "
                        f"{ray.cluster_resources()}"
                    )
                time.sleep(self.poll_s)
                self._scale(force=True)
                continue
            no_worker_since = None
            done, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s)
            if done:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            lost = self._collect(done, run_id, results, pending, faults)
            lost |= self._check_timeouts(run_id, pending, faults)
            self._scale(force=lost)
        return {k: results[k] for k in keys}

    def warm_up(self, n: int | None = None, timeout_s: float | None = None) -> int:
        """Starts workers as the cluster allows and waits until ``n`` of them are ready (or ``timeout_s`` passes).

        Optional: ``run`` starts workers by itself. Useful to pay for worker setup before the first ``run``, or to wait
        for replacements after faults.

        Args:
          n: how many ready workers to wait for (default ``min_workers``; at most ``max_workers``).
          timeout_s: give up waiting after this long (default ``ready_timeout_s``); no error, see the return value.

        Returns:
          The number of ready workers.
        """
        if self._closed:
            raise PoolError(f"pool {self.name!r} is shut down")
        n = min(self.max_workers, self.min_workers if n is None else int(n))
        deadline = time.monotonic() + (self.ready_timeout_s if timeout_s is None else float(timeout_s))
        self._scale(force=True)
        while True:
            ready = sum(w.ready for w in self._workers.values())
            if ready >= n or time.monotonic() >= deadline:
                return ready
            refs = [w.ready_ref for w in self._workers.values() if not w.ready]
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.poll_s)
                lost = self._collect(done, -1, {}, collections.deque(), collections.Counter())
            else:
                time.sleep(self.poll_s)
                lost = True
            lost |= self._check_timeouts(-1, collections.deque(), collections.Counter())
            self._scale(force=lost)

    def stats(self) -> dict[str, Any]:
        """Cumulative counters and the current workers.

        Keys: ``live_workers`` (ready workers now), ``starting_workers``, ``retries`` (units re-queued after a fault),
        ``failures`` (workers lost: died, timed out, or failed to start), ``units_done``, ``workers_started``,
        ``runs``, and ``workers``: one dict per current worker (index, state, units_done, seconds alive, and what its
        ``ready()`` returned).
        """
        now = time.monotonic()
        current = sorted(list(self._workers.values()), key=lambda w: w.index)  # list(): safe to call from a thread
        workers = [
            {
                "index": w.index,
                "state": "ready" if w.ready else "starting",
                "units_done": w.units_done,
                "inflight": len(w.inflight),
                "age_s": round(now - w.spawned, 3),
                "info": w.info,
            }
            for w in current
        ]
        return {
            "live_workers": sum(w.ready for w in current),
            "starting_workers": sum(not w.ready for w in current),
            **{k: int(v) for k, v in self._counts.items()},
            "workers": workers,
        }

    def shutdown(self) -> None:
        """Kills every worker and withdraws the autoscaler request. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for index in list(self._workers):
            self._drop(index)
        if ray.is_initialized():
            _request_from_autoscaler([])
        log.info("pool %s shut down (%s)", self.name, dict(self._counts))

    def __enter__(self) -> ElasticPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        index = self._next_index
        self._next_index += 1
        actor = self._create_actor(index)
        try:
            ready = actor.ready
        except AttributeError:  # no ready(): Ray's own no-op method resolves once the constructor has run
            ready = actor.__ray_ready__
        self._workers[index] = _Worker(index, actor, time.monotonic(), ready.remote())
        self._counts["workers_started"] += 1
        log.info("pool %s: starting worker %d (%s)", self.name, index, self.resources)

    def _create_actor(self, index: int) -> Any:
        if not self.actor_name_prefix:
            return self._cls.options(**self._options).remote(*self.args, **self.kwargs)
        base = f"{self.actor_name_prefix}{index}"
        for attempt in range(1, 100):
            name = base if attempt == 1 else f"{base}.{attempt}"
            try:
                return self._cls.options(**self._options, name=name).remote(*self.args, **self.kwargs)
            except rex.ActorAlreadyExistsError:  # the name belongs to a live actor: try the next suffix
                continue
        raise PoolError(f"pool {self.name!r}: no free actor name for {base!r}")

    def _drop(self, index: int) -> _Worker:
        w = self._workers.pop(index)
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception as e:  # already gone
            log.debug("kill worker %d: %s", index, e)
        return w

    def _scale(self, force: bool = False) -> None:
        """Starts workers while the cluster has room, up to ``max_workers``."""
        now = time.monotonic()
        if not force and now - self._last_scale < self.poll_s:
            return
        self._last_scale = now
        want = self.max_workers - len(self._workers)
        if want <= 0:
            return
        try:
            free = _free_slots(self.resources)
        except Exception as e:  # GCS hiccup: try again next poll
            log.warning("pool %s: could not read cluster resources: %s", self.name, e)
            return
        settling = sum(not w.ready and now - w.spawned < _SETTLE_S for w in self._workers.values())
        n = max(0, min(want, free - settling))
        for _ in range(n):
            self._spawn()
        total = len(self._workers)
        if total < self.min_workers:
            self._below_min_since = self._below_min_since or now
            # Not at once: freshly killed workers (ours or a previous pool's) free their resources a moment later.
            if not self._warned_below_min and now - self._below_min_since > _BELOW_MIN_GRACE_S:
                log.warning(
                    "pool %s: only %d of min_workers=%d workers with %s can be placed now (cluster %s); "
                    "continuing with what there is",
                    self.name,
                    total,
                    self.min_workers,
                    self.resources,
                    ray.cluster_resources(),
                )
                self._warned_below_min = True
        else:
            self._warned_below_min, self._below_min_since = False, None

    def _dispatch(self, pending: collections.deque, run_id: int, method: str) -> None:
        for w in sorted(self._workers.values(), key=lambda w: w.index):
            while w.ready and pending and len(w.inflight) < self.pipeline_depth:
                unit = pending.popleft()
                ref = getattr(w.actor, method).remote(unit.payload)
                started = time.monotonic() if not w.inflight else None
                w.inflight.append(_InFlight(ref, unit, run_id, started))

    def _watched_refs(self) -> list[Any]:
        refs = []
        for w in self._workers.values():
            if not w.ready:
                refs.append(w.ready_ref)
            elif w.inflight:
                refs.append(w.inflight[0].ref)  # an actor finishes its units in order
        return refs

    def _owner(self, ref: Any) -> tuple[_Worker, bool] | None:
        for w in self._workers.values():
            if w.ready_ref is not None and w.ready_ref == ref:
                return w, True
            if w.inflight and w.inflight[0].ref == ref:
                return w, False
        return None

    def _collect(
        self,
        done: list[Any],
        run_id: int,
        results: dict[Hashable, Any],
        pending: collections.deque,
        faults: collections.Counter,
    ) -> bool:
        lost = False
        for ref in done:
            found = self._owner(ref)
            if found is None:  # its worker was dropped earlier in this loop
                continue
            w, is_ready_ref = found
            try:
                value = ray.get(ref)
            except _FAULTS as e:
                if is_ready_ref and isinstance(e, rex.RayActorError) and e.actor_init_failed:
                    self._drop(w.index)
                    # Ray keeps only the text of the constructor's exception; its last line is "Type: message".
                    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
                    raise PoolError(
                        f"pool {self.name!r}: worker constructor failed with {last[0]} (not retried: it would fail "
                        f"again)\n{e}",
                        cause=e,
                    ) from e
                self._lose(w, pending, faults, run_id, f"{type(e).__name__}: {e}")
                lost = True
                continue
            except Exception as e:  # RayTaskError: the worker's own code raised
                if is_ready_ref:
                    self._drop(w.index)
                    raise PoolError(
                        f"pool {self.name!r}: worker ready() raised {_describe(e)}\n{e}", cause=getattr(e, "cause", e)
                    ) from e
                item = w.inflight.popleft()
                self._start_next(w)
                if item.run_id != run_id:
                    continue  # left over from an aborted run
                raise PoolError(
                    f"work unit {item.unit.key!r} raised {_describe(e)} (an application error: not retried)\n{e}",
                    key=item.unit.key,
                    cause=getattr(e, "cause", e),
                ) from e
            if is_ready_ref:
                w.ready_ref, w.ready_at, w.info = None, time.monotonic(), value
                self._setup_failures = 0
                log.info("pool %s: worker %d ready after %.1f s: %s", self.name, w.index, w.ready_at - w.spawned, value)
                continue
            item = w.inflight.popleft()
            self._start_next(w)
            if item.run_id != run_id:
                continue
            results[item.unit.key] = value
            w.units_done += 1
            self._counts["units_done"] += 1
        return lost

    @staticmethod
    def _start_next(w: _Worker) -> None:
        if w.inflight and w.inflight[0].started is None:
            w.inflight[0].started = time.monotonic()

    def _lose(
        self, w: _Worker, pending: collections.deque, faults: collections.Counter, run_id: int, reason: str
    ) -> None:
        """Drops a dead or hung worker and re-queues its units; the unit it was running is charged one fault."""
        self._drop(w.index)
        self._counts["failures"] += 1
        if not w.ready:
            self._setup_failures += 1
            log.warning("pool %s: worker %d lost during setup: %s", self.name, w.index, reason)
            if self._setup_failures > 3 * self.max_workers + 2:
                raise PoolError(
                    f"pool {self.name!r}: {self._setup_failures} workers in a row died during setup; last: {reason}",
                    cause=reason,
                )
            return
        requeue = [item for item in w.inflight if item.run_id == run_id]
        if not requeue:
            log.warning("pool %s: idle worker %d lost: %s", self.name, w.index, reason)
            return
        if w.inflight[0].run_id != run_id:  # it was busy with a unit of an aborted run: nobody to blame
            for item in reversed(requeue):
                pending.appendleft(item.unit)
            self._counts["retries"] += len(requeue)
            return
        running = requeue[0].unit
        faults[running.key] += 1
        log.warning(
            "pool %s: worker %d lost while running unit %r (fault %d of at most %d retries): %s",
            self.name,
            w.index,
            running.key,
            faults[running.key],
            self.max_unit_retries,
            reason,
        )
        if faults[running.key] > self.max_unit_retries:
            raise PoolError(
                f"work unit {running.key!r} failed {faults[running.key]} times (max_unit_retries="
                f"{self.max_unit_retries}); last error: {reason}",
                key=running.key,
                cause=reason,
            )
        for item in reversed(requeue):
            pending.appendleft(item.unit)
        self._counts["retries"] += len(requeue)

    def _check_timeouts(self, run_id: int, pending: collections.deque, faults: collections.Counter) -> bool:
        now = time.monotonic()
        lost = False
        for w in list(self._workers.values()):
            if not w.ready:
                if now - w.spawned > self.ready_timeout_s:
                    self._lose(w, pending, faults, run_id, f"not ready after {self.ready_timeout_s:.0f} s")
                    lost = True
            elif w.inflight and w.inflight[0].started is not None:
                if now - w.inflight[0].started > self.unit_timeout_s:
                    key = w.inflight[0].unit.key
                    self._lose(w, pending, faults, run_id, f"unit {key!r} timed out after {self.unit_timeout_s:g} s")
                    lost = True
        return lost
