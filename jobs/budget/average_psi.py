"""Writes the mean of several ψ artifacts of one config (NES runs that differ only in their seed) as a new artifact.

    python jobs/budget/average_psi.py DST SRC1 SRC2 [SRC ...]

Every NES run starts from the same ψ₀ and adds its own noise to the common search direction; the mean of n runs
keeps the common part and shrinks the run-to-run part by about √n, as one run with n times the population would, at
the same total cost. The artifacts must have the same optimizer config, ψ structure and meta-training task setup
(dataset, classes, θ0, K range); only the seed may differ. DST must not hold an artifact already.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from l3rs import storage
from l3rs.artifact import load_psi, save_artifact
from l3rs.names import display_uri

USAGE = "python jobs/budget/average_psi.py DST SRC1 SRC2 [SRC ...]"
# Metadata every source must share: what the ψs were meta-trained for (the seed and the results may differ).
_SAME = ("optimizer", "layer_paths", "model", "model_options", "model_head", "model_checkpoint", "dataset", "classes",
         "splits", "num_classes", "k_range", "train_scope", "generations", "nes")  # fmt: skip


def average_psi(dst: str, srcs: list[str]) -> dict:
    """Writes DST, the element-wise mean of the sources' ψ, and returns its metadata; ValueError (naming the
    field) for sources of different configs."""
    if len(srcs) < 2:
        raise ValueError("give at least two ψ artifacts to average")
    if storage.exists(storage.join(dst, "metadata.json")):
        raise ValueError(f"{dst}: an artifact is already there; choose another folder.")
    loaded = [load_psi(src) for src in srcs]
    first = loaded[0][2]
    for src, (_, _, meta) in zip(srcs[1:], loaded[1:], strict=True):
        for key in _SAME:
            if meta.get(key) != first.get(key):
                raise ValueError(f"{src}: its {key!r} differs from {srcs[0]}'s; only ψs of one config can be averaged")
    mean = jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), 0).astype(np.float32),
                        *[psi for psi, _, _ in loaded])  # fmt: skip
    config = loaded[0][1]
    runs = [str(meta.get("run_name", "run")) for _, _, meta in loaded]
    extra = {k: first[k] for k in _SAME if k in first and k not in ("optimizer", "layer_paths")}
    extra.update(
        run_name=f"mean of {len(srcs)}",
        seeds=[meta.get("seed") for _, _, meta in loaded],
        label=f"{config.label} (mean of {', '.join(runs)})",
        derived_from=[
            {"artifact": display_uri(src), "sha256": meta["sha256"]}
            for src, (_, _, meta) in zip(srcs, loaded, strict=True)
        ],
    )
    return save_artifact(dst, mean, config, extra)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        meta = average_psi(argv[0], argv[1:])
    except ValueError as e:
        print(f"average_psi: {e}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: {meta['label']} sha256 {meta['sha256'][:12]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
