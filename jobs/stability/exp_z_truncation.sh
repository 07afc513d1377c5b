#!/usr/bin/env bash
# Issue 11, part 3: the two stability options the first ablation (ablation.sh) left out, each meta-trained on top of
# the default of the time, G1 (λ ≤ 10 Adam-equivalent steps, §4.1's absolute features, no pull toward ψ₀) with the
# demo's budget, and measured on issue 11's 32-task protocol (evaluation seed 7, settings A-E, K up to 500) against
# the committed measurement's full Adam grid (docs/generalization/report.json):
#
#   G3  λ = exp(z), the paper's literal step size (`optimizer.lambda_skip = false`; the default adds log‖d_adam‖ so
#       that ψ₀ = Adam(init_lr) exactly)
#   G4  meta-training tasks cut short of the K the optimizer is told half of the time (`task.truncation_prob = 0.5`),
#       NES seeds 0 and 1
#
#   make demo                                      # θ0s -> runs/demo (or: l3rs pretrain for both configs below)
#   bash jobs/stability/exp_z_truncation.sh        # ~1 h on 2 cores; each stage resumes
#
# The evaluation runs only the new rows, ψ₀ and one Adam learning rate (3e-2, both schedules): ψ₀ is G4's family's
# (= G1's), so ψ₀ and the two Adam rows are also in docs/generalization/report.json, and targets.py --rows-from
# refuses the merge unless they agree there to the last digit (same θ0 bytes, tasks and data). docs/stability.md has
# the table these commands produced; docs/stability_ablation/options32/ holds what they wrote.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../generalization/_protocol.sh"  # L3RS PY S G CFG CK P G1 PROTOCOL
GRID=("${PROTOCOL[@]}" --set "evaluate.adam_lrs=[3e-2]")
"${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name G4-truncation --set task.truncation_prob=0.5
"${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name G3-exp-z --set optimizer.lambda_skip=false
"${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name G4-truncation-seed1 --set task.truncation_prob=0.5 --set run.seed=1
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE \
  --psi $P/G4-truncation/psi --psi $P/G3-exp-z/psi --psi $P/G4-truncation-seed1/psi --out runs/eval32-options
for opt in "L3RS (G4-truncation)" "L3RS (G4-truncation-seed1)" "L3RS (G3-exp-z)"; do
  "${PY[@]}" jobs/generalization/targets.py $G/report.json $G/bd/report.json --rows-from runs/eval32-options/report.json \
    --optimizer "$opt" --psi0 "L3RS ψ₀"
done
