"""VeLO meta-parameters in learned_optimization's ``hyper_v2`` checkpoint format (the published VeLO weights).

The format, as learned_optimization writes and reads it (``checkpoints.save_state`` / ``load_state``,
``learned_optimizers/opt_from_checkpoint.py``, ``research/general_lopt/pretrained_optimizers.py``): one file holding
``flax.serialization.to_bytes(value)``, i.e. msgpack of flax's state dict of ``value``, arrays as flax's msgpack
ndarray extension. ``value`` is

- ``ParameterCheckpoint(params=theta, gen_id=str, step=int)`` (a flax struct dataclass) for checkpoints of
  ``outer_train`` runs, loaded by ``opt_from_checkpoint`` with a ``config.gin`` next to it — the published VeLO
  (``prefab.py``'s default, ``aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620/params``) is one of
  these: state dict ``{"params": theta, "gen_id": ..., "step": ...}``;
- ``(theta, "", 0)`` for the older "no_config" ``*.checkpoint`` files: state dict ``{"0": theta, "1": ..., "2": ...}``.

``theta`` is HyperV2's Haiku meta-parameter dict, laid out as :func:`l3rs.optim.velo.velo_param_shapes` (our
meta-parameters use the same layout); its ``lstm_init_state`` is Haiku's ``LSTMState`` namedtuple, which flax
writes as ``{"hidden", "cell"}`` (or, before early 2022, as ``{"name", "fields", "values"}``; both are read).

:func:`save_hyper_v2` writes the ``ParameterCheckpoint`` form. Our additions ride in it without changing its layout:
with ``adam_skip`` the Adam learning rate is one more entry ``params["adam_skip"]["log_lr"]``, and ``gen_id`` holds
``"l3rs-velo:" + json(config)`` so :func:`load_hyper_v2` restores the exact config (decays and output scales are
not in the weights). For any other file the config is inferred from the shapes: sizes from the arrays, decays and
``exp_mult``/``step_mult`` at hyper_v2's defaults (which the published VeLO uses), no Adam skip.

What has and has not been verified (we cannot download the published file here):

- verified by tests: our own files round-trip exactly; files written the way learned_optimization writes them —
  ``flax.serialization.to_bytes`` of a flax struct ``ParameterCheckpoint`` or of a ``(theta, "", 0)`` tuple, with
  ``lstm_init_state`` a real ``NamedTuple`` (hidden, cell) — load, in both namedtuple encodings; a published-size
  file (LSTM 512, 256 basis MLPs: 2,320,385 numbers) loads and steps; wrong or missing keys are named.
- taken from reading the source, not checked against the real file: the key names (Haiku's default module names
  ``linear``, ``linear_1``, ``linear_2``, ``rnn/linear`` (the LSTM's gate matrix), ``rnn_to_controls``,
  ``step_size``, and ``~`` for parameters created outside a module), the 30 LSTM and 30 MLP inputs (PyLO's port of
  the published weights agrees on both counts), which gin flags the published run used (see
  :mod:`l3rs.optim.velo`), and that the released ``params`` file is the ``ParameterCheckpoint`` form.
- not verified at all: that our update reproduces learned_optimization's numerically with the published weights
  (no reference run possible here). If the real file disagrees, :func:`load_hyper_v2` fails with the key and
  shapes it found, not silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from l3rs.optim.velo import VeLOConfig, velo_param_shapes

__all__ = ["save_hyper_v2", "load_hyper_v2", "GEN_ID_PREFIX"]

GEN_ID_PREFIX = "l3rs-velo:"


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _key(path: tuple[str, ...]) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _flat_shapes(config: VeLOConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    out: dict[tuple[str, ...], tuple[int, ...]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if _is_shape(node):
            out[path] = node
        else:
            for k, v in node.items():
                walk(v, path + (k,))

    walk(velo_param_shapes(config), ())
    return out


def _flat_arrays(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_flat_arrays(v, path + (str(k),)))
        return out
    return {path: tree}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _check(flat: dict[tuple[str, ...], Any], config: VeLOConfig, where: str) -> None:
    """Every key the config needs is there with its shape, nothing else, all finite."""
    expected = _flat_shapes(config)
    missing = [p for p in expected if p not in flat]
    if missing:
        raise ValueError(
            f"{where}: missing key params{_key(missing[0])} (shape {expected[missing[0]]})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + f"; a VeLO checkpoint for {config!r} needs {len(expected)} arrays."
        )
    extra = sorted(p for p in flat if p not in expected)
    if extra:
        raise ValueError(
            f"{where}: unexpected key(s) {', '.join('params' + _key(p) for p in extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}; not part of VeLO (hyper_v2) for {config!r}."
        )
    for path, shape in expected.items():
        value = flat[path]
        got = tuple(np.shape(value))
        if got != shape:
            raise ValueError(f"{where}: params{_key(path)} has shape {got}, expected {shape} for {config!r}.")
        if not np.all(np.isfinite(np.asarray(value, np.float32))):
            raise ValueError(f"{where}: params{_key(path)} contains non-finite values.")


def save_hyper_v2(path: str | os.PathLike, theta: Any, config: VeLOConfig, *, step: int = 0) -> None:
    """Writes ``theta`` (VeLO meta-parameters for ``config``) as a hyper_v2 ``ParameterCheckpoint`` file.

    The file is what ``learned_optimization.checkpoints.save_state(path, ParameterCheckpoint(theta, gen_id, step))``
    writes (see the module docstring; ``gen_id`` carries our config). Written atomically (temporary file + rename).
    """
    flat = {p: np.asarray(v, np.float32) for p, v in _flat_arrays(jax.device_get(theta)).items()}
    _check(flat, config, "save_hyper_v2")
    state = {
        "params": _nest(flat),
        "gen_id": GEN_ID_PREFIX + json.dumps(config.to_dict(), sort_keys=True),
        "step": int(step),
    }
    data = serialization.msgpack_serialize(state)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _unwrap(state: Any, where: str) -> tuple[dict[str, Any], Any]:
    """(theta, gen_id) from a ParameterCheckpoint / tuple / bare-theta state dict."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a msgpack map at the top level, got {type(state).__name__}.")
    if "params" in state:
        theta, gen_id = state["params"], state.get("gen_id")
    elif "0" in state:
        theta, gen_id = state["0"], state.get("1")
    elif "rnn_params" in state:
        theta, gen_id = state, None
    else:
        raise ValueError(
            f"{where}: not a hyper_v2 checkpoint: top-level keys {sorted(state)}; expected 'params' "
            "(ParameterCheckpoint), '0' (a (theta, gen_id, step) tuple) or a bare theta with 'rnn_params'."
        )
    if not isinstance(theta, dict):
        raise ValueError(f"{where}: the meta-parameters are a {type(theta).__name__}, expected a map.")
    theta = dict(theta)
    init = theta.get("lstm_init_state")
    if isinstance(init, dict) and set(init) == {"name", "fields", "values"}:
        # flax's pre-2022 namedtuple encoding: {"fields": {"0": "hidden", ...}, "values": {"0": array, ...}}
        theta["lstm_init_state"] = {init["fields"][str(i)]: init["values"][str(i)] for i in range(len(init["fields"]))}
    return theta, gen_id


def _infer_config(flat: dict[tuple[str, ...], Any], where: str) -> VeLOConfig:
    """Sizes from the arrays, everything else at hyper_v2's (= the published VeLO's) defaults."""

    def shape(path: tuple[str, ...]) -> tuple[int, ...]:
        if path not in flat:
            raise ValueError(f"{where}: missing key params{_key(path)}; cannot infer the VeLO sizes without it.")
        return tuple(np.shape(flat[path]))

    ff = ("ff_mod_stack", "~")
    hidden = shape(("lstm_init_state", "hidden"))
    b0 = shape(ff + ("b0",))
    if len(hidden) != 2 or len(b0) != 2:
        raise ValueError(
            f"{where}: params['lstm_init_state']['hidden'] {hidden} / params['ff_mod_stack']['~']['b0'] {b0}: "
            "expected 2-d arrays."
        )
    layers = sum(1 for p in flat if p[:2] == ff and len(p) == 3 and p[2].startswith("b"))
    config = VeLOConfig(
        lstm_hidden_size=hidden[1],
        param_inits=b0[0],
        ff_hidden_size=b0[1],
        ff_hidden_layers=max(layers - 1, 0),
        adam_skip=("adam_skip", "log_lr") in flat,
    )
    # The number of accumulators shows in the input blocks; their decay values are not in the file.
    dims = tuple(shape(ff + (f"w0__{i}",))[1] for i in range(len(config.ff_input_dims)) if ff + (f"w0__{i}",) in flat)
    if dims != config.ff_input_dims:
        raise ValueError(
            f"{where}: the per-parameter MLP's input blocks have sizes {dims}; the default decays (momentum "
            f"{config.momentum_decays}, rms {config.rms_decays}, adafactor {config.adafactor_decays}) give "
            f"{config.ff_input_dims}. Pass the VeLOConfig the checkpoint was trained with: load_hyper_v2(path, config)."
        )
    return config


def load_hyper_v2(path: str | os.PathLike, config: VeLOConfig | None = None) -> tuple[dict[str, Any], VeLOConfig]:
    """Reads a hyper_v2 checkpoint (the published VeLO's format, or one :func:`save_hyper_v2` wrote).

    Args:
      path: the checkpoint file.
      config: the config to validate against. Default: the one :func:`save_hyper_v2` recorded, else inferred from
        the shapes with hyper_v2's default decays and output scales (right for the published VeLO).

    Returns:
      (meta-parameters as float32 ``jax.Array``s in :func:`l3rs.optim.velo.velo_param_shapes`'s layout, config).

    Raises:
      ValueError: not a msgpack hyper_v2 file, or a key missing / unexpected / of the wrong shape (named).
    """
    where = f"load_hyper_v2({os.fspath(path)!r})"
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for garbage
        raise ValueError(f"{where}: not a flax msgpack checkpoint ({type(e).__name__}: {e}).") from None
    theta, gen_id = _unwrap(state, where)
    flat = _flat_arrays(theta)
    if config is None:
        if isinstance(gen_id, str) and gen_id.startswith(GEN_ID_PREFIX):
            try:
                config = VeLOConfig.from_dict(json.loads(gen_id[len(GEN_ID_PREFIX) :]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: the recorded config is invalid: {e}") from None
        else:
            config = _infer_config(flat, where)
    _check(flat, config, where)
    meta = _nest({p: jnp.asarray(np.asarray(v), jnp.float32) for p, v in flat.items()})
    return _reorder(meta, velo_param_shapes(config)), config  # in the template's key order


def _reorder(meta: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    return {k: (meta[k] if _is_shape(v) else _reorder(meta[k], v)) for k, v in template.items()}
