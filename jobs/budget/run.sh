#!/usr/bin/env bash
# Issue 11: does a longer NES budget close what the default misses out of its domain? The default config then (G1,
# before the pull toward ψ₀: "${G1[@]}") meta-trained for 300 generations instead of the demo's 100, NES seeds 0 and
# 1, with ψ taken at generations 100, 200 and 300 of each trajectory (jobs/budget/psi_at_generation.py). NES's σ and
# learning-rate schedule depends on the generation, not on the total, so generation 100 of seed 0 is docs/demo-g1's ψ
# and of seed 1 docs/generalization/seed1's.
# Measured on issue 11's 32-task protocol (evaluation seed 7, settings A-E, K up to 500) against the full Adam grid
# and the FC-LOpt / VeLO rows of docs/generalization (targets.py --rows-from).
#
#   make demo                                      # θ0s -> runs/demo (or: l3rs pretrain for both configs)
#   bash jobs/budget/run.sh                        # ~1.5 h on 2 cores; every stage resumes
#
# Each run is extended in stages (nes.generations may grow on resume): a stage's newest checkpoint is ψ at that
# budget. The evaluation starts from a copy of the stability measurement's journal if there is one
# (jobs/stability/exp_z_truncation.sh: ψ₀ and Adam 3e-2 on the same tasks), so only the new rows run.
# docs/budget/ holds what these wrote.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../generalization/_protocol.sh"  # L3RS PY S G CFG CK P G1 PROTOCOL
B=runs/budget
GRID=("${PROTOCOL[@]}" --set "evaluate.adam_lrs=[3e-2]")
PSIS=()
for seed in 0 1; do
  run=G1-long300$([[ $seed == 0 ]] || echo "-seed$seed")
  for gen in 100 200 300; do
    psi=$B/psi-$run-$gen
    if [[ ! -e $psi/metadata.json ]]; then
      "${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name "$run" --set run.seed=$seed --set nes.generations=$gen
      "${PY[@]}" jobs/budget/psi_at_generation.py "$P/$run/checkpoints/$(printf gen_%06d.ckpt $gen)" "$P/$run/psi" "$psi"
    fi
    [[ $gen == 100 ]] || PSIS+=(--psi "$psi")  # generation 100 is measured in docs/generalization already
  done
done
mkdir -p runs/eval32-budget
[[ ! -d runs/eval32-options/tasks ]] || cp -rn runs/eval32-options/tasks runs/eval32-budget/
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE "${PSIS[@]}" --out runs/eval32-budget
for run in G1-long300 G1-long300-seed1; do
  for gen in 200 300; do
    "${PY[@]}" jobs/generalization/targets.py $G/report.json $G/bd/report.json \
      --rows-from runs/eval32-budget/report.json --optimizer "L3RS ($run @ $gen)" --psi0 "L3RS ψ₀"
  done
done
