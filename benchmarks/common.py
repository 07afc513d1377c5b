"""Small helpers shared by the benchmarks: single-thread CPU setup, median timing, byte counts, output.

Conventions every benchmark follows: compare ratios measured in the same run (absolute times on
a shared CPU vary by ±40% between runs), interleave the candidates within each repeat, report
medians, and print one JSON object as the last line of stdout so scripts and CI can parse it.

Call :func:`single_thread_cpu` before anything imports jax::

    import common  # benchmarks/ is the script's directory, so it is on sys.path
    common.single_thread_cpu()
    import jax
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def single_thread_cpu() -> None:
    """Makes XLA use one CPU core (one worker per core is how the service runs on CPU).

    Must run before jax is imported: XLA reads the flags once, at backend start. Existing
    ``XLA_FLAGS`` are kept and the single-thread flags appended.
    """
    if "jax" in sys.modules:
        raise RuntimeError("single_thread_cpu() must be called before jax is imported (XLA reads its flags once).")
    flags = os.environ.get("XLA_FLAGS", "")
    if SINGLE_THREAD_XLA_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The flags alone do not stop XLA:CPU's thread pool from using every core (see l3rs/cpu.py): pin to one core.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def block(tree: Any) -> Any:
    """Waits until every array in ``tree`` is computed (JAX dispatch is asynchronous)."""
    import jax

    return jax.block_until_ready(tree)


def time_once(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``, including waiting for its (asynchronous) results."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def median_times(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times every candidate ``repeats`` times, interleaved (A B C A B C ...) so drift hits all of them alike.

    ``warmup`` untimed calls per candidate come first (compilation, caches). Returns all times per candidate;
    take :func:`median` of them.
    """
    if repeats < 1:
        raise ValueError(f"repeats: must be at least 1, got {repeats}.")
    for fn in candidates.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(time_once(fn))
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Relative half-range (max − min) / (2 · median): a quick noise figure for a set of repeats."""
    m = median(values)
    return float((max(values) - min(values)) / (2 * m)) if m > 0 else float("nan")


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (Python scalars and empty nodes count 0)."""
    import jax

    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table; floats printed with 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True)))

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def emit_json(result: dict[str, Any]) -> None:
    """Prints ``result`` as one JSON line; call it last: the last line of stdout is the result."""
    print(json.dumps(result, sort_keys=True), flush=True)
