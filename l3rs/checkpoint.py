"""Atomic, self-verifying checkpoints of the driver state under ``<run_dir>/checkpoints/``.

One file per saved generation, ``gen_000123.ckpt``: a msgpack map ``{"format", "generation", "sha256",
"body"}`` whose ``body`` is the state serialised with ``flax.serialization.msgpack_serialize`` and
``sha256`` its hex digest. Arrays are stored as raw bytes with dtype and shape and Python floats as IEEE
doubles, so everything round-trips bit-exactly (NaN payloads, −0.0 and subnormals included) — the product
promises that a resumed run ends with a bit-identical ψ.

Files are written atomically through :mod:`l3rs.storage` (local: temp file + fsync + rename; object stores:
one PUT). :func:`load_latest_checkpoint` walks the checkpoints newest first, verifies each and reports
(``logging.warning``, with the path and the reason) every corrupt or partial one it skips, so a crash while
writing, a truncated upload or a flipped bit costs at most the generations since the previous good
checkpoint.

    save_checkpoint(run_dir, state.generation, {"nes": nes.state_to_dict(state), "history": "[...]"})
    found = load_latest_checkpoint(run_dir)   # None, or (generation, state dict)

The second half reads θ0, the model checkpoint a run starts from (:func:`read_theta0`: an ``l3rs pretrain`` folder, a
flax msgpack file or an Orbax checkpoint) and checks it against the model's shapes (:func:`check_theta0`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import numpy as np

from l3rs import storage

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "CorruptCheckpointError",
    "checkpoint_uri",
    "list_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_json_atomic",
    "load_json",
    "THETA0_FORMATS",
    "theta0_format",
    "read_theta0",
    "check_theta0",
]

log = logging.getLogger("l3rs.checkpoint")

FORMAT = "l3rs-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^gen_(\d+)\.ckpt$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; the message names the file and the reason."""


def checkpoint_uri(run_dir: str, generation: int) -> str:
    return storage.join(run_dir, CHECKPOINT_DIR, f"gen_{generation:06d}.ckpt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(generation, uri)`` of every checkpoint file in the run, oldest first (not verified)."""
    directory = storage.join(run_dir, CHECKPOINT_DIR)
    found = []
    for name in storage.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), storage.join(directory, name)))
    return sorted(found)


def _check_tree(tree: Any, where: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}.")
            _check_tree(value, f"{where}.{key}")
    elif isinstance(tree, np.ndarray | np.generic):
        if tree.dtype.hasobject:
            raise ValueError(f"{where}: object arrays cannot be checkpointed.")
    elif not (tree is None or isinstance(tree, bool | int | float | str | bytes)):
        raise ValueError(
            f"{where}: unsupported type {type(tree).__name__}; use numpy arrays, int, float, str, bytes or dicts."
        )


def _writeable(tree: Any) -> Any:
    # msgpack_restore returns read-only views into the file buffer; hand out ordinary arrays.
    if isinstance(tree, dict):
        return {k: _writeable(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return tree.copy()
    return tree


def save_checkpoint(run_dir: str, generation: int, state: dict[str, Any], *, keep_last: int | None = 3) -> str:
    """Writes ``state`` as the checkpoint of ``generation`` atomically and applies retention; returns its URI.

    Args:
      run_dir: the run folder (local path or URI); files go to ``<run_dir>/checkpoints/``.
      generation: non-negative int; the file of an existing generation is replaced atomically.
      state: dict with string keys whose values are numpy arrays/scalars, int, float, str, bytes, bool,
        None or nested dicts of the same.
      keep_last: how many checkpoints (the newest, by generation) to keep, >= 1; ``None`` keeps every one (to read
        ψ at any checkpointed generation later, e.g. for early stopping). Checkpoints of generations
        *after* ``generation`` belong to an abandoned timeline (the run was resumed from an older
        checkpoint, e.g. because those were corrupt) and are deleted with a warning, so they can never be
        loaded in place of this one.
    """
    if isinstance(generation, bool) or not isinstance(generation, int | np.integer) or generation < 0:
        raise ValueError(f"generation: must be a non-negative integer, got {generation!r}.")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: must be an integer >= 1 or None (keep all), got {keep_last!r}.")
    if not isinstance(state, dict):
        raise ValueError(f"state: must be a dict, got {type(state).__name__}.")
    _check_tree(state, "state")
    from flax import serialization

    generation = int(generation)
    body = serialization.msgpack_serialize(state)
    blob = serialization.msgpack_serialize(
        {"format": FORMAT, "generation": generation, "sha256": hashlib.sha256(body).hexdigest(), "body": body}
    )
    uri = checkpoint_uri(run_dir, generation)
    storage.write_bytes_atomic(uri, blob)

    existing = list_checkpoints(run_dir)
    for gen, old in existing:
        if gen > generation:
            log.warning(
                "checkpoint: deleting %s: newer than the checkpoint just saved (generation %d)",
                old,
                generation,
            )
            storage.delete_file(old)
    if keep_last is not None:
        older = [(gen, u) for gen, u in existing if gen <= generation]
        for _, old in older[: max(0, len(older) - keep_last)]:
            storage.delete_file(old)
    return uri


def load_checkpoint(uri: str) -> tuple[int, dict[str, Any]]:
    """Reads and verifies one checkpoint file.

    Raises:
      CorruptCheckpointError: naming ``uri`` and the reason (unreadable, truncated, wrong format, checksum
        mismatch, generation differing from the file name).
    """
    from flax import serialization

    try:
        blob = storage.read_bytes(uri)
    except OSError as e:
        raise CorruptCheckpointError(f"{uri}: unreadable ({type(e).__name__}: {e})") from e
    try:
        outer = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated types on truncated or garbled input
        raise CorruptCheckpointError(f"{uri}: not a complete checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        fmt = outer.get("format") if isinstance(outer, dict) else type(outer).__name__
        raise CorruptCheckpointError(f"{uri}: unknown format {fmt!r}, expected {FORMAT!r}")
    body, digest, generation = outer.get("body"), outer.get("sha256"), outer.get("generation")
    if not isinstance(body, bytes) or not isinstance(digest, str) or not isinstance(generation, int):
        raise CorruptCheckpointError(f"{uri}: missing body, sha256 or generation")
    actual = hashlib.sha256(body).hexdigest()
    if actual != digest:
        raise CorruptCheckpointError(f"{uri}: sha256 mismatch (stored {digest}, content {actual})")
    match = _NAME.match(uri.rstrip("/").rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
    if match and int(match.group(1)) != generation:
        raise CorruptCheckpointError(f"{uri}: holds generation {generation}, not the one in its name")
    try:
        state = serialization.msgpack_restore(body)
    except Exception as e:
        raise CorruptCheckpointError(f"{uri}: body does not decode ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{uri}: body is a {type(state).__name__}, not a dict")
    return generation, _writeable(state)


def load_latest_checkpoint(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies, as ``(generation, state)``; ``None`` if the run has none.

    Corrupt or partial checkpoints are skipped, each reported with ``logging.warning`` naming the file and
    why.
    """
    for _, uri in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(uri)
        except CorruptCheckpointError as e:
            log.warning("checkpoint: skipping corrupt checkpoint %s", e)
    return None


def save_json_atomic(uri: str, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    storage.write_bytes_atomic(uri, (json.dumps(obj, indent=2) + "\n").encode())


def load_json(uri: str) -> Any:
    return json.loads(storage.read_bytes(uri))


# ----------------------------------------------------------------------------------------------------------------
# θ0: the model checkpoint a run fine-tunes from (``[model] checkpoint``), in any of three formats
# ----------------------------------------------------------------------------------------------------------------
THETA0_FORMATS = ("l3rs-pretrain", "flax-msgpack", "orbax")
"""What ``[model] checkpoint`` may hold: a folder written by ``l3rs pretrain`` (``meta.json`` + ``variables.msgpack``),
a flax msgpack file (``flax.serialization.msgpack_serialize`` of the params or of the variables), or an Orbax
checkpoint folder (a PyTree checkpoint, e.g. ``orbax.checkpoint.StandardCheckpointer().save(path, params)``)."""


def theta0_format(uri: str) -> str | None:
    """Which of :data:`THETA0_FORMATS` ``uri`` (local path or URI) holds; None if none."""
    from l3rs.meta.pretrain import META_FILE

    if storage.exists(storage.join(uri, META_FILE)):  # its variables file is checked when read
        return "l3rs-pretrain"
    if any(storage.exists(storage.join(uri, name)) for name in ("_METADATA", "_CHECKPOINT_METADATA")):
        return "orbax"
    if uri.rstrip("/").endswith(".msgpack") and storage.exists(uri):
        return "flax-msgpack"
    return None


def _orbax_path(uri: str) -> str:
    import os

    if storage.is_local(uri):
        return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return uri


def read_theta0(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """θ0 as flax variables (``{"params": ..., "batch_stats": ...}``, numpy arrays) and its metadata.

    A tree without a top-level ``params`` table is taken to be the params themselves. The metadata of an ``l3rs
    pretrain`` folder is its ``meta.json`` (the checksum is verified); other formats give ``{"format", "source"}``.

    Raises:
      ValueError: naming ``model.checkpoint``: nothing usable at ``uri``, or a file that does not decode.
    """
    fmt = theta0_format(uri)
    if fmt is None:
        raise ValueError(
            f"model.checkpoint: no θ0 at {uri!r}: expected a folder written by `l3rs pretrain`, a flax msgpack file "
            "(*.msgpack) or an Orbax checkpoint folder; make one with `l3rs pretrain --config ...` or set checkpoint "
            '= "random".'
        )
    if fmt == "l3rs-pretrain":
        from l3rs.meta.pretrain import load_variables

        tree, meta = load_variables(uri)
    else:
        try:
            if fmt == "flax-msgpack":
                from flax import serialization

                tree = serialization.msgpack_restore(storage.read_bytes(uri))
            else:
                import orbax.checkpoint as ocp

                tree = ocp.PyTreeCheckpointer().restore(_orbax_path(uri))
        except Exception as e:  # msgpack / orbax raise many unrelated types on bad input
            raise ValueError(f"model.checkpoint: {uri!r} is not a readable {fmt} checkpoint: "
                             f"{type(e).__name__}: {e}") from None  # fmt: skip
        meta = {"format": fmt, "source": uri}
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"model.checkpoint: {uri!r} holds a {type(tree).__name__}, not a tree of parameters.")
    variables = tree if isinstance(tree.get("params"), dict) else {"params": tree}
    import jax

    return jax.tree.map(np.asarray, variables), meta


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in flat}


def check_theta0(
    variables: Any, expected: Any, *, head: str = "head", uri: str = "", field: str = "model.checkpoint"
) -> None:
    """Checks θ0 against the model's variable shapes (e.g. ``jax.eval_shape`` of its init).

    The head may have another width (θ0 was pretrained on other classes; every task puts a fresh head there), but
    not another number of input features.

    Raises:
      ValueError: naming ``field`` and the first path (in sorted order) where the trees differ: a layer one has and
        the other lacks, or another shape.
    """
    got, want = _flat_shapes(variables), _flat_shapes(expected)
    head_prefix = "params/" + head.strip("/") + "/"
    where = f"{field}: {uri!r}" if uri else f"{field}:"
    for path in sorted(set(got) | set(want)):
        if path not in got:
            raise ValueError(f"{where} does not fit the model: it lacks {path} (shape {want[path]}).")
        if path not in want:
            raise ValueError(f"{where} does not fit the model: it has {path} {got[path]}, which the model lacks.")
        a, b = got[path], want[path]
        if path.startswith(head_prefix):
            a, b = a[:-1], b[:-1]  # the head's width is free
        if a != b:
            raise ValueError(
                f"{where} does not fit the model: {path} has shape {got[path]} in the checkpoint, {want[path]} in "
                "the model."
            )
