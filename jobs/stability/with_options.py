"""Writes a copy of a ψ artifact whose L3RS config has use-time options changed (``l3rs.artifact.USE_TIME_OPTIONS``:
``absolute_time_k_max``, ``past_horizon``, ``lambda_max_adam_ratio``), so that ``l3rs evaluate --psi`` can compare a
trained ψ with and without them. ψ itself is copied unchanged; the metadata says what was derived from what.

    python jobs/stability/with_options.py SRC DST absolute_time_k_max=100 [KEY=VALUE ...]

In a program, pass the same options to ``l3rs.load(uri, total_steps, options={...})`` instead.
"""

from __future__ import annotations

import os
import sys

from l3rs import storage
from l3rs.artifact import COMPUTED_FIELDS, load_psi, save_artifact, with_options
from l3rs.cli import toml_value
from l3rs.names import display_uri


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        return 2
    src, dst, pairs = argv[0], argv[1], argv[2:]
    options = {key: toml_value(raw) for key, raw in (pair.split("=", 1) for pair in pairs)}
    if storage.exists(storage.join(dst, "metadata.json")):
        print(f"{dst}: an artifact is already there; choose another folder.", file=sys.stderr)
        return 2
    psi, config, meta = load_psi(src)
    derived = with_options(config, options)
    run = meta.get("run_name") or os.path.basename(os.path.dirname(os.path.normpath(src)))
    extra = {k: v for k, v in meta.items() if k not in COMPUTED_FIELDS}
    label = f"{derived.label} ({run}, " + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    extra.update(label=label, derived_from={"artifact": display_uri(src), "sha256": meta["sha256"], "options": options})
    save_artifact(dst, psi, derived, extra)
    print(f"{dst}: {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
