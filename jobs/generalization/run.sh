#!/usr/bin/env bash
# Issue 11's measurement on the embedded glyphs benchmark: 32 tasks per setting on fresh task seeds
# (evaluate.seed = 7; the demo and the stability ablation used 2024), K up to 5 x K_max = 500, Adam constant and
# cosine at 5 learning rates (best per K), every setting A-E; then FC-LOpt and VeLO (ft), meta-trained on glyphs with
# L3RS's budget, beside L3RS in settings B and D; then G1 (the bound alone). docs/generalization/ holds what these
# commands wrote.
#
#   make demo                                  # θ0s and this machine's ψ -> runs/demo (18.7 min on 2 idle cores)
#   bash jobs/generalization/run.sh [PREVIOUS_PSI]
#
# PREVIOUS_PSI (optional): another ψ of the same config to evaluate beside it (docs/generalization/psi-previous-demo,
# the previous docs/demo ψ). Each evaluation resumes from its journal (<out>/tasks) and the later ones start from a
# copy of the first one's, so they run only their new rows: the 2nd ψ took 4 min here, against 42 for the first.
set -euo pipefail
L3RS=${L3RS:-l3rs}
S=runs/demo
CK=(--set run.storage=$S --set model.checkpoint=$S/pretrain-glyphs --set evaluate.other_checkpoint=$S/pretrain-fmnist)
GRID=(--set "evaluate.k_grid=[10, 25, 50, 100, 500]" --set evaluate.head_only_baselines=false
      --set "evaluate.adam_lrs=[3e-2, 1e-2, 3e-3, 1e-3, 3e-4]" --set evaluate.seed=7)
CFG=jobs/configs/glyphs_default.toml
PSIS=(--psi $S/glyphs-default/psi)
if [[ $# -ge 1 ]]; then
  mkdir -p $S/previous-demo && cp -rn "$1" $S/previous-demo/psi
  PSIS+=(--psi $S/previous-demo/psi)
fi
# 1. L3RS (this machine's demo ψ) against Adam, A-E: 32 x 5 tasks, 42 min on 2 cores.
"$L3RS" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE --psi $S/glyphs-default/psi \
  --out runs/eval32
# 2. + the previous ψ: only its rows run.
mkdir -p runs/eval32-both && cp -rn runs/eval32/tasks runs/eval32-both/
"$L3RS" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE "${PSIS[@]}" --out runs/eval32-both
# 3. The learned baselines, meta-trained on glyphs with L3RS's budget (the demo's θ0).
"$L3RS" train --config jobs/configs/baselines/glyphs_fc_lopt.toml "${CK[@]}"
"$L3RS" train --config jobs/configs/baselines/glyphs_velo_ft.toml "${CK[@]}"
# 4. B and D with every learned optimizer: only FC-LOpt's and VeLO's rows run.
mkdir -p runs/eval32-bd && cp -rn runs/eval32-both/tasks runs/eval32-bd/
"$L3RS" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings BD "${PSIS[@]}" \
  --psi $S/glyphs-fc-lopt/psi --psi $S/glyphs-velo-ft/psi --out runs/eval32-bd
# 5. G1, the bound alone (the first release's absolute features, λ <= 10 Adam steps), same budget: only its rows run.
"$L3RS" train --config $CFG "${CK[@]}" --run-name G1-bound10 \
  --set optimizer.feature_scale=absolute --set optimizer.lambda_max_adam_ratio=10
mkdir -p runs/eval32-g1 && cp -rn runs/eval32-both/tasks runs/eval32-g1/
"$L3RS" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE "${PSIS[@]}" \
  --psi $S/G1-bound10/psi --out runs/eval32-g1
# 6. The targets.
python jobs/generalization/targets.py runs/eval32-both/report.json --optimizer L3RS
python jobs/generalization/targets.py runs/eval32-g1/report.json --optimizer "L3RS (G1-bound10)"
