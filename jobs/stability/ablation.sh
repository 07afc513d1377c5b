#!/usr/bin/env bash
# Issue 11, part 3: the stability ablation on the glyphs benchmark. Every run is the glyphs config with the demo's
# meta-training budget (100 generations, population 16, meta-batch 2, K ~ U[10, 100], seed 0) and one set of
# stability options; docs/stability.md has the table these runs and their evaluation produced.
#
#   bash jobs/stability/ablation.sh [STORAGE]        # default storage: runs/stability
#
# θ0: runs/pretrain-glyphs (`l3rs pretrain --config jobs/configs/glyphs_default.toml`). Each run resumes if stopped.
set -euo pipefail
STORAGE=${1:-runs/stability}
L3RS=${L3RS:-l3rs}
CFG=jobs/configs/glyphs_default.toml
run() {
  local name=$1; shift
  echo "=== $name: $*"
  "$L3RS" train --config "$CFG" --set run.storage="$STORAGE" --set nes.generations=100 --run-name "$name" "$@"
}
run G0-absolute                                                       # §4.1 as written: no bound
run G1-bound10        --set optimizer.lambda_max_adam_ratio=10         # λ ≤ 10 Adam-equivalent steps
run G2-bound10-logrel --set optimizer.lambda_max_adam_ratio=10 --set optimizer.feature_scale=log_relative
run G3-exp-z          --set optimizer.lambda_max_adam_ratio=10 --set optimizer.feature_scale=log_relative \
                      --set optimizer.lambda_skip=false                 # the paper's literal λ = exp(z)
