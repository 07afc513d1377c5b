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
from typing import Any

import jax
import numpy as np
import optax
from flax import serialization

from l3rs import storage
from l3rs.optim import Direction, family_from_dict, layer_paths

__all__ = ["FORMAT", "save_artifact", "load_psi", "load", "verify_artifact"]

FORMAT = "l3rs-psi/1"
PSI_FILE = "psi.msgpack"
META_FILE = "metadata.json"


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
        config = family_from_dict(opt)
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
) -> optax.GradientTransformationExtraArgs:
    """A ready optimizer from a trained artifact (L3RS, or whichever learned-optimizer family it holds).

    Args:
      uri: the artifact folder (``<storage>/<run>/psi`` or what ``l3rs fetch`` wrote).
      total_steps: K, your planned number of steps (the artifact's ``k_range`` says what it was meta-trained on).
      params: optional; if given, refuse now (not at the first update) a model whose layers ψ does not know.
    """
    psi, config, meta = load_psi(uri, directions=directions)
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
