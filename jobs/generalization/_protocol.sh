# Issue 11's 32-task measurement, shared by the scripts that measure on it (sourced, not run; from the repository
# root): the commands ($L3RS, $PY: a command, arguments allowed, e.g. "env X=1 l3rs"), `make demo`'s θ0s under $S,
# the default config, and the protocol: evaluation seed 7, K up to 5 x K_max = 500, no head-only baselines. Each
# script adds its Adam learning rates to PROTOCOL: run.sh the full grid; the scripts that add rows only 3e-2, and
# read their rows against run.sh's report (targets.py --rows-from).
read -ra L3RS <<< "${L3RS:-l3rs}"
read -ra PY <<< "${PY:-python}"
S=${S:-runs/demo}
G=docs/generalization
CFG=jobs/configs/glyphs_default.toml
CK=(--set run.storage=$S --set model.checkpoint=$S/pretrain-glyphs --set evaluate.other_checkpoint=$S/pretrain-fmnist)
PROTOCOL=(--set "evaluate.k_grid=[10, 25, 50, 100, 500]" --set evaluate.head_only_baselines=false --set evaluate.seed=7)
