"""The worker actor: one per GPU (or CPU slot). A thin Ray-facing shell around :class:`l3rs.meta.runner.TaskRunner`."""

from __future__ import annotations

import os
import socket
from typing import Any

from l3rs.cpu import PIN_ENV, claim_from_env, is_shared, rebalance

__all__ = ["MetaWorker", "unit_candidates", "worker_env"]


def unit_candidates(payload: dict[str, Any]) -> Any:
    """The float32 [2, D] antithetic pair of a driver work unit (``l3rs.service.driver.make_units``): rebuilt from the
    generation's mean (a Ray object ref, read zero-copy from the node's object store, or an array) and the pair's
    noise coordinates; or ``payload["candidates"]`` when a caller ships them explicitly."""
    if "candidates" in payload:
        return payload["candidates"]
    import ray

    from l3rs.meta.nes import pair_candidates

    mean = payload["mean"]
    if isinstance(mean, ray.ObjectRef):
        mean = ray.get(mean)
    return pair_candidates(mean, payload["sigma"], payload["noise"], payload["noise_seed"], payload["generation"],
                           payload["pair"])  # fmt: skip


def worker_env(resources: dict[str, float]) -> dict[str, str]:
    """Environment for worker processes. Set before JAX is imported in the actor process."""
    env = {
        # Several actors may share one GPU in tests/small clusters: don't grab 75% of the memory each.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if "GPU" not in resources:
        # CPU workers: one single-threaded XLA process per core gives ~1.8x the throughput of one 2-thread
        # process (environment.md).
        threads = max(1, int(resources.get("CPU", 1)))
        if threads == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["JAX_PLATFORMS"] = "cpu"
        # XLA:CPU's thread pool spans every core regardless of the flags: pin each worker to its own cores
        # (l3rs.cpu), so that N workers on N cores do not share them.
        env[PIN_ENV] = str(threads)
    return env


class MetaWorker:
    """Holds the task images, θ0 and one compiled inner loop; evaluates (ψ pair, task seed) work units."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cores = claim_from_env()  # before JAX starts its threads
        from l3rs.config import config_from_dict
        from l3rs.meta.runner import TaskRunner

        cfg = config_from_dict(config)
        self.runner = TaskRunner(cfg, vmap_candidates=cfg.workers.candidates_per_call == 2)

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "cores": self.cores,
            "shared_core": is_shared(),
            "setup_seconds": self.runner.setup_seconds,
            "inner_loops": len(self.runner.loops),
        }

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        rebalance()  # started on a shared core (all were taken)? move to one freed since: same numbers (l3rs.cpu)
        # "source": the unit's task source in a task mixture (l3rs.meta.mixture); absent in a plain run.
        return self.runner.evaluate(unit_candidates(payload), payload["task_seed"], payload.get("source", 0))
