# Shared settings of the local-cluster scripts (sourced, not run). Every value can be overridden from the environment.
# shellcheck shell=bash

# Loopback only by default: with this variable at 0 Ray binds every socket of the head to 127.0.0.1
# (without it, --node-ip-address is not enough: some servers still listen on all interfaces).
L3RS_RAY_HOST="${L3RS_RAY_HOST:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"                    # GCS port: the address nodes and drivers join
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"        # dashboard + Jobs API (what `l3rs submit --address` takes)
METRICS_EXPORT_PORT="${METRICS_EXPORT_PORT:-8080}"  # the head's Prometheus endpoint (/metrics)
RAY_BIN="${RAY_BIN:-ray}"
# Pid files and logs of the nodes these scripts start; stop_local.sh stops exactly those.
L3RS_CLUSTER_DIR="${L3RS_CLUSTER_DIR:-${TMPDIR:-/tmp}/l3rs-local-cluster-$(id -u)}"

l3rs_require_ray() {
  if ! command -v "$RAY_BIN" >/dev/null 2>&1; then
    echo "error: '$RAY_BIN' not found; activate the environment where l3rs is installed (pip install -e .) or set RAY_BIN." >&2
    exit 1
  fi
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

# l3rs_stop_pidfile PIDFILE NAME: SIGTERM the `ray start --block` process (it stops the node's Ray processes), wait,
# SIGKILL after 30 s. Removes the pid file.
l3rs_stop_pidfile() {
  local pidfile="$1" name="$2" pid i
  if ! l3rs_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  echo "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  $name did not stop within 30 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
