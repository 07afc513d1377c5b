#!/usr/bin/env bash
# Adds a worker node to the head started by cluster/start_local.sh: a second Ray node on this machine with its own
# (logical) GPUs, so you can watch the l3rs worker pool grow and shrink while a run goes on.
#
#   cluster/add_local_worker.sh                 # background node with 1 logical GPU and 1 CPU
#   cluster/add_local_worker.sh --num-gpus 2    # ... with 2 logical GPUs
#   cluster/add_local_worker.sh --foreground    # same, in this terminal: Ctrl-C removes the node again
#   cluster/stop_local.sh --worker 1            # removes background node 1 (the run re-queues its work units)
#
# Host, port and auth settings come from the head's env.sh (written by start_local.sh into L3RS_CLUSTER_DIR).
# Environment overrides: NUM_GPUS [1]  NUM_CPUS [1]  L3RS_CLUSTER_DIR  PYTHON [the interpreter next to `ray`].
# Logical GPUs are only a resource label: on a machine without GPUs, JAX in the worker runs on the CPU.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/_common.sh
source "$here/_common.sh"

NUM_GPUS="${NUM_GPUS:-1}"
NUM_CPUS="${NUM_CPUS:-1}"
foreground=0
while [ $# -gt 0 ]; do
  case "$1" in
    --foreground | -f) foreground=1; shift ;;
    --num-gpus) NUM_GPUS="${2:?}"; shift 2 ;;
    --num-gpus=*) NUM_GPUS="${1#*=}"; shift ;;
    --num-cpus) NUM_CPUS="${2:?}"; shift 2 ;;
    --num-cpus=*) NUM_CPUS="${1#*=}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--foreground] [--num-gpus N] [--num-cpus N]" >&2; exit 2 ;;
  esac
done
l3rs_require_ray

env_file="$L3RS_CLUSTER_DIR/env.sh"
[ -f "$env_file" ] || l3rs_die "no head started by cluster/start_local.sh (no $env_file); start one first."
# shellcheck source=/dev/null
source "$env_file"  # RAY_AUTH_MODE, the token's path, L3RS_RAY_HOST/PORT of the head
l3rs_port_open "$L3RS_RAY_HOST" "$L3RS_RAY_PORT" || l3rs_die "no Ray head at $L3RS_RAY_HOST:$L3RS_RAY_PORT."

if [ "$L3RS_RAY_HOST" = 127.0.0.1 ]; then
  # `ray start --address` cannot join a loopback-only head (see local_worker_node.py): start the node directly.
  PYTHON="${PYTHON:-$(dirname "$(command -v "$RAY_BIN")")/python}"
  [ -x "$PYTHON" ] || PYTHON=python3
  cmd=("$PYTHON" "$here/local_worker_node.py" --address="$L3RS_RAY_HOST:$L3RS_RAY_PORT"
    --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS")
else
  cmd=("$RAY_BIN" start --block --address="$L3RS_RAY_HOST:$L3RS_RAY_PORT" --node-ip-address="$L3RS_RAY_HOST"
    --num-gpus="$NUM_GPUS" --num-cpus="$NUM_CPUS" --min-worker-port=0 --max-worker-port=0
    --dashboard-agent-listen-port=0 --metrics-export-port=0 --disable-usage-stats)
fi

n=1
while [ -e "$L3RS_CLUSTER_DIR/worker-$n.pid" ]; do
  if l3rs_alive "$L3RS_CLUSTER_DIR/worker-$n.pid"; then n=$((n + 1)); else rm -f "$L3RS_CLUSTER_DIR/worker-$n.pid"; fi
done
# Its own Ray temp dir, as if on another machine: two nodes sharing one session dir share its runtime_resources/, and
# one node's runtime-env cleanup then deletes a job's working_dir under the other node's running driver.
if [ "$foreground" = 1 ]; then
  cmd+=(--temp-dir="$L3RS_CLUSTER_DIR/f$$")
  echo "worker node joining $L3RS_RAY_HOST:$L3RS_RAY_PORT with $NUM_GPUS GPU(s), $NUM_CPUS CPU(s); Ctrl-C removes it."
  exec "${cmd[@]}"
fi

cmd+=(--temp-dir="$L3RS_CLUSTER_DIR/w$n")
pidfile="$L3RS_CLUSTER_DIR/worker-$n.pid"
log="$L3RS_CLUSTER_DIR/worker-$n.log"
nohup "${cmd[@]}" >"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
l3rs_wait_started "$pidfile" "$log" "worker node $n" || exit 1
echo "worker node $n joined $L3RS_RAY_HOST:$L3RS_RAY_PORT (pid $(cat "$pidfile"), GPUs: $NUM_GPUS, CPUs: $NUM_CPUS)"
echo "  remove it: $here/stop_local.sh --worker $n     log: $log"
