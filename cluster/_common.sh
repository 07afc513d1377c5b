# Shared settings and helpers of the local-cluster scripts (sourced, not run). Every value can be overridden from the
# environment; start_local.sh also takes most of them as flags.
# shellcheck shell=bash

# Loopback by default. Any other address (a LAN address, for a real multi-machine cluster) is an explicit opt-in:
# `start_local.sh --host ADDR` or L3RS_RAY_HOST=ADDR.
L3RS_RAY_HOST="${L3RS_RAY_HOST:-127.0.0.1}"
L3RS_RAY_PORT="${L3RS_RAY_PORT:-6379}"                  # GCS port: the address nodes and drivers join
L3RS_DASHBOARD_PORT="${L3RS_DASHBOARD_PORT:-8265}"      # dashboard + Jobs API (what `l3rs submit --address` takes)
L3RS_METRICS_PORT="${L3RS_METRICS_PORT:-8080}"          # the head's Prometheus endpoint (/metrics)
L3RS_CLIENT_PORT="${L3RS_CLIENT_PORT:-10001}"          # the head's Ray Client server (ray://HOST:PORT)
RAY_BIN="${RAY_BIN:-ray}"
# Pid files, console logs and env.sh of the nodes these scripts start; stop_local.sh stops exactly those.
L3RS_CLUSTER_DIR="${L3RS_CLUSTER_DIR:-${TMPDIR:-/tmp}/l3rs-local-cluster-$(id -u)}"

l3rs_die() {
  echo "error: $*" >&2
  exit 1
}

l3rs_require_ray() {
  command -v "$RAY_BIN" >/dev/null 2>&1 ||
    l3rs_die "'$RAY_BIN' not found; activate the environment where l3rs is installed (pip install -e .) or set RAY_BIN."
}

# l3rs_is_loopback HOST: true for the addresses that keep a cluster on this machine.
l3rs_is_loopback() {
  case "$1" in
    127.0.0.1 | localhost) return 0 ;;
    *) return 1 ;;
  esac
}

# l3rs_token_available: true if a Ray client/node of this shell would find an authentication token
# (same order as Ray: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
l3rs_token_available() {
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then return 0; fi
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then [ -s "$RAY_AUTH_TOKEN_PATH" ]; return; fi
  [ -s "$HOME/.ray/auth_token" ]
}

# l3rs_alive PIDFILE: true if the pid in PIDFILE is a running process.
l3rs_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# l3rs_port_open HOST PORT: true if something accepts TCP connections there (bash's /dev/tcp, no curl needed).
l3rs_port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# l3rs_wait_started PIDFILE LOG NAME [HOST PORT]: waits up to 90 s until LOG says "Ray runtime started" (and, if
# given, HOST:PORT accepts connections). Fails, printing the end of LOG, if the process exits first or time runs out.
l3rs_wait_started() {
  local pidfile="$1" log="$2" name="$3" host="${4:-}" port="${5:-}" _
  for _ in $(seq 1 180); do
    if ! l3rs_alive "$pidfile"; then
      echo "error: $name exited while starting; its log ($log) ends with:" >&2
      tail -n 30 "$log" >&2
      rm -f "$pidfile"
      return 1
    fi
    if grep -q "Ray runtime started" "$log" && { [ -z "$port" ] || l3rs_port_open "$host" "$port"; }; then
      return 0
    fi
    sleep 0.5
  done
  echo "error: $name did not start within 90 s; stopping it. Its log: $log" >&2
  l3rs_stop_pidfile "$pidfile" "$name"
  return 1
}

# l3rs_stop_pidfile PIDFILE NAME: SIGTERM the node process (`ray start --block` or local_worker_node.py: both stop
# their node's Ray processes on SIGTERM), wait, SIGKILL after 30 s. Removes the pid file.
l3rs_stop_pidfile() {
  local pidfile="$1" name="$2" pid _
  if ! l3rs_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  echo "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  $name did not stop within 30 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
