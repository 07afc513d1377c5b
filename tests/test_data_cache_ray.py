"""One copy per node on a real local Ray cluster: two worker processes on one node that load the same task pool map
the same node-local file, and the second adds no private memory for it (issue 14 part 1)."""

from __future__ import annotations

import os

import numpy as np


def _holder_class() -> type:
    """The actor class, defined here so that Ray ships it by value (test modules are not importable on workers)."""

    def _mapping_stats(path_part: str) -> dict[str, int]:
        """kB totals of this process's mappings whose file name contains ``path_part`` (from /proc/self/smaps), and the
        inodes mapped."""
        stats = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0, "Shared_Clean": 0}
        inodes = set()
        current = False
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                    current = len(fields) >= 6 and path_part in fields[5]
                    if current:
                        inodes.add(int(fields[4]))
                elif current and fields[0].rstrip(":") in stats:
                    stats[fields[0].rstrip(":")] += int(fields[1])
        return {**stats, "inodes": sorted(inodes)}

    class PoolHolder:
        """What a MetaWorker does for its data (``TaskRunner`` calls ``load_task_pool``), and a look at its memory."""

        def load(self) -> int:
            from l3rs.meta.tasks import TaskDistribution, load_task_pool

            self.pool = load_task_pool(TaskDistribution("sklearn_digits"))
            return int(self.pool.train_images.nbytes + self.pool.eval_images.nbytes)

        def touch(self) -> int:  # read every byte, as the inner loop's gathers eventually do
            return int(self.pool.train_images.sum(dtype=np.int64) + self.pool.eval_images.sum(dtype=np.int64))

        def stats(self) -> dict:
            return _mapping_stats(".images.npy")

    return PoolHolder


def test_two_workers_on_a_node_share_one_copy(ray_connected, tmp_path):
    import ray

    node_cache = str(tmp_path / "node")
    env = {"env_vars": {"L3RS_NODE_CACHE": node_cache, "JAX_PLATFORMS": "cpu"}}
    Holder = ray.remote(num_cpus=0)(_holder_class())
    a, b = Holder.options(runtime_env=env).remote(), Holder.options(runtime_env=env).remote()
    needed = ray.get(a.load.remote())
    assert ray.get(b.load.remote()) == needed
    assert ray.get(a.touch.remote()) == ray.get(b.touch.remote())
    sa, sb = ray.get([a.stats.remote(), b.stats.remote()])
    # The same file (two pools: train and eval split), written once for the node.
    assert sa["inodes"] == sb["inodes"] and len(sa["inodes"]) == 2
    assert len([n for n in os.listdir(node_cache) if n.endswith(".images.npy")]) == 2
    for s in (sa, sb):
        assert s["Private_Dirty"] == 0 and s["Private_Clean"] == 0, s  # nothing of it is this process's own
        assert s["Shared_Clean"] >= needed // 1024
    # Proportional share: the two processes' PSS of the pool files add up to about one copy (pages round up).
    assert needed // 1024 <= sa["Pss"] + sb["Pss"] <= needed // 1024 + 2 * 4 * len(sa["inodes"]) + 8
    ray.kill(a)
    ray.kill(b)


def test_prepare_runs_as_ray_tasks(ray_connected, tmp_path, capsys):
    """``l3rs data prepare`` given a cluster (as inside a Ray job, where RAY_ADDRESS is set): the steps run as Ray
    tasks and write the same shards as a prepare in one process."""
    import json

    from l3rs import cli, data
    from l3rs.data import cache

    config = tmp_path / "c.toml"
    config.write_text(f'[data]\ndataset = "sklearn_digits"\ncache = "{tmp_path / "c"}"\n')
    argv = ["data", "prepare", "--config", str(config), "--address", ray_connected.address, "--chunk-records", "400"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ray"] and out["written"] == 30
    local = cache.prepare(data.get_spec("sklearn_digits"), str(tmp_path / "d"), chunk_records=400)
    shards = lambda uri: json.load(open(os.path.join(uri, "manifest.json")))["shards"]  # noqa: E731
    assert shards(str(tmp_path / "c")) == shards(str(tmp_path / "d")) and local["written"] == 30
