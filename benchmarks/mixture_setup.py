"""What a task mixture costs a worker (issue 11, part 2): setup seconds, compiles, and seconds to the first and to a
later unit, for a 2-source mixture against the 1-source run it extends, measured in the same run.

Three worker configurations, each in its own fresh single-core process (as a CPU worker runs; nothing cached from
the others), on the embedded data with the small CNN, 5-way, batch 64, eval batch 100, K = --k, random θ0:

- ``one``: glyphs alone (``jobs/configs/glyphs_default.toml``'s task distribution);
- ``same_shape``: glyphs + Fashion-MNIST classes 5-9 (both 28x28x1, 5-way, same batch sizes): one shared loop;
- ``two_shapes``: glyphs + sklearn digits (16x16x1): two loops.

For each: ``setup_s`` (``TaskRunner``: data, θ0, ψ₀), ``first_unit_s`` per source (its first unit, compile included),
``unit_s`` (median of later units of the same source), ``compiles`` and the total ``ready_s`` = setup + first units.
Last line: one JSON object with the ratios to ``one``.

    python benchmarks/mixture_setup.py [--k 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

GLYPHS = {"name": "glyphs"}
SOURCES = {
    "one": None,
    "same_shape": [GLYPHS, {"name": "fmnist", "dataset": "fashion_mnist_debian"}],
    "two_shapes": [GLYPHS, {"name": "digits", "dataset": "sklearn_digits"}],
}


def measure(case: str, k: int, repeats: int) -> dict:
    """Runs in the child process: one worker's setup and units for ``case``."""
    sys.path.insert(0, HERE)
    import common

    common.single_thread_cpu()
    import numpy as np

    from l3rs.config import Config
    from l3rs.meta.runner import TaskRunner, initial_meta
    from l3rs.optim import meta_to_vector

    task = {"num_classes": 5, "batch_size": 64, "eval_batch_size": 100, "k_min": k, "k_max": k}
    if SOURCES[case] is not None:
        task["sources"] = SOURCES[case]
    cfg = Config().replace(data={"dataset": "glyphs"}, model={"checkpoint": "random"}, task=task)
    start = time.perf_counter()
    runner = TaskRunner(cfg)
    setup = time.perf_counter() - start
    mean = np.asarray(meta_to_vector(initial_meta(cfg)))
    cands = np.stack([mean, mean])  # an antithetic pair's worth of work (σ does not change the cost)
    sources = range(max(1, len(runner.sources)))
    first, later = {}, {}
    for s in sources:
        t = time.perf_counter()
        runner.evaluate(cands, 1000 + s, s)
        first[s] = time.perf_counter() - t
    for r in range(repeats):
        for s in sources:
            t = time.perf_counter()
            runner.evaluate(cands, 2000 + 10 * r + s, s)
            later.setdefault(s, []).append(time.perf_counter() - t)
    return {
        "case": case,
        "sources": len(list(sources)),
        "loops": len(runner.loops),
        "compiles": runner.compiles,
        "setup_s": setup,
        "first_unit_s": [first[s] for s in sources],
        "unit_s": [statistics.median(later[s]) for s in sources],
        "ready_s": setup + sum(first.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.k, args.repeats)), flush=True)
        return
    sys.path.insert(0, HERE)
    import common

    rows = []
    for case in SOURCES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", case, "--k", str(args.k), "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["setup_vs_one"] = r["setup_s"] / base["setup_s"]
        r["ready_vs_one"] = r["ready_s"] / base["ready_s"]
    print(common.format_table(rows, ["case", "sources", "loops", "compiles", "setup_s", "ready_s", "setup_vs_one",
                                     "ready_vs_one"]))  # fmt: skip
    common.emit_json({"k": args.k, "cases": rows})


if __name__ == "__main__":
    main()
