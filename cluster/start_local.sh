#!/usr/bin/env bash
# Starts a local Ray head node with the dashboard, for `l3rs submit` / `ray job submit` on this machine.
#
#   cluster/start_local.sh                     # CPU only; every socket on 127.0.0.1; token auth on
#   cluster/start_local.sh --num-gpus 2        # advertise 2 GPUs (logical GPUs work on a CPU-only machine too)
#   cluster/add_local_worker.sh                # a second node joins (watch the worker pool grow)
#   cluster/stop_local.sh                      # stops the nodes these scripts started, nothing else
#
# Options (environment variable in brackets):
#   --host ADDR           [L3RS_RAY_HOST=127.0.0.1] the address every server binds to. Anything but loopback (e.g.
#                         this machine's LAN address, so other machines can join with `ray start --address`) exposes
#                         the cluster to that network: use it only on a trusted network; token auth is required then.
#   --port N              [L3RS_RAY_PORT=6379] GCS port (the address nodes and drivers join)
#   --dashboard-port N    [L3RS_DASHBOARD_PORT=8265] dashboard + Jobs API
#   --metrics-port N      [L3RS_METRICS_PORT=8080] Prometheus endpoint of the head
#   --client-port N       [L3RS_CLIENT_PORT=10001] Ray Client server (ray://) of the head
#                         (ports inside Ray's worker port range, 10002-19999, are refused: ray start would refuse them)
#   --num-cpus N          [NUM_CPUS=all cores]
#   --num-gpus N          [NUM_GPUS=0]
#   --temp-dir DIR        [RAY_TEMP_DIR=Ray's /tmp/ray] session files and logs
#   -- ARGS...            passed on to `ray start` unchanged (e.g. -- --object-store-memory=1000000000)
# Environment only:
#   RAY_AUTH_MODE [token]: clients need the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, created
#       here if none exists) *and* RAY_AUTH_MODE=token: `source $L3RS_CLUSTER_DIR/env.sh` (printed at the end) sets
#       it. "disabled" turns authentication off (refused together with a non-loopback --host).
#   L3RS_CLUSTER_DIR [${TMPDIR:-/tmp}/l3rs-local-cluster-UID]: pid files, the head's console log, env.sh.
#   RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST: set them to get Grafana panels in the dashboard (cluster/README.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/_common.sh
source "$here/_common.sh"

NUM_GPUS="${NUM_GPUS:-0}"
NUM_CPUS="${NUM_CPUS:-}"
RAY_TEMP_DIR="${RAY_TEMP_DIR:-}"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --host) L3RS_RAY_HOST="${2:?--host needs an address}"; shift 2 ;;
    --host=*) L3RS_RAY_HOST="${1#*=}"; shift ;;
    --port) L3RS_RAY_PORT="${2:?--port needs a number}"; shift 2 ;;
    --port=*) L3RS_RAY_PORT="${1#*=}"; shift ;;
    --dashboard-port) L3RS_DASHBOARD_PORT="${2:?}"; shift 2 ;;
    --dashboard-port=*) L3RS_DASHBOARD_PORT="${1#*=}"; shift ;;
    --metrics-port) L3RS_METRICS_PORT="${2:?}"; shift 2 ;;
    --metrics-port=*) L3RS_METRICS_PORT="${1#*=}"; shift ;;
    --client-port) L3RS_CLIENT_PORT="${2:?}"; shift 2 ;;
    --client-port=*) L3RS_CLIENT_PORT="${1#*=}"; shift ;;
    --num-cpus) NUM_CPUS="${2:?}"; shift 2 ;;
    --num-cpus=*) NUM_CPUS="${1#*=}"; shift ;;
    --num-gpus) NUM_GPUS="${2:?}"; shift 2 ;;
    --num-gpus=*) NUM_GPUS="${1#*=}"; shift ;;
    --temp-dir) RAY_TEMP_DIR="${2:?}"; shift 2 ;;
    --temp-dir=*) RAY_TEMP_DIR="${1#*=}"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--host ADDR] [--port N] [--dashboard-port N] [--metrics-port N] [--client-port N]" \
      "[--num-cpus N] [--num-gpus N] [--temp-dir DIR] [-- RAY_START_ARGS...]   (--help for more)" >&2; exit 2 ;;
  esac
done
l3rs_require_ray

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "$RAY_AUTH_MODE" in
  token | disabled) ;;
  *) l3rs_die "RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH_MODE'." ;;
esac
if l3rs_is_loopback "$L3RS_RAY_HOST"; then
  L3RS_RAY_HOST=127.0.0.1
  # With this at 0 Ray keeps every socket on loopback; without it --node-ip-address is silently not enough.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
else
  [ "$RAY_AUTH_MODE" = token ] ||
    l3rs_die "refusing to expose an unauthenticated cluster on $L3RS_RAY_HOST: keep RAY_AUTH_MODE=token."
  unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # other machines must be able to join
  echo "warning: binding to $L3RS_RAY_HOST, not loopback: the cluster is reachable from that network" \
    "(token auth protects it; traffic is not encrypted)." >&2
fi

mkdir -p "$L3RS_CLUSTER_DIR"
head_pid="$L3RS_CLUSTER_DIR/head.pid"
head_log="$L3RS_CLUSTER_DIR/head.log"
if l3rs_alive "$head_pid"; then
  l3rs_die "a head started by this script is already running (pid $(cat "$head_pid")); stop it: $here/stop_local.sh"
fi
# Ports for a second cluster on this machine: above Ray's default worker port range (10002-19999), where `ray start`
# refuses fixed ports unless the worker range is moved too (--min-worker-port / --max-worker-port after --).
# The hint names the first such set that is free now.
other_ports=""
for d in 2 3 4 5; do
  l3rs_port_open "$L3RS_RAY_HOST" "${d}6379" || l3rs_port_open "$L3RS_RAY_HOST" "${d}8265" ||
    l3rs_port_open "$L3RS_RAY_HOST" "${d}8080" || l3rs_port_open "$L3RS_RAY_HOST" "${d}0001" || {
    other_ports="--port ${d}6379 --dashboard-port ${d}8265 --metrics-port ${d}8080 --client-port ${d}0001"
    break
  }
done
other_ports="${other_ports:---port 26379 --dashboard-port 28265 --metrics-port 28080 --client-port 20001}"
case " ${extra[*]-} " in
  *" --min-worker-port"* | *" --max-worker-port"* | *" --worker-port-list"*) worker_range_moved=1 ;;
  *) worker_range_moved=0 ;;
esac
for name_port in "--port=$L3RS_RAY_PORT" "--dashboard-port=$L3RS_DASHBOARD_PORT" "--metrics-port=$L3RS_METRICS_PORT" \
  "--client-port=$L3RS_CLIENT_PORT"; do
  name="${name_port%%=*}" port="${name_port#*=}"
  case "$port" in
    '' | *[!0-9]*) l3rs_die "$name must be a port number, got '$port'." ;;
  esac
  [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || l3rs_die "$name must be a port number (1-65535), got $port."
  if [ "$worker_range_moved" = 0 ] && [ "$port" -ge 10002 ] && [ "$port" -le 19999 ]; then
    l3rs_die "$name $port is inside Ray's worker port range (10002-19999), which ray start refuses; choose" \
      "ports above 20000, e.g. $0 $other_ports"
  fi
done
for port in "$L3RS_RAY_PORT" "$L3RS_DASHBOARD_PORT" "$L3RS_METRICS_PORT" "$L3RS_CLIENT_PORT"; do
  if l3rs_port_open "$L3RS_RAY_HOST" "$port"; then
    l3rs_die "port $port on $L3RS_RAY_HOST is in use (another Ray cluster?); choose others, e.g. $0 $other_ports"
  fi
done

if [ "$RAY_AUTH_MODE" = token ] && ! l3rs_token_available; then
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    l3rs_die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty."
  fi
  "$RAY_BIN" get-auth-token --generate >/dev/null
  echo "created an authentication token in ~/.ray/auth_token"
fi

args=(start --head --block
  --node-ip-address="$L3RS_RAY_HOST"
  --port="$L3RS_RAY_PORT"
  --include-dashboard=true
  --dashboard-host="$L3RS_RAY_HOST"
  --dashboard-port="$L3RS_DASHBOARD_PORT"
  --metrics-export-port="$L3RS_METRICS_PORT"
  --ray-client-server-port="$L3RS_CLIENT_PORT"
  --num-gpus="$NUM_GPUS"
  --disable-usage-stats)
if [ -n "$NUM_CPUS" ]; then args+=(--num-cpus="$NUM_CPUS"); fi
if [ -n "$RAY_TEMP_DIR" ]; then args+=(--temp-dir="$RAY_TEMP_DIR"); fi
# The dashboard agent's HTTP port: any free one (Ray's fixed default, 52365, clashes with other Ray instances on
# this machine, and then job submission fails with "No available agent"); the dashboard finds it through the GCS.
case " ${extra[*]-} " in *" --dashboard-agent-listen-port"*) ;; *) args+=(--dashboard-agent-listen-port=0) ;; esac
args+=(${extra[@]+"${extra[@]}"})

# `ray start --block` in the background: its pid is the handle stop_local.sh uses, and SIGTERM to it stops the node's
# Ray processes (and a reaper takes them down if it dies), so stopping this cluster never touches other Ray processes.
nohup "$RAY_BIN" "${args[@]}" >"$head_log" 2>&1 </dev/null &
echo $! >"$head_pid"
l3rs_wait_started "$head_pid" "$head_log" "the Ray head" "$L3RS_RAY_HOST" "$L3RS_DASHBOARD_PORT" || exit 1

dashboard="http://$L3RS_RAY_HOST:$L3RS_DASHBOARD_PORT"
# What clients of this cluster need in their environment (ray CLIs, `l3rs submit`, `l3rs train`, drivers),
# and what add_local_worker.sh / stop_local.sh read back.
env_file="$L3RS_CLUSTER_DIR/env.sh"
{
  echo "# source me: settings for clients of the Ray cluster started by cluster/start_local.sh"
  echo "# (RAY_ADDRESS points Ray clients of this shell at it; an explicit l3rs --address wins over it.)"
  echo "export RAY_ADDRESS=$L3RS_RAY_HOST:$L3RS_RAY_PORT"
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    token_path="$(cd "$(dirname "$RAY_AUTH_TOKEN_PATH")" && pwd)/$(basename "$RAY_AUTH_TOKEN_PATH")"
    echo "export RAY_AUTH_TOKEN_PATH=$token_path"
  elif [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    echo "# the token came from RAY_AUTH_TOKEN: export it in every client shell too (not written here)"
  fi
  if [ "$L3RS_RAY_HOST" = 127.0.0.1 ]; then
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # keeps drivers on loopback (else Ray uses the external address)"
  fi
  echo "export L3RS_DASHBOARD=$dashboard"
  echo "export L3RS_RAY_HOST=$L3RS_RAY_HOST L3RS_RAY_PORT=$L3RS_RAY_PORT L3RS_CLUSTER_DIR=$L3RS_CLUSTER_DIR"
  if [ -n "$RAY_TEMP_DIR" ]; then echo "export RAY_TEMP_DIR=$RAY_TEMP_DIR"; fi
} >"$env_file"

cat <<MSG
Ray head running on $L3RS_RAY_HOST (pid $(cat "$head_pid"); CPUs: ${NUM_CPUS:-all}, GPUs: $NUM_GPUS, auth: $RAY_AUTH_MODE).

  Dashboard:     $dashboard   (token auth: paste the output of \`ray get-auth-token\` when it asks)
  Client env:    source $env_file
  Submit a run:  l3rs submit --address $dashboard --config jobs/configs/fmnist_default.toml
  Follow it:     l3rs logs JOB_ID --address $dashboard --follow
  Metrics:       http://$L3RS_RAY_HOST:$L3RS_METRICS_PORT/metrics   (names: ray_l3rs_*)
  Add a node:    $here/add_local_worker.sh        (1 logical GPU; NUM_GPUS=... to change)
  Stop:          $here/stop_local.sh
  Console log:   $head_log
MSG
