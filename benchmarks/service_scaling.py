"""Throughput of the meta-training service with 1 and 2 workers, and the driver's per-unit overhead.

Starts a real local Ray instance on loopback and runs real work units (antithetic ψ pairs on Fashion-MNIST tasks of
the embedded default, K fixed so every unit costs the same) through :class:`l3rs.service.pool.ElasticPool`, first
with one worker, then with two, then with one again, each worker held to one core (``workers.resources = {CPU = 1}``:
single-thread XLA flags and a core of its own, see ``l3rs.cpu``). The median over generations is reported.

  units/s          = units of a generation / its wall time (after a warm-up generation that compiles);
  speedup_2_workers = units/s with 2 workers / units/s with 1 (goal ≥ 1.8 on 2 cores);
  overhead_fraction = 1 − (Σ worker compute seconds) / (wall seconds × workers), with 1 worker: what dispatch,
                      serialisation and result handling add per unit, as a fraction of unit time (goal ≤ 5%).

Usage::

    python benchmarks/service_scaling.py [--repeats 5] [--units 8] [--k 60]

Prints a table, then one JSON object as the last line. Needs the pretrained default checkpoint (``l3rs pretrain``);
pretrains it (~20 s) if it is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per worker count")
    parser.add_argument("--units", type=int, default=8, help="work units per generation")
    parser.add_argument("--k", type=int, default=60, help="inner steps per task (fixed, so units cost the same)")
    args = parser.parse_args(argv)

    from l3rs.config import Config
    from l3rs.meta.pretrain import ensure_pretrained
    from l3rs.meta.runner import initial_meta
    from l3rs.optim import meta_to_vector
    from l3rs.service.driver import resolve_paths
    from l3rs.service.pool import ElasticPool, WorkUnit
    from l3rs.service.raycluster import init_local
    from l3rs.service.worker import MetaWorker, worker_env

    cfg = resolve_paths(Config().replace(task={"k_min": args.k, "k_max": args.k}).validate())
    p = cfg.pretrain
    ensure_pretrained(dataset=cfg.data.dataset, model_name=cfg.model.name, output=cfg.model.checkpoint, steps=p.steps,
                      batch_size=p.batch_size, learning_rate=p.learning_rate, seed=p.seed)  # fmt: skip

    import ray

    init_local(num_cpus=2, include_dashboard=False)
    vec = np.asarray(meta_to_vector(initial_meta(cfg)), np.float32)
    rng = np.random.default_rng(0)

    def units(gen: int) -> list[Any]:
        out = []
        for i in range(args.units):
            noise = 0.03 * rng.standard_normal(vec.shape).astype(np.float32)
            pair = np.stack([vec + noise, vec - noise])
            out.append(WorkUnit(key=(gen, i, 0), payload={"candidates": pair, "task_seed": 1000 * gen + i},
                                cost=float(args.k)))  # fmt: skip
        return out

    resources = {"CPU": 1.0}

    def make_pool(n: int) -> Any:
        return ElasticPool(MetaWorker, args=(cfg.to_dict(),), resources=resources, min_workers=n, max_workers=n,
                           unit_timeout_s=600.0, max_unit_retries=3, env_vars=worker_env(resources))  # fmt: skip

    # Each worker pins itself to a core of its own (l3rs.cpu), so the two setups cannot be alive at once on two
    # cores: they run one after the other, 1 - 2 - 1 workers, so that a drift of the machine's speed shows up.
    rates: dict[int, list[float]] = {1: [], 2: []}
    overhead: list[float] = []
    unit_seconds: list[float] = []
    gen = 0
    try:
        for phase, n in enumerate((1, 2, 1)):
            pool = make_pool(n)
            try:
                pool.warm_up(n)
                pool.run(units(gen), method="run")  # compile
                gen += 1
                for rep in range(args.repeats if phase != 2 else max(1, args.repeats // 2)):
                    batch = units(gen)
                    gen += 1
                    start = time.perf_counter()
                    results = pool.run(batch, method="run")
                    wall = time.perf_counter() - start
                    rates[n].append(len(batch) / wall)
                    compute = sum(r["seconds"] for r in results.values())
                    if n == 1:
                        overhead.append(1.0 - compute / wall)
                        unit_seconds.append(compute / len(batch))
                    print(f"{n} worker(s), repeat {rep + 1}: {rates[n][-1]:.2f} units/s", file=sys.stderr, flush=True)
                cores = [w["info"].get("cores") for w in pool.stats()["workers"]]
                print(f"{n} worker(s) pinned to cores {cores}", file=sys.stderr, flush=True)
            finally:
                pool.shutdown()
    finally:
        ray.shutdown()

    med = {n: statistics.median(v) for n, v in rates.items()}
    result = {
        "benchmark": "service_scaling",
        "units_per_generation": args.units,
        "k": args.k,
        "repeats": args.repeats,
        "units_per_s_1_worker": med[1],
        "units_per_s_2_workers": med[2],
        "speedup_2_workers": med[2] / med[1],
        "goal_speedup_2_workers": 1.8,
        "overhead_fraction": statistics.median(overhead),
        "goal_overhead_fraction": 0.05,
        "unit_seconds_median": statistics.median(unit_seconds),
        "steps_per_unit": 2 * args.k,
    }
    print("workers  units/s (median)")
    print(f"1        {med[1]:.3f}")
    print(f"2        {med[2]:.3f}   speedup {result['speedup_2_workers']:.2f}x (goal >= 1.8)")
    print(f"driver overhead per unit: {100 * result['overhead_fraction']:.2f}% of unit time (goal <= 5%), "
          f"unit = {result['unit_seconds_median']:.2f} s ({2 * args.k} inner steps)")  # fmt: skip
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
