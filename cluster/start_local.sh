#!/usr/bin/env bash
# Starts a local Ray head node with the dashboard, for `l3rs submit` / `ray job submit` on this machine.
#
#   cluster/start_local.sh                 # CPU only; the head listens on 127.0.0.1 only
#   NUM_GPUS=2 cluster/start_local.sh      # advertise 2 GPUs (logical GPUs work on a CPU-only machine too)
#   cluster/add_local_worker.sh            # a second node joins (try elasticity by hand)
#   cluster/stop_local.sh                  # stops the nodes these scripts started
#
# Environment overrides (defaults in brackets):
#   NUM_CPUS [all cores]   NUM_GPUS [0]   RAY_PORT [6379]   DASHBOARD_PORT [8265]   METRICS_EXPORT_PORT [8080]
#   L3RS_RAY_HOST [127.0.0.1]: the address every server binds to. Anything but loopback exposes the cluster to your
#       network: only do that on a trusted network, with token auth on (the default here).
#   RAY_AUTH_MODE [token]: clients need the token in ~/.ray/auth_token (created here if missing) *and*
#       RAY_AUTH_MODE=token in their environment: `source $L3RS_CLUSTER_DIR/env.sh` (printed at the end) sets it.
#       "disabled" turns authentication off.
#   RAY_TEMP_DIR [Ray's default /tmp/ray]: session files and logs.
#   L3RS_CLUSTER_DIR: where the pid files and the head's console log go.
#   RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST: set them before starting to get Grafana panels in the dashboard
#       (see cluster/README.md, "Metrics").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/_common.sh
source "$here/_common.sh"
l3rs_require_ray

NUM_GPUS="${NUM_GPUS:-0}"
NUM_CPUS="${NUM_CPUS:-}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$L3RS_RAY_HOST" = "127.0.0.1" ]; then
  # With this at 0, Ray keeps every socket on loopback (--node-ip-address alone is silently not enough).
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi

mkdir -p "$L3RS_CLUSTER_DIR"
head_pid="$L3RS_CLUSTER_DIR/head.pid"
head_log="$L3RS_CLUSTER_DIR/head.log"
if l3rs_alive "$head_pid"; then
  echo "error: a local head started by this script is already running (pid $(cat "$head_pid"))." >&2
  echo "       stop it first: cluster/stop_local.sh" >&2
  exit 1
fi
if l3rs_port_open "$L3RS_RAY_HOST" "$RAY_PORT" || l3rs_port_open "$L3RS_RAY_HOST" "$DASHBOARD_PORT"; then
  echo "error: port $RAY_PORT or $DASHBOARD_PORT on $L3RS_RAY_HOST is in use (another Ray cluster?)." >&2
  echo "       choose others: RAY_PORT=16379 DASHBOARD_PORT=18265 $0" >&2
  exit 1
fi

if [ "$RAY_AUTH_MODE" = "token" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  "$RAY_BIN" get-auth-token --generate >/dev/null
  echo "created an authentication token in ~/.ray/auth_token"
fi

args=(start --head --block
  --node-ip-address="$L3RS_RAY_HOST"
  --port="$RAY_PORT"
  --include-dashboard=true
  --dashboard-host="$L3RS_RAY_HOST"
  --dashboard-port="$DASHBOARD_PORT"
  --metrics-export-port="$METRICS_EXPORT_PORT"
  --num-gpus="$NUM_GPUS"
  --disable-usage-stats)
if [ -n "$NUM_CPUS" ]; then args+=(--num-cpus="$NUM_CPUS"); fi
if [ -n "${RAY_TEMP_DIR:-}" ]; then args+=(--temp-dir="$RAY_TEMP_DIR"); fi

# `ray start --block` in the background: its pid is the handle stop_local.sh uses, and it takes the node's Ray
# processes down with it, so stopping this cluster never touches other Ray processes on the machine.
nohup "$RAY_BIN" "${args[@]}" >"$head_log" 2>&1 </dev/null &
echo $! >"$head_pid"

for _ in $(seq 1 120); do
  if ! l3rs_alive "$head_pid"; then
    echo "error: the Ray head exited while starting; its log ($head_log) ends with:" >&2
    tail -n 30 "$head_log" >&2
    rm -f "$head_pid"
    exit 1
  fi
  if l3rs_port_open "$L3RS_RAY_HOST" "$DASHBOARD_PORT" && grep -q "Ray runtime started" "$head_log"; then
    break
  fi
  sleep 0.5
done
if ! l3rs_port_open "$L3RS_RAY_HOST" "$DASHBOARD_PORT"; then
  echo "error: the dashboard did not come up on $L3RS_RAY_HOST:$DASHBOARD_PORT within 60 s; see $head_log" >&2
  exit 1
fi

dashboard="http://$L3RS_RAY_HOST:$DASHBOARD_PORT"
# What clients of this cluster need in their environment (Ray CLIs, `l3rs submit/status/logs`, drivers).
env_file="$L3RS_CLUSTER_DIR/env.sh"
{
  echo "# source me: settings for clients of the local Ray cluster started by cluster/start_local.sh"
  echo "export RAY_ADDRESS=$L3RS_RAY_HOST:$RAY_PORT"
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  if [ "$L3RS_RAY_HOST" = "127.0.0.1" ]; then
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # else Ray clients rewrite 127.0.0.1 to this machine's external address"
  fi
  echo "export L3RS_DASHBOARD=$dashboard"
} >"$env_file"

cat <<MSG
Ray head running (pid $(cat "$head_pid"), CPUs: ${NUM_CPUS:-all}, GPUs: $NUM_GPUS, auth: $RAY_AUTH_MODE).

  Dashboard:     $dashboard
  Client env:    source $env_file
                 (RAY_ADDRESS=$L3RS_RAY_HOST:$RAY_PORT, RAY_AUTH_MODE=$RAY_AUTH_MODE: for ray status, ray job submit,
                 l3rs submit/status/logs/stop, l3rs train, ray.init)
  Submit a run:  l3rs submit --address $dashboard --config jobs/configs/fmnist_default.toml
  Metrics:       http://$L3RS_RAY_HOST:$METRICS_EXPORT_PORT/metrics   (Prometheus names: ray_l3rs_*)
  Add a node:    $here/add_local_worker.sh        (1 logical GPU; NUM_GPUS=... to change)
  Stop:          $here/stop_local.sh
  Console log:   $head_log
MSG
