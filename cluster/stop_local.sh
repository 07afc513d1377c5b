#!/usr/bin/env bash
# Stops the local Ray nodes that cluster/start_local.sh and cluster/add_local_worker.sh started (by their pid files),
# and nothing else: other Ray clusters and Ray processes on this machine keep running.
#
#   cluster/stop_local.sh              # worker nodes first, then the head
#   cluster/stop_local.sh --worker N   # only worker node N (a node leaving mid-run; the run carries on)
#   cluster/stop_local.sh --all        # `ray stop`: EVERY Ray process of this user on this machine
#
# Environment: L3RS_CLUSTER_DIR (where start_local.sh put the pid files).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/_common.sh
source "$here/_common.sh"

case "${1:-}" in
  "")
    found=0
    for pidfile in "$L3RS_CLUSTER_DIR"/worker-*.pid; do
      [ -e "$pidfile" ] || continue
      found=1
      l3rs_stop_pidfile "$pidfile" "$(basename "$pidfile" .pid) node"
    done
    if [ -e "$L3RS_CLUSTER_DIR/head.pid" ]; then
      found=1
      l3rs_stop_pidfile "$L3RS_CLUSTER_DIR/head.pid" "head node"
    fi
    rm -f "$L3RS_CLUSTER_DIR/env.sh"
    if [ "$found" = 0 ]; then
      echo "no local cluster started by cluster/start_local.sh (no pid files in $L3RS_CLUSTER_DIR)."
    else
      echo "local cluster stopped."
    fi
    ;;
  --worker)
    n="${2:-}"
    case "$n" in '' | *[!0-9]*) echo "usage: $0 --worker N" >&2; exit 2 ;; esac
    pidfile="$L3RS_CLUSTER_DIR/worker-$n.pid"
    [ -e "$pidfile" ] || l3rs_die "no worker node $n (no $pidfile)."
    l3rs_stop_pidfile "$pidfile" "worker-$n node"
    ;;
  --all)
    l3rs_require_ray
    "$RAY_BIN" stop
    rm -f "$L3RS_CLUSTER_DIR"/*.pid "$L3RS_CLUSTER_DIR/env.sh"
    ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    ;;
  *)
    echo "usage: $0 [--worker N | --all]" >&2
    exit 2
    ;;
esac
