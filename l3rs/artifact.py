"""The trained-ψ artifact: ``psi.msgpack`` (flax serialization of the meta-parameters) + ``metadata.json``.

ψ is what NES meta-trained: L3RS's ψ, or the meta-parameters of another learned-optimizer family (FC-LOpt, VeLO);
``metadata["optimizer"]["family"]`` says which. The metadata carries everything needed to use ψ correctly: the family
config, the layer paths L3RS's embeddings belong to, model, dataset, K range, generations, fitness, a sha256 of
``psi.msgpack`` and library versions. Loading verifies the checksum; using an L3RS ψ on a model whose layers do not
match is a clear error.

    tx = l3rs.load("runs/fmnist-default/psi", total_steps=500, params=params)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import optax
from flax import serialization

from l3rs import storage
from l3rs.optim import Direction, family_from_dict, layer_paths

__all__ = [
    "USE_TIME_OPTIONS",
    "with_options",
    "FORMAT",
    "ARTIFACT_FILES",
    "ArtifactExistsError",
    "copy_artifact",
    "save_artifact",
    "COMPUTED_FIELDS",
    "load_psi",
    "load",
    "verify_artifact",
]

FORMAT = "l3rs-psi/1"
PSI_FILE = "psi.msgpack"
META_FILE = "metadata.json"
ARTIFACT_FILES = (PSI_FILE, META_FILE)  # everything an artifact folder holds
# The metadata fields save_artifact computes itself; a derived artifact passes the others through as ``meta``.
COMPUTED_FIELDS = ("format", "optimizer", "layer_paths", "psi_size", "sha256", "created", "versions")


class ArtifactExistsError(FileExistsError):
    """The destination of :func:`copy_artifact` holds other files and ``force`` was not given."""


def save_artifact(uri: str, psi: Any, config: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes the artifact folder atomically file by file; ``metadata.json`` (with the checksum) goes last."""
    import flax

    from l3rs._version import __version__

    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, serialization.to_state_dict(psi)))
    full_meta = {
        "format": FORMAT,
        "optimizer": config.to_dict(),
        "layer_paths": list(getattr(psi, "layer_paths", ())),
        "psi_size": int(sum(np.size(x) for x in jax.tree.leaves(psi))),
        **meta,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "l3rs": __version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
        },
    }
    storage.makedirs(uri)
    storage.write_bytes_atomic(storage.join(uri, PSI_FILE), blob)
    storage.write_bytes_atomic(storage.join(uri, META_FILE), json.dumps(full_meta, indent=2).encode())
    return full_meta


def verify_artifact(uri: str) -> dict[str, Any]:
    """Checks that ``uri`` holds a complete artifact whose checksum matches; returns its metadata."""
    meta_uri, psi_uri = storage.join(uri, META_FILE), storage.join(uri, PSI_FILE)
    if not storage.exists(meta_uri) or not storage.exists(psi_uri):
        raise ValueError(f"artifact: {uri!r} has no {META_FILE} and {PSI_FILE}; is it a ψ artifact folder?")
    meta = json.loads(storage.read_bytes(meta_uri))
    if meta.get("format") != FORMAT:
        raise ValueError(f"artifact: {uri!r} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    if hashlib.sha256(storage.read_bytes(psi_uri)).hexdigest() != meta.get("sha256"):
        raise ValueError(f"artifact: {uri!r} is corrupt: the sha256 of {PSI_FILE} does not match its metadata.")
    return meta


def load_psi(uri: str, *, directions: tuple[str | Direction, ...] | None = None) -> tuple[Any, Any, dict]:
    """Reads and verifies an artifact; returns (ψ, its family config such as :class:`l3rs.L3RSConfig`, metadata).

    ``directions`` supplies the :class:`l3rs.Direction` objects for custom (non built-in) directions, which the
    metadata records by name only.
    """
    meta = verify_artifact(uri)
    opt = dict(meta["optimizer"])
    if directions is not None and "directions" in opt:
        names = [d if isinstance(d, str) else d.name for d in directions]
        if names != list(opt["directions"]):
            raise ValueError(f"directions: {names} do not match the artifact's {opt['directions']}.")
        opt["directions"] = tuple(directions)
    try:
        config = family_from_dict(opt, recorded=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"artifact: {uri!r} has an optimizer config this version cannot read: {e}") from None
    template = config.template(tuple(meta.get("layer_paths", ())))
    state = serialization.msgpack_restore(storage.read_bytes(storage.join(uri, PSI_FILE)))
    psi = serialization.from_state_dict(template, state)
    psi = jax.tree.map(lambda x: np.asarray(x, np.float32), psi)
    return psi, config, meta


def load(
    uri: str,
    total_steps: int,
    params: Any = None,
    *,
    directions: tuple[str | Direction, ...] | None = None,
    options: dict[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A ready optimizer from a trained artifact (L3RS, or whichever learned-optimizer family it holds).

    Args:
      uri: the artifact folder (``<storage>/<run>/psi`` or what ``l3rs fetch`` wrote).
      total_steps: K, your planned number of steps, an integer >= 1 (0, negatives and non-integers raise
        ValueError); the artifact's ``k_range`` says what it was meta-trained on.
      params: optional; if given, refuse now (not at the first update) a model whose layers ψ does not know.
      options: L3RS options that change how a trained ψ is used, not what it is (:data:`USE_TIME_OPTIONS`), e.g.
        ``{"absolute_time_k_max": 100}`` for a run longer than any meta-training task; other keys raise ValueError.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int | np.integer) or total_steps < 1:
        raise ValueError(
            f"l3rs.load: total_steps must be a positive integer (K, the number of steps you plan to take), "
            f"got {total_steps!r}."
        )
    psi, config, meta = load_psi(uri, directions=directions)
    if options:
        config = with_options(config, options)
    if params is not None and getattr(psi, "layer_paths", None) is not None:
        known = set(psi.layer_paths)
        missing = [p for p in layer_paths(params) if p not in known]
        if missing:
            raise ValueError(
                f"l3rs.load: this model's layers do not match the artifact at {uri!r} (meta-trained for "
                f"{meta.get('model')!r}): unknown layers {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                f"The artifact knows {len(known)} layers such as {list(psi.layer_paths[:3])}."
            )
    return config.build(psi, total_steps)


# Options of an L3RS config that a trained ψ can be used with whatever it was meta-trained with (issue 11's stability
# options): they change the features or the step it produces, not the meta-parameters' structure.
USE_TIME_OPTIONS = ("absolute_time_k_max", "past_horizon", "lambda_max_adam_ratio")


def with_options(config: Any, options: dict[str, Any]) -> Any:
    """``config`` with :data:`USE_TIME_OPTIONS` replaced (validated as the config validates them)."""
    import dataclasses

    bad = sorted(set(options) - set(USE_TIME_OPTIONS))
    if bad or config.family != "l3rs":
        raise ValueError(
            f"options: {bad or sorted(options)} cannot be changed on a trained {config.family} ψ; "
            f"L3RS allows {list(USE_TIME_OPTIONS)}."
        )
    return dataclasses.replace(config, **options)


def copy_artifact(src: str, dst: str, *, force: bool = False) -> dict[str, Any]:
    """Copies the verified artifact at ``src`` to the folder ``dst``; returns its metadata.

    Never overwrites a user's files:

    - ``dst`` missing or empty: the artifact is written into a temporary sibling folder, verified there, and renamed
      to ``dst`` in one step (local paths), so ``dst`` either does not exist or holds the whole verified artifact.
    - ``dst`` holds anything else: :class:`ArtifactExistsError`, and nothing is written; with ``force=True`` only
      the artifact's own files (:data:`ARTIFACT_FILES`) are replaced, each atomically (``metadata.json`` last, after
      the new ``psi.msgpack`` verified against it in the temporary folder); other files in ``dst`` are left alone.

    Object-store destinations get the same refusal; their files are written one PUT each.
    """
    import shutil
    import tempfile

    verify_artifact(src)
    existing = storage.listdir(dst)
    if existing and not force:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise ArtifactExistsError(
            f"{dst!r} is not empty (it holds {shown}); choose a new or empty folder, or pass --force to replace "
            f"only the artifact's files ({', '.join(ARTIFACT_FILES)}) there."
        )
    if not storage.is_local(dst):
        for name in ARTIFACT_FILES:
            storage.write_bytes_atomic(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
        return verify_artifact(dst)
    path = os.path.abspath(os.path.expanduser(dst[len("file://") :] if dst.startswith("file://") else dst))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArtifactExistsError(f"{dst!r} is a file, not a folder; choose another destination.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.fetch-", dir=parent)
    try:
        for name in ARTIFACT_FILES:
            storage.write_bytes_atomic(os.path.join(tmp, name), storage.read_bytes(storage.join(src, name)))
        meta = verify_artifact(tmp)
        os.chmod(tmp, 0o755)
        if not existing:
            os.replace(tmp, path)  # POSIX: atomically replaces a missing or empty folder
        else:
            for name in ARTIFACT_FILES:  # metadata.json last: its checksum describes the new psi.msgpack
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return meta
