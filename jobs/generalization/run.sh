#!/usr/bin/env bash
# Issue 11's measurement on the embedded glyphs benchmark: 32 tasks per setting on fresh task seeds
# (evaluate.seed = 7; the demo and the stability ablation used 2024), K up to 5 x K_max = 500, Adam constant and
# cosine at 5 learning rates (best per K), every setting A-E. Rows: the default L3RS (G1: λ <= 10 Adam-equivalent
# steps, §4.1's absolute features) from `make demo` and from a second NES seed, and ψ₀; then FC-LOpt and VeLO (ft),
# meta-trained on glyphs with L3RS's budget, beside them in settings B and D. The earlier G1 run and the two G2 runs
# (the previous default) come from the earlier measurement (step 2). Step 5 measures the θ0-diversity mixture
# (jobs/configs/glyphs_narrow_mixture.toml) on the same tasks. docs/generalization/ holds what these wrote.
#
#   make demo                                  # θ0s -> runs/demo (19-26 min; or: l3rs pretrain for both configs)
#   bash jobs/generalization/run.sh
#
# Each evaluation resumes from its journal (<out>/tasks); the B/D one starts from a copy of the first one's, so it
# runs only the black-box rows.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_protocol.sh"
GRID=("${PROTOCOL[@]}" --set "evaluate.adam_lrs=[3e-2, 1e-2, 3e-3, 1e-3, 3e-4]")
# 1. Two runs of G1, the default of this measurement (before the pull toward ψ₀; `make demo` made the first one
#    then): NES seeds 0 and 1 (7-10 min each on 2 cores).
"${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name glyphs-default
"${L3RS[@]}" train --config $CFG "${CK[@]}" "${G1[@]}" --run-name glyphs-default-seed1 --set run.seed=1
# 2. Both default ψs against Adam, A-E: 32 x 5 tasks (about 1 h on 2 cores). The earlier G1 run and the two G2 runs
#    were measured on the same tasks by the previous measurement (docs/generalization/earlier; add
#    `--psi $G/earlier/psi-g1 --psi $G/psi-g2-run1 --psi $G/psi-g2-run2` to measure them here too).
PSIS=(--psi $P/glyphs-default/psi --psi $P/glyphs-default-seed1/psi)
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE "${PSIS[@]}" --out runs/eval32
# 3. B and D with the black-box learned optimizers -> docs/generalization/bd (meta-trained by `l3rs train --config
#    jobs/configs/baselines/glyphs_{fc_lopt,velo_ft}.toml "${CK[@]}"`, kept in $G/baselines): only their rows run.
mkdir -p runs/eval32-bd && cp -rn runs/eval32/tasks runs/eval32-bd/
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings BD "${PSIS[@]}" \
  --psi $G/baselines/psi-fc-lopt --psi $G/baselines/psi-velo-ft --out runs/eval32-bd
# 4. The targets of each L3RS row: every setting from the first report, B and D from the second (FC-LOpt, VeLO).
for opt in "L3RS (glyphs-default)" "L3RS (glyphs-default-seed1)"; do
  "${PY[@]}" jobs/generalization/targets.py runs/eval32/report.json runs/eval32-bd/report.json --optimizer "$opt"
done
# 5. θ0 diversity (docs/generalization/narrow): the glyph mixture of the default θ0 and a narrow one (5 pretrain
#    classes), meta-trained with NES seeds 0 and 1 and with weights 3:1, measured on the same journal (only their rows
#    run), then B and D beside FC-LOpt and VeLO (ft).
NCFG=jobs/configs/glyphs_narrow_mixture.toml
NCK=(--set run.storage=$S --set model.checkpoint=$S/pretrain-glyphs)
"${L3RS[@]}" pretrain --config $NCFG --set pretrain.output=runs/pretrain-glyphs-narrow
"${L3RS[@]}" train --config $NCFG "${NCK[@]}"
"${L3RS[@]}" train --config $NCFG "${NCK[@]}" --run-name glyphs-narrow-mixture-seed1 --set run.seed=1
W3='task.sources=[{name="glyphs", weight=3.0}, {name="glyphs-narrow", checkpoint="runs/pretrain-glyphs-narrow", weight=1.0}]'
"${L3RS[@]}" train --config $NCFG "${NCK[@]}" --run-name glyphs-narrow-mixture-w3 --set "$W3"
NPSIS=(--psi $P/glyphs-default/psi --psi $S/glyphs-narrow-mixture/psi --psi $S/glyphs-narrow-mixture-seed1/psi
       --psi $S/glyphs-narrow-mixture-w3/psi)
mkdir -p runs/eval32-narrow && cp -rn runs/eval32/tasks runs/eval32-narrow/
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings ABCDE "${NPSIS[@]}" --out runs/eval32-narrow
mkdir -p runs/eval32-narrow-bd && cp -rn runs/eval32-bd/tasks runs/eval32-narrow-bd/
"${L3RS[@]}" evaluate --config $CFG "${CK[@]}" "${GRID[@]}" --tasks 32 --settings BD "${NPSIS[@]}" \
  --psi $G/baselines/psi-fc-lopt --psi $G/baselines/psi-velo-ft --out runs/eval32-narrow-bd
for opt in "L3RS (glyphs-narrow-mixture)" "L3RS (glyphs-narrow-mixture-seed1)" "L3RS (glyphs-narrow-mixture-w3)"; do
  "${PY[@]}" jobs/generalization/targets.py runs/eval32-narrow/report.json runs/eval32-narrow-bd/report.json --optimizer "$opt"
done
