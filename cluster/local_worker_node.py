"""A Ray worker node on loopback that joins the head started by cluster/start_local.sh (run by add_local_worker.sh).

Why not ``ray start --address=127.0.0.1:6379``: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what keeps a node's
sockets on 127.0.0.1) the CLI refuses to add nodes, and without it the CLI rewrites 127.0.0.1 to the machine's
external address and the node's servers listen on every interface. This starts the node the way Ray's own
multi-node-on-one-machine helper does (``ray.cluster_utils.Cluster.add_node``), with every socket on loopback, and
blocks until SIGTERM or Ctrl-C, which stop the node's processes (the autoscaler and the l3rs worker pool see a node
leave).

Unlike ``Cluster.add_node`` the node gets its own Ray temp dir (``--temp-dir``), as it would on another machine: nodes
that share a session dir share its ``runtime_resources/``, and one node's runtime-env garbage collection then deletes
a job's ``working_dir`` while the driver, attached to the other node, still imports from it. With its own session dir
the node also runs its own log monitor, so its workers' output reaches the drivers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Must be set before Ray is imported: it is read once, at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:6379", help="the head's GCS address (host:port)")
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--num-gpus", type=int, default=1, help="logical GPUs this node advertises")
    parser.add_argument("--object-store-memory", type=int, default=512 * 1024**2, help="bytes")
    parser.add_argument("--temp-dir", required=True, help="this node's own Ray temp dir (not the head's)")
    args = parser.parse_args(argv)

    host = args.address.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost"):
        parser.error(f"--address: this helper is for a loopback head; for {host} use `ray start --address=...`")

    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=f"127.0.0.1:{args.address.rsplit(':', 1)[1]}",
        node_ip_address="127.0.0.1",
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_memory=args.object_store_memory,
        min_worker_port=0,  # OS-chosen ports: no race with the head's workers on the same machine
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=True,  # its own session dir has its own logs to forward
        temp_dir=os.path.abspath(args.temp_dir),
    )
    params.dashboard_agent_listen_port = None  # a free port, not the head agent's 52365
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(
        f"Ray runtime started: worker node {node.node_id} on 127.0.0.1 joined {params.gcs_address} "
        f"({args.num_gpus} GPU, {args.num_cpus} CPU). Stop with SIGTERM or Ctrl-C.",
        flush=True,
    )
    try:
        while True:
            time.sleep(1.0)
            dead = [name for name, proc in node.dead_processes() if proc.returncode not in (0, 15, -15, 143)]
            if dead:
                print(f"Ray processes of this node exited unexpectedly: {dead}; stopping the node.", flush=True)
                node.kill_all_processes(check_alive=False, allow_graceful=False)
                return 1
    except KeyboardInterrupt:
        print("stopping the worker node", flush=True)
        return 0  # the shutdown hook registered by Node stops the node's processes


if __name__ == "__main__":
    sys.exit(main())
