"""The meta-training driver's own cost per generation at scale, in process, with no workers (issue 14 part 3).

For population 32, 256 and 1024 and two ψ sizes (L3RS's ψ for the default config, and D = 2.3M, the published
VeLO's size) it times what ``l3rs.service.driver.Driver.run`` does per generation besides waiting for workers:

  put_s        serialising the generation's mean once (``pickle`` protocol 5: the copy ``ray.put`` makes into the
               object store; Ray itself is not started here);
  dispatch_s   building the work units (``l3rs.service.driver.make_units``: pair index, σ, noise mode/seed, task
               seed, and the mean's object ref) and pickling every payload, as Ray does per task;
               ``unit_payload_bytes`` is one pickled payload;
  fitness_s    the fitness bookkeeping of ``Driver.run`` (results dict → losses → fitness);
  tell_s       ``nes.tell_seeded``: fitness shaping and the gradient regenerated pair by pair from the noise seed;
  checkpoint_s ``nes.state_to_dict`` + ``l3rs.checkpoint.save_checkpoint`` (atomic, via ``l3rs.storage``);

``driver_s_per_generation`` is their sum. Each cell runs in its own subprocess, whose peak RSS
(``resource.getrusage``, max resident set) is ``peak_rss_mb``. Modes ``per_pair`` and ``table`` are the two
O(D) noise modes of ``l3rs.meta.nes`` for scale (``table`` includes drawing its 128 MiB noise table once,
outside the timed generations but inside the peak RSS); mode ``matrix`` is the driver before issue 14
(``nes.ask`` materialising the [pop/2, D] noise and [pop, D] candidates, two ψ vectors pickled per unit,
``nes.tell`` on the matrix), run only where it fits in memory.

How many workers one driver keeps busy. A generation has n = pop/2 · b units (b = meta-batch size, 4 as in the
paper's cluster config). The driver spends F = put + fitness + tell + checkpoint seconds per generation whatever
the number of workers, plus c = dispatch_s / n per unit, so it can sustain at most n / (F + n·c) units per second;
a worker whose unit takes u seconds consumes 1/u units per second. Hence

    max_busy_workers(u) = u · n / (F + n·c) = u · n / driver_s_per_generation

workers can be fed (``max_busy_workers_at_1s_units``: u = 1 s, at population 1024, L3RS's ψ, mode ``per_pair``;
``..._dim_2_3M``: D = 2.3M in the faster of ``per_pair`` and ``table``). Generations are synchronous:
during F no unit runs, so with W workers they are busy (n·u/W) / (n·u/W + F) of the time; at W = max_busy_workers
that is about one half, and ``utilisation_at_1000_workers`` gives the fraction at 1000 workers.

Usage::

    python benchmarks/driver_scale.py [--quick] [--generations 2] [--meta-batch 4]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

VELO_DIM = 2_300_000
POPULATIONS = (32, 256, 1024)
MATRIX_LIMIT_BYTES = 1 << 30  # run today's matrix driver only where its [pop/2, D] + [pop, D] fit in 1 GiB


def l3rs_psi_dim() -> int:
    """Length of the flat ψ vector of the default config (L3RS on the default model)."""
    from l3rs.config import Config
    from l3rs.meta.runner import initial_meta
    from l3rs.optim import meta_to_vector

    return int(np.asarray(meta_to_vector(initial_meta(Config().validate()))).size)


def run_cell(pop: int, dim: int, mode: str, generations: int, meta_batch: int) -> dict[str, Any]:
    """One (population, D, mode) cell, in this process: median seconds per generation of each driver step."""
    import resource

    import ray

    from l3rs.checkpoint import save_checkpoint
    from l3rs.meta import nes
    from l3rs.meta.tasks import task_seed
    from l3rs.service.driver import make_units
    from l3rs.service.pool import WorkUnit

    cfg = nes.NESConfig(population_size=pop, sigma=0.01, learning_rate=0.01, decay_every=500,
                        noise="sequential" if mode == "matrix" else mode)  # fmt: skip
    state = nes.init(cfg, np.random.default_rng(0).standard_normal(dim).astype(np.float32) * 0.01)
    seed, n = 0, cfg.num_pairs * meta_batch
    if mode == "table":
        nes.noise_table(seed, dim)  # drawn once per run (and once per worker process), not per generation
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {k: [] for k in ("put_s", "dispatch_s", "fitness_s", "tell_s", "checkpoint_s")}
    payload_bytes = 0
    with tempfile.TemporaryDirectory() as run_dir:
        history: list[dict[str, Any]] = []
        for _ in range(generations):
            gen = state.generation
            t0 = time.perf_counter()
            eps = None
            if mode == "matrix":
                eps, candidates = nes.ask(cfg, state, seed)
            blob = pickle.dumps(state.mean, protocol=5)  # the one copy ray.put makes per generation
            t1 = time.perf_counter()
            seeds = [task_seed(seed, gen, j) for j in range(meta_batch)]
            if mode == "matrix":
                units = [WorkUnit(key=(gen, i, j), payload={"candidates": candidates[2 * i : 2 * i + 2],
                                                            "task_seed": seeds[j]}, cost=1.0)  # fmt: skip
                         for i in range(cfg.num_pairs) for j in range(meta_batch)]  # fmt: skip
            else:
                units = make_units(cfg, gen, seed, ray.ObjectRef.from_random(), seeds, [1.0] * meta_batch)
            sizes = [len(pickle.dumps(u.payload, protocol=5)) for u in units]
            t2 = time.perf_counter()
            results = {u.key: {"loss": rng.random(2) + 1.0, "accuracy": rng.random(2)} for u in units}
            t3 = time.perf_counter()
            losses = np.full((pop, meta_batch), np.nan)
            for (_, i, j), r in results.items():
                losses[2 * i : 2 * i + 2, j] = r["loss"]
            with np.errstate(invalid="ignore"):
                fitness = -losses.mean(axis=1)
            fitness = np.where(np.isfinite(fitness), fitness, np.nan)
            t4 = time.perf_counter()
            if mode == "matrix":
                state, info = nes.tell(cfg, state, eps, fitness)
                del eps, candidates, units
            else:
                state, info = nes.tell_seeded(cfg, state, seed, fitness)
            t5 = time.perf_counter()
            history.append({"generation": gen, "grad_norm": info["grad_norm"]})
            save_checkpoint(
                run_dir, state.generation, {"nes": nes.state_to_dict(state), "history": json.dumps(history)}
            )
            t6 = time.perf_counter()
            del blob
            payload_bytes = max(sizes)
            for k, v in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5), strict=True):
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "population": pop,
        "dim": dim,
        "mode": mode,
        "units": n,
        **med,
        "driver_s_per_generation": sum(med.values()),
        "unit_payload_bytes": payload_bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def worker_rebuild_s(dim: int, repeats: int = 3) -> float:
    """Seconds a worker spends rebuilding one antithetic pair from the mean and its per_pair noise coordinates."""
    from l3rs.meta import nes

    mean = np.zeros(dim, np.float32)
    out = []
    for r in range(repeats):
        t = time.perf_counter()
        nes.pair_candidates(mean, 0.01, "per_pair", 0, 0, r)
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def busy_workers(cell: dict[str, Any], unit_s: float = 1.0) -> int:
    """u · n / driver_s_per_generation (module docstring)."""
    return int(unit_s * cell["units"] / cell["driver_s_per_generation"])


def utilisation(cell: dict[str, Any], workers: int, unit_s: float = 1.0) -> float:
    compute = cell["units"] * unit_s / workers
    fixed = cell["driver_s_per_generation"] - cell["dispatch_s"]
    return compute / (compute + fixed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one generation per cell, no matrix baseline")
    parser.add_argument("--generations", type=int, default=2, help="timed generations per cell (median)")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per pair per generation (b)")
    parser.add_argument("--cell", nargs=3, metavar=("POP", "DIM", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    generations = 1 if args.quick else args.generations
    if args.cell:  # child process: one cell, its result as the last line
        pop, dim, mode = int(args.cell[0]), int(args.cell[1]), args.cell[2]
        print(json.dumps(run_cell(pop, dim, mode, generations, args.meta_batch)), flush=True)
        return {}

    psi_dim = l3rs_psi_dim()
    cells = [(p, d, m) for m in ("per_pair", "table") for d in (psi_dim, VELO_DIM) for p in POPULATIONS]
    if not args.quick:
        cells += [(p, d, "matrix") for d in (psi_dim, VELO_DIM) for p in POPULATIONS
                  if (p // 2 + p) * d * 4 <= MATRIX_LIMIT_BYTES]  # fmt: skip
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(here), os.environ.get("PYTHONPATH")]))
    )
    rows = []
    for pop, dim, mode in cells:
        cmd = [sys.executable, os.path.abspath(__file__), "--cell", str(pop), str(dim), mode,
               "--generations", str(generations), "--meta-batch", str(args.meta_batch)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"  pop {pop:5d}  D {dim:8d}  {mode:8s}  {rows[-1]['driver_s_per_generation']:.3f} s/gen", file=sys.stderr
        )

    from common import emit_json, format_table

    columns = ["population", "dim", "mode", "units", "put_s", "dispatch_s", "fitness_s", "tell_s", "checkpoint_s",
               "driver_s_per_generation", "unit_payload_bytes", "peak_rss_mb"]  # fmt: skip
    print(format_table(rows, columns))

    def cell(pop: int, dim: int, mode: str = "per_pair") -> dict[str, Any]:
        return next(r for r in rows if (r["population"], r["dim"], r["mode"]) == (pop, dim, mode))

    small = cell(1024, psi_dim)
    big = min((cell(1024, VELO_DIM, m) for m in ("per_pair", "table")), key=lambda r: r["driver_s_per_generation"])
    result = {
        "benchmark": "driver_scale",
        "quick": args.quick,
        "meta_batch": args.meta_batch,
        "l3rs_psi_dim": psi_dim,
        "driver_s_per_generation": {
            f"{r['mode']}_pop{r['population']}_dim{r['dim']}": round(r["driver_s_per_generation"], 4) for r in rows
        },
        "driver_peak_rss_mb": round(max(cell(1024, VELO_DIM, m)["peak_rss_mb"] for m in ("per_pair", "table")), 1),
        "driver_peak_rss_mb_target": 2000,
        "max_busy_workers_at_1s_units": busy_workers(small),
        "max_busy_workers_at_1s_units_dim_2_3M": busy_workers(big),
        "mode_dim_2_3M": big["mode"],
        "max_busy_workers_target": 1000,
        "utilisation_at_1000_workers": round(utilisation(small, 1000), 3),
        "utilisation_at_1000_workers_dim_2_3M": round(utilisation(big, 1000), 3),
        "unit_payload_bytes": big["unit_payload_bytes"],
        "worker_rebuild_s_dim_2_3M": round(worker_rebuild_s(VELO_DIM), 4),
    }
    emit_json(result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
