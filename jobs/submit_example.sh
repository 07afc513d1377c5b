#!/usr/bin/env bash
# End to end on a Ray cluster: submit a meta-training run, follow it, fetch the trained ψ.
#
#   cluster/start_local.sh && source "${TMPDIR:-/tmp}/l3rs-local-cluster-$(id -u)/env.sh"   # or a cloud cluster
#   jobs/submit_example.sh [CONFIG]          # default: jobs/configs/fmnist_default.toml
#
# Environment: L3RS_DASHBOARD [http://127.0.0.1:8265] the cluster's dashboard / Jobs API address;
#              L3RS_PSI_DIR [psi-<run name>] where the fetched artifact goes.
# Run from the repository root: `l3rs submit` uploads the current directory as the job's working_dir.
set -euo pipefail

config="${1:-jobs/configs/fmnist_default.toml}"
address="${L3RS_DASHBOARD:-http://127.0.0.1:8265}"
if [ ! -f "$config" ]; then
  echo "error: no config $config (run from the repository root)" >&2
  exit 2
fi
if [ -z "${RAY_AUTH_MODE:-}" ] && [ -s "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE=token  # Ray clients only send the token when this is set
fi

# 1. θ0 must exist before training (skip if model.checkpoint = "random" or it was made already):
#      l3rs pretrain --config "$config"
# 2. Submit. Prints the job id and the dashboard URL of the job; the run itself is named by run.name in the config,
#    and submitting the same config again resumes that run from its last checkpoint.
out="$(l3rs submit --address "$address" --config "$config")"
echo "$out"
job="$(printf '%s\n' "$out" | sed -n 's/^job: *//p' | head -n 1)"
if [ -z "$job" ]; then
  echo "error: could not read the job id from the output of l3rs submit" >&2
  exit 1
fi

# 3. Follow the driver's log until the job ends (Ctrl-C stops following, not the job; `l3rs stop $job` stops it).
#    Meanwhile: the dashboard's Jobs page (logs), Actors page (one L3RS worker per GPU/CPU slot), Metrics (l3rs_*).
l3rs logs "$job" --address "$address" --follow || true
l3rs status "$job" --address "$address"

# 4. Fetch the ψ artifact (checksum verified) and use it: tx = l3rs.load(DIR, total_steps=K, params=params).
run="$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$config" | head -n 1)"
l3rs fetch "$job" --address "$address" --to "${L3RS_PSI_DIR:-psi-${run:-run}}"
