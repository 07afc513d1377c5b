"""Data at cluster size (issue 14): what a node holds for its workers' classes, and what preparing the cache costs.

A synthetic many-class dataset (default 1000 classes × 300 train + 50 validation images at 64×64×3; every image
random uint8, so nothing compresses) is built as a real tfds builder (``array_record``, like the offline datasets),
then ``l3rs data prepare``'s code (:func:`l3rs.data.cache.prepare`, its steps as Ray tasks: ``prepare_s``) writes its
class-indexed cache. A local ``ray.cluster_utils.Cluster`` on 127.0.0.1 gets 2 worker nodes; each runs 2 worker
actors that load their task pool exactly as a ``MetaWorker`` does (``TaskRunner`` → ``l3rs.meta.tasks.load_task_pool``:
the meta-training classes of the train split and of the validation split), then read every byte of it.

Memory is measured, not estimated: for each worker process, the proportional set size (PSS, /proc/PID/smaps) of its
mappings of the node's pool files, plus the growth of its private anonymous memory (RssAnon) over the load. A node's
data bytes are the sum over its workers; PSS splits a page shared by k processes k ways, so a page held once counts
once. Both "nodes" run on this one machine and share its page cache: each gets its own node-cache folder
(``L3RS_NODE_CACHE``), as separate machines have their own ``/tmp``.

  needed_bytes_per_node                  the bytes of the classes its workers need (train + eval pool arrays);
  node_bytes_over_needed                 max over nodes of (node data bytes with both workers) / needed (≤ 1.2);
  second_worker_extra_bytes_over_needed  max over nodes of (bytes with 2 workers − bytes with 1) / needed (≤ 0.1);
  worker_setup_s                         the first worker on a node (it writes the node's pool files from the cache);
  second_worker_setup_s                  a later worker on the node (maps them);
  old_path_bytes_per_node                computed, not measured: before the cache every worker process decoded and
                                         kept its whole train and eval splits plus the filtered copy.

Usage::

    python benchmarks/data_scale.py [--classes 1000] [--per-class 300] [--valid-per-class 50] [--size 64]

Prints a table, then one JSON object as the last line. Needs ~3× the dataset's size in free disk (tfds files, the
cache, the node pool files) under ``--dir`` (default: a temporary folder, removed at the end). Without TensorFlow,
tfds writes a split only as large as its in-memory shuffle buffer holds (it spills through ``tf.io.gfile``; here
25k images of 64×64×3 fit, 30k did not): the default size (3.7 GB of train images) needs TensorFlow installed,
otherwise lower ``--per-class`` (the script says how far).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

NUM_CLASSES, PER_CLASS, VALID_PER_CLASS, SIZE = 1000, 300, 50, 64
TFDS_BUFFER_MB = 300  # raw image MB of one split that tfds wrote here without TensorFlow (25k images at 64×64×3 did,
# 30k did not: its 1 GB in-memory shuffle buffer holds the serialized examples, then spills through tf.io.gfile)


def _builder_class() -> type:
    import tensorflow_datasets as tfds

    class DataScaleSynthetic(tfds.core.GeneratorBasedBuilder):
        """Random uint8 images, PER_CLASS (train) and VALID_PER_CLASS (validation) per class, classes interleaved."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(SIZE, SIZE, 3), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):  # noqa: ANN001 - tfds's signature
            del dl_manager  # nothing to download
            return {
                "train": self._generate_examples(PER_CLASS, 0),
                "validation": self._generate_examples(VALID_PER_CLASS, 1),
            }

        def _generate_examples(self, per_class: int, seed: int):  # noqa: ANN202
            rng = np.random.default_rng(seed)
            n = per_class * NUM_CLASSES
            for start in range(0, n, 1000):
                block = rng.integers(0, 256, size=(min(1000, n - start), SIZE, SIZE, 3), dtype=np.uint8)
                for j, img in enumerate(block):
                    yield start + j, {"image": img, "label": (start + j) % NUM_CLASSES}

    return DataScaleSynthetic


def _loopback_token_env() -> None:
    """As tests/conftest.py: every Ray socket on 127.0.0.1, token auth on with this run's own token (so
    ~/.ray/auth_token is neither read nor written), no joining someone else's cluster. Before Ray is imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)


def _start_cluster(nodes: int, node_cpus: int) -> Any:
    from ray._private.utils import get_ray_address_file, read_ray_address
    from ray.cluster_utils import Cluster

    previous = read_ray_address()
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 << 20, "num_gpus": 0, "dashboard_port": None}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 2, "include_dashboard": False})
    if read_ray_address() == cluster.address:  # do not let other people's ray.init() join this cluster
        if previous is None:
            os.remove(get_ray_address_file(None))
        else:
            with open(get_ray_address_file(None), "w") as f:
                f.write(previous)
    for i in range(nodes):
        cluster.add_node(wait=True, **common, num_cpus=node_cpus, resources={f"data_scale_node_{i}": node_cpus})
    return cluster


class Worker:
    """The data part of a MetaWorker: load the task pool, read it all, report this process's memory for it."""

    def __init__(self) -> None:
        import filelock  # noqa: F401 - everything the load path imports, before the baseline (a worker has them)
        import pyarrow.fs  # noqa: F401

        from l3rs.data import cache  # noqa: F401
        from l3rs.meta import tasks  # noqa: F401

        self.before = self._anon_kb()

    @staticmethod
    def _anon_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    def load(self, dist: Any) -> dict[str, Any]:
        import ray

        from l3rs.meta.tasks import load_task_pool

        start = time.perf_counter()
        self.pool = load_task_pool(dist)
        seconds = time.perf_counter() - start
        checksum = int(self.pool.train_images.sum(dtype=np.int64) + self.pool.eval_images.sum(dtype=np.int64))
        return {"seconds": seconds, "needed": int(self.pool.train_images.nbytes + self.pool.eval_images.nbytes),
                "checksum": checksum, "node": ray.get_runtime_context().get_node_id()}  # fmt: skip

    def memory(self) -> dict[str, int]:
        pss = 0
        current = False
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                    current = len(fields) >= 6 and fields[5].endswith(".images.npy")
                elif current and fields[0] == "Pss:":
                    pss += int(fields[1])
        return {"pool_pss": pss * 1024, "anon_growth": max(0, self._anon_kb() - self.before) * 1024}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global NUM_CLASSES, PER_CLASS, VALID_PER_CLASS, SIZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="train images per class")
    parser.add_argument("--valid-per-class", type=int, default=VALID_PER_CLASS, help="validation images per class")
    parser.add_argument("--size", type=int, default=SIZE, help="image height = width (3 channels)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers-per-node", type=int, default=2)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    _loopback_token_env()
    NUM_CLASSES, PER_CLASS, VALID_PER_CLASS, SIZE = args.classes, args.per_class, args.valid_per_class, args.size
    split_mb = NUM_CLASSES * max(PER_CLASS, VALID_PER_CLASS) * SIZE * SIZE * 3 / 2**20
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        if split_mb > TFDS_BUFFER_MB:
            print(f"data_scale: a {split_mb:.0f} MB split needs TensorFlow for tfds to write it (without it, tfds "
                  f"holds at most ~{TFDS_BUFFER_MB} MB per split): install tensorflow or lower --per-class, e.g. "
                  f"--per-class {int(PER_CLASS * TFDS_BUFFER_MB / split_mb)}.", file=sys.stderr)  # fmt: skip
            return {}

    import ray

    from l3rs.data import DatasetSpec
    from l3rs.data import cache as data_cache
    from l3rs.data.records import tfds_builder
    from l3rs.meta.tasks import TaskDistribution
    from l3rs.service.dataprep import ray_map

    work = args.dir or tempfile.mkdtemp(prefix="l3rs-data-scale-")
    os.makedirs(work, exist_ok=True)
    cluster = None
    try:
        data_dir = os.path.join(work, "tfds")
        builder_cls = _builder_class()
        start = time.perf_counter()
        builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
        build_s = time.perf_counter() - start
        name = "data_scale_synthetic"
        tfds_builder(name, data_dir, False, True)  # readable as the cache's step 1 reads it
        half, quarter = NUM_CLASSES // 2, NUM_CLASSES // 4
        spec = DatasetSpec(name, NUM_CLASSES, (SIZE, SIZE, 3), tuple(range(half)), tuple(range(half, half + quarter)),
                           tuple(range(half + quarter, NUM_CLASSES)), train_split="train", valid_split="validation",
                           test_split="validation", offline=True, cache=os.path.join(work, "cache"))  # fmt: skip

        cluster = _start_cluster(args.nodes, args.workers_per_node)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        start = time.perf_counter()
        summary = data_cache.prepare(spec, spec.cache, data_dir=data_dir, map_fn=ray_map(pin_here=True))
        prepare_s = time.perf_counter() - start

        dist = TaskDistribution(spec, stage="meta_train", data_dir=data_dir)
        remote = ray.remote(Worker)
        workers: dict[int, list[Any]] = {}
        for i in range(args.nodes):
            env = {"env_vars": {"L3RS_NODE_CACHE": os.path.join(work, f"node-{i}"), "JAX_PLATFORMS": "cpu"}}
            workers[i] = [remote.options(num_cpus=0, resources={f"data_scale_node_{i}": 1}, runtime_env=env).remote()
                          for _ in range(args.workers_per_node)]  # fmt: skip
        ray.get([w.memory.remote() for ws in workers.values() for w in ws])  # started, imports done
        loads: dict[int, list[dict[str, Any]]] = {i: [] for i in workers}
        node_bytes: dict[int, list[int]] = {i: [] for i in workers}
        for k in range(args.workers_per_node):  # the k-th worker of every node, then measure every node
            for i, out in zip(workers, ray.get([workers[i][k].load.remote(dist) for i in workers]), strict=True):
                loads[i].append(out)
            for i in workers:
                mem = ray.get([w.memory.remote() for w in workers[i][: k + 1]])
                node_bytes[i].append(sum(m["pool_pss"] + m["anon_growth"] for m in mem))
        needed = loads[0][0]["needed"]
        assert all(o["needed"] == needed and o["checksum"] == loads[0][0]["checksum"] for ls in loads.values()
                   for o in ls), "every worker must hold the same pool"  # fmt: skip
        assert len({o["node"] for ls in loads.values() for o in ls}) == args.nodes
        over = max(nb[-1] / needed for nb in node_bytes.values())
        extra = max((nb[1] - nb[0]) / needed for nb in node_bytes.values()) if args.workers_per_node > 1 else 0.0
        later = [o["seconds"] for ls in loads.values() for o in ls[1:]]
        split_bytes = (PER_CLASS + VALID_PER_CLASS) * NUM_CLASSES * SIZE * SIZE * 3
        result = {
            "benchmark": "data_scale",
            "classes": NUM_CLASSES,
            "train_per_class": PER_CLASS,
            "valid_per_class": VALID_PER_CLASS,
            "image_shape": [SIZE, SIZE, 3],
            "nodes": args.nodes,
            "workers_per_node": args.workers_per_node,
            "dataset_build_s": round(build_s, 2),
            "prepare_s": round(prepare_s, 2),
            "cache_bytes": summary["bytes"],
            "needed_bytes_per_node": needed,
            "node_bytes": {str(i): nb for i, nb in node_bytes.items()},
            "node_bytes_over_needed": round(over, 4),
            "second_worker_extra_bytes_over_needed": round(extra, 4),
            "worker_setup_s": round(statistics.median(ls[0]["seconds"] for ls in loads.values()), 3),
            "second_worker_setup_s": round(statistics.median(later), 3) if later else None,
            "old_path_bytes_per_node": args.workers_per_node * (split_bytes + needed),
            "targets": {"node_bytes_over_needed": 1.2, "second_worker_extra_bytes_over_needed": 0.1},
        }  # fmt: skip
        result["targets_met"] = over <= 1.2 and extra <= 0.1
        print(f"{'node':>4} {'1 worker MB':>12} {'all workers MB':>15} {'needed MB':>10}")
        for i, nb in node_bytes.items():
            print(f"{i:>4} {nb[0] / 2**20:>12.1f} {nb[-1] / 2**20:>15.1f} {needed / 2**20:>10.1f}")
        print(f"prepare {prepare_s:.1f} s ({summary['bytes'] / 2**20:.0f} MB of shards); worker setup "
              f"{result['worker_setup_s']} s first on a node, {result['second_worker_setup_s']} s after")  # fmt: skip
        print(json.dumps(result, sort_keys=True), flush=True)
        return result
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
