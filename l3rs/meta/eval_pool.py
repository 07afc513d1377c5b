"""Where a meta-evaluation runs: in this process, or in a spawn process pool with one single-threaded XLA process per
core (for the small CNN on a 2-core CPU, one process per core gave ~1.8× the throughput of one two-thread process;
see :mod:`l3rs.cpu`). Either way the numbers are those of :func:`l3rs.meta.eval_setting.evaluate_setting` per task:
the pool only decides where each task runs. A :class:`~l3rs.meta.eval_journal.TaskJournal` says which rows of which
tasks are already done: those are read back, only the missing rows of a task run, and each task is stored as soon as
it is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from l3rs.config import Config
from l3rs.meta.eval_journal import Plan, TaskJournal
from l3rs.meta.eval_optimizers import OptimizerSpec
from l3rs.meta.eval_setting import SettingResult, clear_runners, evaluate_setting, merge_results
from l3rs.meta.settings import SettingSpec
from l3rs.meta.trace import trace_layer_stats

__all__ = ["XLA_SINGLE_THREAD", "child_env", "run_in_process", "run_pool"]

XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def child_env(cache_dir: str | None) -> dict[str, str]:
    """Environment of an evaluation process: CPU, single-threaded XLA, a shared persistent compilation cache."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} {XLA_SINGLE_THREAD}".strip()
    env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Temporarily sets variables of ``os.environ`` (spawned children copy it when they start)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_child(env: Mapping[str, str]) -> None:
    # The variables are already in the child's environment from its start (before jax was imported); this only
    # guards against a start method that does not copy the parent's environment.
    for k, v in env.items():
        os.environ.setdefault(k, v)
    # One core per process: XLA:CPU's thread pool would otherwise span every core (see l3rs.cpu). Before any
    # computation, so that JAX's threads inherit the affinity.
    from l3rs.cpu import claim_cores

    claim_cores(1)


def _bars(specs: Sequence[SettingSpec], num_tasks: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    return {
        s.name: tqdm(total=num_tasks, desc=f"evaluate {s.name} ({s.title})", unit="task", position=i,
                     disable=not progress, leave=True, mininterval=1.0, file=sys.stderr)
        for i, s in enumerate(specs)
    }  # fmt: skip


def run_in_process(
    cfg: Config,
    specs: Sequence[SettingSpec],
    seeds: Mapping[str, Sequence[int]],
    trace_opt: OptimizerSpec | None,
    progress: bool,
    journal: TaskJournal,
    plan: Plan,
) -> tuple[dict[str, SettingResult], dict[str, Any] | None]:
    """Every setting's tasks in this process (the missing rows of ``plan.todo``; each task stored in ``journal`` when
    done, beside the tasks of ``plan.done``), then the Fig. 4 trace (of ``trace_opt`` on setting A if evaluated, else
    the first; none when ``trace_opt`` is None). Returns (results by setting, trace)."""
    trace_setting = "A" if any(s.name == "A" for s in specs) else (specs[0].name if specs else None)
    trace_setting = trace_setting if trace_opt is not None else None
    num_tasks = len(next(iter(seeds.values()))) if seeds else 0
    parts = {name: list(done) for name, done in plan.done.items()}
    by_name = {s.name: s for s in specs}
    bars = _bars(specs, num_tasks, progress)
    try:
        for name, done in parts.items():
            bars[name].update(len(done))
        for (name, i), (got, missing) in plan.todo.items():
            new = evaluate_setting(cfg, by_name[name], missing, seeds[name], shard=(i, num_tasks))
            part = journal.complete(name, i, seeds[name][i], got, new)
            journal.save(part)
            parts[name].append(part)
            bars[name].update(1)
        results = {name: merge_results(p) for name, p in parts.items() if p}
        clear_runners()  # free the settings' data and loops
        trace = trace_layer_stats(cfg, trace_opt, setting=trace_setting) if trace_setting else None
    finally:
        for b in bars.values():
            b.close()
    return results, trace


def run_pool(
    cfg: Config,
    specs: Sequence[SettingSpec],
    seeds: Mapping[str, Sequence[int]],
    trace_opt: OptimizerSpec | None,
    progress: bool,
    workers: int,
    journal: TaskJournal,
    plan: Plan,
) -> tuple[dict[str, SettingResult], dict[str, Any] | None]:
    """As :func:`run_in_process`, in ``workers`` spawn processes (:func:`child_env`: CPU, single-threaded XLA, a
    shared persistent compilation cache), one job per (task, setting) of ``plan.todo`` with its missing rows; each task
    is stored as its job finishes; shards are merged by task index."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    own_cache = None
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not cache_dir:  # settings with the same image shape (A, C, E) then compile once, in either process
        cache_dir = own_cache = tempfile.mkdtemp(prefix="l3rs-eval-xla-")
    env = child_env(cache_dir)
    num_tasks = len(next(iter(seeds.values()))) if seeds else 0
    trace_setting = "A" if any(s.name == "A" for s in specs) else specs[0].name
    parts, todo = {name: list(done) for name, done in plan.done.items()}, plan.todo
    bars = _bars(specs, num_tasks, progress)
    for name, done in parts.items():
        bars[name].update(len(done))
    executor = None
    try:
        with _environ(env):  # every child process is started by a submit below, with this environment
            executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_child, initargs=(env,)
            )
            # One job per task: balanced, and the bars move task by task. Round-robin over the settings, so the
            # processes start on different settings (B's image shape differs from A's: two compiles at once) and
            # later settings of an already compiled shape hit the shared compilation cache.
            futures = {}
            for i in range(num_tasks):
                for s in specs:
                    if (s.name, i) not in todo:
                        continue
                    missing = todo[(s.name, i)][1]
                    job = executor.submit(evaluate_setting, cfg, s, missing, seeds[s.name], shard=(i, num_tasks))
                    futures[job] = (s.name, i)
            trace_future = None
            if trace_opt is not None:
                trace_future = executor.submit(trace_layer_stats, cfg, trace_opt, setting=trace_setting)
        for future in as_completed(futures):
            name, i = futures[future]
            part = journal.complete(name, i, seeds[name][i], todo[(name, i)][0], future.result())
            journal.save(part)
            parts[name].append(part)
            bars[name].update(1)
        trace = trace_future.result() if trace_future is not None else None
    except BaseException:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for b in bars.values():
            b.close()
        if executor is not None:
            executor.shutdown(wait=True)
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)
    return {name: merge_results(p) for name, p in parts.items() if p}, trace
