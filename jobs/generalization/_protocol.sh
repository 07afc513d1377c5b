# Issue 11's 32-task measurement, shared by the scripts that measure on it (sourced, not run; from the repository
# root): the commands ($L3RS, $PY: a command, arguments allowed, e.g. "env X=1 l3rs"), `make demo`'s θ0s under $S,
# the default config, the previous default, and the protocol: evaluation seed 7, K up to 5 x K_max = 500, no
# head-only baselines. Each script adds its Adam learning rates to PROTOCOL: run.sh the full grid; the scripts that
# add rows only 3e-2, and read their rows against run.sh's report (targets.py --rows-from).
# jobs/stability/ablation.sh (16 tasks, its own protocol) takes only the commands, the config and NOPULL.
read -ra L3RS <<< "${L3RS:-l3rs}"
read -ra PY <<< "${PY:-python}"
S=${S:-runs/demo}
G=docs/generalization
CFG=jobs/configs/glyphs_default.toml
CK=(--set run.storage=$S --set model.checkpoint=$S/pretrain-glyphs --set evaluate.other_checkpoint=$S/pretrain-fmnist)
# G1, the default before the pull toward ψ₀ (nes.weight_decay_toward = "psi0", docs/anchor): the rows called
# "default" in docs/generalization, docs/budget and docs/stability_ablation/options32, "previous default" in
# docs/anchor and docs/demo-g1's ψ. `make demo` meta-trains today's default into $S/glyphs-default; the scripts that
# measure G1 meta-train it under the same run names (so their report rows keep their names) into $P.
P=${P:-runs/g1}
NOPULL=(--set nes.weight_decay=0 --set nes.weight_decay_toward=zero)  # NES without the pull: G1's meta-training
G1=(--set run.storage=$P "${NOPULL[@]}")
PROTOCOL=(--set "evaluate.k_grid=[10, 25, 50, 100, 500]" --set evaluate.head_only_baselines=false --set evaluate.seed=7)
