#!/usr/bin/env bash
# Adds a worker node to the local head started by cluster/start_local.sh: a second Ray node on this machine with
# its own (logical) GPUs, so you can watch the l3rs worker pool grow and shrink while a run goes on.
#
#   cluster/add_local_worker.sh                # background node with 1 logical GPU and 1 CPU
#   cluster/add_local_worker.sh --foreground   # same, in this terminal: Ctrl-C removes the node again
#   cluster/stop_local.sh --worker 1           # removes background node 1 (the run re-queues its work units)
#
# Environment overrides: NUM_GPUS [1]  NUM_CPUS [1]  RAY_PORT [6379]  L3RS_RAY_HOST [127.0.0.1]  L3RS_CLUSTER_DIR
#   PYTHON [the interpreter next to the `ray` CLI]  RAY_TEMP_DIR.
# Logical GPUs are only a resource label: on a machine without GPUs, JAX in the worker runs on the CPU.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/_common.sh
source "$here/_common.sh"
l3rs_require_ray

foreground=0
case "${1:-}" in
  "") ;;
  --foreground|-f) foreground=1 ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--foreground]" >&2; exit 2 ;;
esac

NUM_GPUS="${NUM_GPUS:-1}"
NUM_CPUS="${NUM_CPUS:-1}"
if [ -z "${RAY_AUTH_MODE:-}" ] && [ -s "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE=token  # the head of start_local.sh runs with token auth
fi
if ! l3rs_port_open "$L3RS_RAY_HOST" "$RAY_PORT"; then
  echo "error: no Ray head at $L3RS_RAY_HOST:$RAY_PORT; start one with cluster/start_local.sh" >&2
  exit 1
fi

if [ "$L3RS_RAY_HOST" = "127.0.0.1" ]; then
  # `ray start --address` cannot join a loopback-only head (see local_worker_node.py): start the node directly.
  PYTHON="${PYTHON:-$(dirname "$(command -v "$RAY_BIN")")/python}"
  [ -x "$PYTHON" ] || PYTHON=python3
  cmd=("$PYTHON" "$here/local_worker_node.py" --address="$L3RS_RAY_HOST:$RAY_PORT"
    --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS")
else
  cmd=("$RAY_BIN" start --block --address="$L3RS_RAY_HOST:$RAY_PORT" --node-ip-address="$L3RS_RAY_HOST"
    --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS" --min-worker-port=0 --max-worker-port=0 --disable-usage-stats)
fi
if [ -n "${RAY_TEMP_DIR:-}" ]; then cmd+=(--temp-dir="$RAY_TEMP_DIR"); fi

if [ "$foreground" = 1 ]; then
  echo "worker node joining $L3RS_RAY_HOST:$RAY_PORT with $NUM_GPUS GPU(s), $NUM_CPUS CPU(s); Ctrl-C removes it."
  exec "${cmd[@]}"
fi

mkdir -p "$L3RS_CLUSTER_DIR"
n=1
while [ -e "$L3RS_CLUSTER_DIR/worker-$n.pid" ]; do
  if l3rs_alive "$L3RS_CLUSTER_DIR/worker-$n.pid"; then n=$((n + 1)); else rm -f "$L3RS_CLUSTER_DIR/worker-$n.pid"; fi
done
pidfile="$L3RS_CLUSTER_DIR/worker-$n.pid"
log="$L3RS_CLUSTER_DIR/worker-$n.log"
nohup "${cmd[@]}" >"$log" 2>&1 </dev/null &
echo $! >"$pidfile"

for _ in $(seq 1 120); do
  if ! l3rs_alive "$pidfile"; then
    echo "error: worker node $n exited while starting; its log ($log) ends with:" >&2
    tail -n 30 "$log" >&2
    rm -f "$pidfile"
    exit 1
  fi
  if grep -q "Ray runtime started" "$log"; then
    echo "worker node $n joined $L3RS_RAY_HOST:$RAY_PORT (pid $(cat "$pidfile"), GPUs: $NUM_GPUS, CPUs: $NUM_CPUS)"
    echo "  remove it: $here/stop_local.sh --worker $n     log: $log"
    exit 0
  fi
  sleep 0.5
done
echo "error: worker node $n did not start within 60 s; stopping it. Its log: $log" >&2
l3rs_stop_pidfile "$pidfile" "worker-$n node"
exit 1
