"""Writes the ψ artifact of an earlier generation of a run, from one of its checkpoints: NES's mean after that
generation, in the structure and with the metadata of the run's own artifact. With it, one long meta-training run
gives ψ at several budgets along one trajectory (``l3rs evaluate --psi`` then compares them).

    python jobs/budget/psi_at_generation.py RUN_DIR/checkpoints/gen_000200.ckpt RUN_DIR/psi DST

A run keeps its newest ``run.keep_checkpoints`` checkpoints (3 by default): set it to 0 to keep every one, or extend a
run in stages (``nes.generations`` may grow on resume). Checked: the checkpoint holds a ψ of the artifact's size, at or
before the artifact's generation, of the artifact's run (its ``run_name``; checkpoints written before they recorded
one are not checked for it); DST must not hold an artifact already. The new artifact's ``derived_from`` records both,
named relative to the checkpoint's run folder.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from l3rs import storage
from l3rs.artifact import COMPUTED_FIELDS, load_psi, save_artifact
from l3rs.checkpoint import CorruptCheckpointError, load_checkpoint
from l3rs.meta import nes
from l3rs.names import display_uri
from l3rs.optim import meta_to_vector, vector_to_meta

USAGE = "python jobs/budget/psi_at_generation.py RUN_DIR/checkpoints/gen_000200.ckpt RUN_DIR/psi DST"


def psi_at_generation(ckpt: str, src: str, dst: str) -> dict:
    """Writes DST and returns its metadata; ValueError naming the input for an unreadable checkpoint, one of another
    ψ size or past the artifact's generation, or a DST that holds an artifact."""
    if storage.exists(storage.join(dst, "metadata.json")):
        raise ValueError(f"{dst}: an artifact is already there; choose another folder.")
    try:
        generation, payload = load_checkpoint(ckpt)
    except CorruptCheckpointError as e:
        raise ValueError(str(e)) from None
    state = nes.state_from_dict(payload["nes"])
    history = json.loads(payload.get("history", "[]"))
    template, config, meta = load_psi(src)
    size = int(np.size(meta_to_vector(template)))
    if np.size(state.mean) != size:
        raise ValueError(f"{ckpt}: its NES mean has {np.size(state.mean)} numbers, the artifact's ψ {size}")
    if generation > int(meta.get("generations", generation)):
        raise ValueError(f"{ckpt}: generation {generation} is past the artifact's {meta.get('generations')}")
    run = meta.get("run_name", "run")
    if payload.get("run_name") not in (None, meta.get("run_name")):
        raise ValueError(f"{ckpt}: a checkpoint of run {payload['run_name']!r}, the artifact is of run {run!r}")
    # <run>/checkpoints/gen_*.ckpt, local or a bucket URI
    run_dir = ckpt.rsplit("/", 2)[0] if "://" in ckpt else os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    last = [h for h in history if h["generation"] < generation][-1:] or [{}]
    extra = {k: v for k, v in meta.items() if k not in COMPUTED_FIELDS}
    extra.update(
        generations=generation,
        fitness_mean=last[0].get("fitness_mean"),
        accuracy_mean=last[0].get("accuracy_mean"),
        label=f"{config.label} ({run} @ {generation})",
        # named relative to the run (l3rs.names), never by this machine's absolute paths
        derived_from={
            "artifact": display_uri(src, root=run_dir),
            "sha256": meta["sha256"],
            "checkpoint": display_uri(ckpt, root=run_dir),
        },
    )
    psi = vector_to_meta(np.asarray(state.mean, np.float32), template)
    return save_artifact(dst, psi, config, extra)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        meta = psi_at_generation(*argv)
    except ValueError as e:
        print(f"psi_at_generation: {e}", file=sys.stderr)
        return 2
    print(f"{argv[2]}: {meta['label']} sha256 {meta['sha256'][:12]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
