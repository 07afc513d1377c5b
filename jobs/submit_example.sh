#!/usr/bin/env bash
# End to end on a Ray cluster: submit a meta-training run, follow it, fetch the trained ψ.
#
#   cluster/start_local.sh                           # or a cloud / KubeRay cluster (cluster/README.md)
#   l3rs pretrain --config jobs/configs/fmnist_default.toml     # θ0, once (skip if model.checkpoint = "random")
#   jobs/submit_example.sh [CONFIG] [-- L3RS_SUBMIT_ARGS...]   # default: jobs/configs/fmnist_default.toml
#
# e.g. jobs/submit_example.sh jobs/configs/ablations/ema_00.toml -- --set nes.generations=50
#
# Environment: L3RS_DASHBOARD [http://127.0.0.1:8265] the cluster's dashboard / Jobs API address;
#              L3RS_PSI_DIR [psi-<run name>] where the fetched artifact goes.
# Run it from the repository root: `l3rs submit` uploads the current directory as the job's working_dir.
set -euo pipefail

config="jobs/configs/fmnist_default.toml"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then config="$1"; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
address="${L3RS_DASHBOARD:-http://127.0.0.1:8265}"
if [ ! -f "$config" ]; then
  echo "error: no config $config (run from the repository root)" >&2
  exit 2
fi
# Ray's HTTP clients send the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) only with this set.
if [ -z "${RAY_AUTH_MODE:-}" ] &&
  { [ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] || [ -s "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi

# 1. Submit. Prints the job id and the job's dashboard URL. The run is named by run.name in the config; submitting
#    the same config again resumes that run from its last checkpoint.
out="$(l3rs submit --address "$address" --config "$config" "$@")"
echo "$out"
job="$(printf '%s\n' "$out" | sed -n 's/^job: *//p' | head -n 1)"
if [ -z "$job" ]; then
  echo "error: could not read the job id from the output of l3rs submit" >&2
  exit 1
fi

# 2. Follow the driver's log until the job ends (Ctrl-C stops following, not the job; `l3rs stop JOB` stops it).
#    Meanwhile, in the dashboard: Jobs (this log), Actors (one MetaWorker per GPU/CPU slot), Metrics (ray_l3rs_*).
l3rs logs "$job" --address "$address" --follow || true
status="$(l3rs status "$job" --address "$address")"
echo "$status"
case "$status" in
  *SUCCEEDED*) ;;
  *) echo "the job did not succeed (see above); nothing to fetch." >&2; exit 1 ;;
esac

# 3. Fetch the ψ artifact (checksum verified), then use it: tx = l3rs.load(DIR, total_steps=K, params=params).
run="$(printf '%s\n' "$status" | sed -n 's/.*"l3rs_run": "\([^"]*\)".*/\1/p')"  # the run name, from the job's metadata
l3rs fetch "$job" --address "$address" --to "${L3RS_PSI_DIR:-psi-$run}"
