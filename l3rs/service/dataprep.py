"""``l3rs data prepare`` on a Ray cluster: the independent steps of :func:`l3rs.data.cache.prepare` (decode a chunk of
records; gather a group of classes) run as Ray tasks, one CPU each, as many at once as the cluster has CPUs.

Every task reads the tfds data and writes the cache through URIs, so on a multi-node cluster both must be reachable
from every node (``s3://`` / ``gs://``, or a shared file system). A local cache path is written only by tasks pinned
to the node this driver runs on (``NodeAffinitySchedulingStrategy``), where that path is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

__all__ = ["ray_map"]


def ray_map(
    pin_here: bool = False, num_cpus: float = 1.0
) -> Callable[[Callable[[Any], Any], Sequence[Any]], Iterator[Any]]:
    """A ``map_fn`` for :func:`l3rs.data.cache.prepare` that runs each task as a Ray task and yields results as they
    finish. ``pin_here``: run every task on this driver's node (for a local cache path). Needs a connected driver."""

    def run(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Any]:
        options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 2}
        if pin_here:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        remote = ray.remote(fn).options(**options)
        pending = [remote.remote(t) for t in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    return run
