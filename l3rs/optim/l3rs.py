"""L3RS: Learned Layer-wise Learning Rate Scheduler as an optax transformation (paper §4.1, Eq. 2, Fig. 2).

For every layer l (every leaf of the params pytree: kernels, biases and norm scales are each their own component):

    Δθ(l) = λ(l) · Σ_p μ_p(l) · d_p(l) / ‖d_p(l)‖₂                                  (Eq. 2)

where d_p are the base optimizers' descent directions and (μ(l), λ(l)) come from one small MLP shared by all layers:
z = MLP(features(l)) ∈ R^{P+1}, μ = softmax(z[:P]), λ = exp(z[P]). The features of a layer (§4.1) are the
bias-corrected EMAs (γ ∈ ema_decays) of log‖w‖, log‖g‖ and the loss, 11 relative time features
tanh(10(k/K − α_i)), 4 absolute time features tanh(log(K β_j)), log‖d_p‖ per direction, and a learned per-layer
embedding.

ψ (:class:`Psi`) holds the MLP, the embeddings and the base optimizers' meta-learned hyperparameters; it records the
layer paths its embeddings belong to. ``l3rs(psi, config, total_steps)`` turns it into an
``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the current loss as ``value``.

Behaviour beyond the horizon: ``total_steps`` (K) only enters through the time features. For k ≥ K,
``config.past_horizon`` decides: ``"extrapolate"`` (default) feeds k/K > 1 to tanh(10(k/K − α)), which saturates
towards 1; ``"clamp"`` holds the relative-time features at k = K − 1; ``"decay"`` clamps them and scales λ by
K/(k + 1). ``config.absolute_time_k_max`` caps the K the absolute-time features see; ``config.lambda_max_adam_ratio``
bounds λ relative to the Adam-equivalent step; ``config.feature_scale`` makes the norm and loss features relative to
their first values (see :class:`l3rs.L3RSConfig`).

Edge cases (issue 12). A layer is *skipped* for a step when its gradient is all zero or has any non-finite entry.
A skipped layer gets a zero update (it does not move: no momentum step), its per-parameter base-optimizer state
(Adam's first and second moments, ...) is left exactly as it was (no decay), and its feature EMAs of log‖w‖ and
log‖g‖ are neither updated nor counted: each layer has its own bias-correction counter (``layer_count``), so after a
skip its features stay correctly scaled. The base optimizers' own step counters (optax keeps one per direction, not
per layer) still advance; for Adam that makes the skipped layer's bias correction of m̂ and v̂ assume one step more
than it saw, a per-layer scale factor that Eq. 2's normalisation removes except through Adam's ε and ‖d_1‖ (and it
tends to 1 as training goes on). A non-finite loss is left out of the loss EMA and does not advance the loss's
bias-correction counter (``loss_count``), so the loss feature stays correctly scaled; layers with finite gradients
still update on that step. The step index k of the time features counts every call. Before the first finite loss
the loss feature is 0, and before a layer's first update its EMA features are 0. With ``variant="global"`` the
features are skipped only when every layer is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from l3rs.optim.config import L3RSConfig
from l3rs.optim.directions import constrain, unconstrain
from l3rs.optim.family import meta_size, meta_to_vector, vector_to_meta

__all__ = [
    "Psi",
    "L3RSState",
    "init_psi",
    "l3rs",
    "layer_stats",
    "layer_paths",
    "psi_to_vector",
    "vector_to_psi",
    "psi_size",
]

# log λ is clipped to keep λ finite in float32; a candidate that wants larger steps diverges and gets a bad
# fitness instead of producing inf·0 = NaN updates.
_LOG_LAMBDA_MAX = 50.0


# ----------------------------------------------------------------------------------------------------------------
# ψ
# ----------------------------------------------------------------------------------------------------------------
@struct.dataclass
class Psi:
    """L3RS meta-parameters ψ. A pytree of float32 arrays; ``layer_paths`` is static metadata.

    Attributes:
      mlp: list of ``{"w": [in, out], "b": [out]}`` dicts (``per_layer_mlp``: a leading [L] axis on each).
      embedding: [L, E] per-layer embeddings (E = 0 unless ``variant="embedding"``).
      hparams: ``{direction: {name: logit}}``, the base optimizers' meta-learned hyperparameters.
      layer_paths: the params paths ("Conv_0/kernel", ...) row i of ``embedding`` belongs to.
    """

    mlp: list[dict[str, jax.Array]]
    embedding: jax.Array
    hparams: dict[str, dict[str, jax.Array]]
    layer_paths: tuple[str, ...] = struct.field(pytree_node=False)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def layer_paths(params: Any) -> tuple[str, ...]:
    """The "/"-joined path of every leaf of ``params``, in ``jax.tree.leaves`` order."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    return tuple("/".join(_key_name(k) for k in path) for path, _ in with_path)


def _lecun(key: jax.Array, fan_in: int, fan_out: int, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)


def _init_mlp(key: jax.Array, config: L3RSConfig) -> list[dict[str, jax.Array]]:
    p = config.num_directions
    sizes = (config.num_features, *config.hidden_sizes, p + 1)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        # Hidden layers: LeCun normal. Output layer: small weights, and a bias that makes ψ₀ a sane optimizer:
        # μ₀ = config.mixing0(), λ₀ = init_lr (in units of ‖d_1‖ with lambda_skip).
        w = _lecun(k, fan_in, fan_out, scale=1e-2 if last else np.sqrt(2.0))
        if last:
            b = jnp.concatenate(
                [jnp.log(jnp.asarray(config.mixing0(), jnp.float32)), jnp.log(jnp.float32([config.init_lr]))]
            )
        else:
            b = jnp.zeros((fan_out,), jnp.float32)
        layers.append({"w": w, "b": b})
    return layers


def init_psi(config: L3RSConfig, params: Any, key: jax.Array) -> Psi:
    """Initial meta-parameters ψ₀ for a model with these ``params`` (only the paths are used).

    ψ₀ is a usable optimizer: per layer it steps like the first base direction with learning rate
    ``config.init_lr`` (Adam(3e-3) by default), mixing in the other directions with ``config.mixing0()``.
    """
    paths = layer_paths(params)
    if not paths:
        raise ValueError("init_psi: params has no leaves.")
    num_layers = len(paths)
    k_mlp, k_emb = jax.random.split(key)
    if config.variant == "per_layer_mlp":
        per_layer = [_init_mlp(k, config) for k in jax.random.split(k_mlp, num_layers)]
        mlp = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    else:
        mlp = _init_mlp(k_mlp, config)
    embedding = 0.1 * jax.random.normal(k_emb, (num_layers, config.effective_embedding_dim), jnp.float32)
    hparams = {d.name: unconstrain(d.learnable) for d in config.resolved_directions}
    return Psi(mlp=mlp, embedding=embedding, hparams=hparams, layer_paths=paths)


def psi_to_vector(psi: Psi) -> jax.Array:
    """ψ as one flat float32 vector (what NES perturbs): :func:`l3rs.meta_to_vector`."""
    return meta_to_vector(psi)


def vector_to_psi(vector: jax.Array, template: Psi) -> Psi:
    """Inverse of :func:`psi_to_vector`, with ``template`` giving the structure (works under jit and vmap)."""
    try:
        return vector_to_meta(vector, template)
    except ValueError as e:
        raise ValueError(f"vector_to_psi: {e}") from None


def psi_size(psi: Psi) -> int:
    return meta_size(psi)


# ----------------------------------------------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------------------------------------------
class L3RSState(NamedTuple):
    """Optimizer state: the base optimizers' states plus a few scalars per layer.

    Attributes:
      count: number of update calls so far (k, the step index of the time features).
      base_states: per direction (``config.directions`` order), a tuple with one optax state per layer (params
        leaf, ``jax.tree.leaves`` order): every layer has its own base-optimizer state and step counter, so a
        skipped layer's state stays exactly as it was.
      ema_log_w, ema_log_g: [C, G] raw (not yet bias-corrected) EMAs of the log‖w‖ and log‖g‖ features per
        component (C = number of layers, 1 for ``variant="global"``).
      ema_loss: [G] raw EMAs of the loss feature.
      mixing: [L, P] the μ the last update used, rows in ``jax.tree.leaves(params)`` order.
      step_norm: [L] the λ the last update used (0 for a skipped layer).
      layer_count: [C] number of updates that reached each component's EMAs (its bias-correction counter).
      loss_count: number of finite losses in the loss EMA (its bias-correction counter).
      ref_log_w, ref_log_g: [C] log‖w‖ and log‖g‖ at each component's first update (``feature_scale`` references).
      ref_log_d: [C, P] log‖d_p‖ at each component's first update.
      ref_loss: the first finite loss.
    """

    count: jax.Array
    base_states: tuple[Any, ...]
    ema_log_w: jax.Array
    ema_log_g: jax.Array
    ema_loss: jax.Array
    mixing: jax.Array
    step_norm: jax.Array
    layer_count: jax.Array
    loss_count: jax.Array
    ref_log_w: jax.Array
    ref_log_g: jax.Array
    ref_log_d: jax.Array
    ref_loss: jax.Array


def layer_stats(state: L3RSState) -> dict[str, jax.Array]:
    """μ ([L, P], columns in ``config.directions`` order) and λ ([L]) of the last update (for Fig. 4 plots)."""
    return {"mixing": state.mixing, "step_norm": state.step_norm}


def _keep_skipped(new: Any, old: Any, active: jax.Array, treedef: Any) -> Any:
    """The base state ``new``, with every params-shaped part (Adam's moments, ...) of a skipped layer taken from
    ``old``. Scalars such as optax's step counter are shared by all layers and are taken from ``new``."""

    def walk(node_new: Any, node_old: Any) -> Any:
        if jax.tree.structure(node_new) == treedef:  # a params-shaped part: select per layer
            leaves_new, leaves_old = treedef.flatten_up_to(node_new), treedef.flatten_up_to(node_old)
            kept = [jnp.where(a, n, o) for a, n, o in zip(active, leaves_new, leaves_old, strict=True)]
            return jax.tree.unflatten(treedef, kept)
        if isinstance(node_new, tuple):  # optax states are (named) tuples of arrays and nested states
            parts = [walk(n, o) for n, o in zip(node_new, node_old, strict=True)]
            return type(node_new)(*parts) if hasattr(node_new, "_fields") else tuple(parts)
        return node_new

    return walk(new, old)


def _correction(gammas: jax.Array, counts: jax.Array) -> jax.Array:
    """EMA bias correction 1 − γ^t for t = ``counts`` (broadcast against γ); 1 where t = 0, where the EMA is still 0."""
    return jnp.where(counts > 0, 1.0 - gammas ** counts.astype(jnp.float32), 1.0)


def _mlp_apply(layers: list[dict[str, jax.Array]], x: jax.Array, per_layer: bool) -> jax.Array:
    """x: [C, F] → [C, P+1]; ReLU between layers."""
    for i, layer in enumerate(layers):
        if per_layer:
            x = jnp.einsum("cf,cfo->co", x, layer["w"]) + layer["b"]
        else:
            x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def l3rs(psi: Psi, config: L3RSConfig, total_steps: int | jax.Array) -> optax.GradientTransformationExtraArgs:
    """The L3RS optimizer for meta-parameters ``psi``.

    Args:
      psi: meta-parameters from :func:`init_psi` (or a trained artifact).
      config: the :class:`L3RSConfig` ψ was built for.
      total_steps: K, the planned number of updates. A Python int or a traced scalar, so one compiled training
        loop serves every K.

    Returns:
      A transformation with ``update(grads, state, params, *, value)``; ``value`` is the current loss. ``params``
      may be a subset of the layers ψ was built for (e.g. inside ``optax.masked``); layers are matched by path.
    """
    directions = config.resolved_directions
    p_dirs = len(directions)
    gammas = jnp.asarray(config.ema_decays, jnp.float32)
    alphas = jnp.asarray(config.relative_time_anchors, jnp.float32)
    betas = jnp.asarray(config.absolute_time_betas, jnp.float32)
    is_global = config.variant == "global"
    per_layer_mlp = config.variant == "per_layer_mlp"
    eps = config.eps

    def base_transforms() -> list[optax.GradientTransformation]:
        return [d.factory(constrain(psi.hparams.get(d.name, {}))) for d in directions]

    def layer_index(params: Any) -> np.ndarray:
        paths = layer_paths(params)
        where = {path: i for i, path in enumerate(psi.layer_paths)}
        missing = [path for path in paths if path not in where]
        if missing:
            raise ValueError(
                f"L3RS: these layers are not in ψ: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                f"ψ was built for {len(psi.layer_paths)} layers such as {list(psi.layer_paths[:3])}; "
                "use a ψ meta-trained for this architecture (or init_psi on these params)."
            )
        return np.asarray([where[path] for path in paths], np.int32)

    def num_components(num_leaves: int) -> int:
        return 1 if is_global else num_leaves

    def init_fn(params: Any) -> L3RSState:
        leaves = jax.tree.leaves(params)
        layer_index(params)  # fail early on a layer mismatch
        n = len(leaves)
        c = num_components(n)
        g = len(config.ema_decays)
        mixing0 = jnp.broadcast_to(jnp.asarray(config.mixing0(), jnp.float32), (n, p_dirs))
        return L3RSState(
            count=jnp.zeros([], jnp.int32),
            base_states=tuple(t.init(params) for t in base_transforms()),
            ema_log_w=jnp.zeros((c, g), jnp.float32),
            ema_log_g=jnp.zeros((c, g), jnp.float32),
            ema_loss=jnp.zeros((g,), jnp.float32),
            mixing=mixing0,
            step_norm=jnp.zeros((n,), jnp.float32),
            layer_count=jnp.zeros((c,), jnp.int32),
            loss_count=jnp.zeros([], jnp.int32),
            ref_log_w=jnp.zeros((c,), jnp.float32),
            ref_log_g=jnp.zeros((c,), jnp.float32),
            ref_log_d=jnp.zeros((c, p_dirs), jnp.float32),
            ref_loss=jnp.zeros([], jnp.float32),
        )

    def update_fn(grads: Any, state: L3RSState, params: Any = None, *, value: Any = None, **extra_args: Any):
        del extra_args
        if params is None:
            raise ValueError(
                "L3RS.update needs params (log‖w‖ is a feature): update(grads, state, params, value=loss)."
            )
        if value is None:
            raise ValueError("L3RS.update needs the current loss: update(grads, state, params, value=loss).")
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        n = len(g_leaves)
        idx = layer_index(params)

        # Edge cases (module docstring): a layer with an all-zero or non-finite gradient is skipped this step.
        finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in g_leaves])
        active = finite & jnp.stack([jnp.any(g != 0) for g in g_leaves])  # [n]
        g_leaves = [jnp.where(ok, g, jnp.zeros_like(g)) for ok, g in zip(finite, g_leaves, strict=True)]

        # Base directions d_p (all pointing downhill). A skipped layer's per-parameter base state (Adam's moments)
        # is kept as it was; optax's step counter is one per direction, shared by all layers.
        clean_grads = jax.tree.unflatten(treedef, g_leaves)
        dirs, base_states = [], []
        for tx, s_old in zip(base_transforms(), state.base_states, strict=True):
            d, s_new = tx.update(clean_grads, s_old, params)
            dirs.append(treedef.flatten_up_to(d))
            base_states.append(_keep_skipped(s_new, s_old, active, treedef))

        def sq(leaves: list[jax.Array]) -> jax.Array:  # per-leaf Σx² in float32 → [n]
            return jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves])

        sq_w, sq_g = sq(p_leaves), sq(g_leaves)
        sq_d = jnp.stack([sq(d) for d in dirs], axis=1)  # [n, P]
        active_c = active
        if is_global:  # the whole model is one component
            sq_w, sq_g, sq_d = sq_w.sum(keepdims=True), sq_g.sum(keepdims=True), sq_d.sum(0, keepdims=True)
            active_c = jnp.any(active, keepdims=True)
        norm_d = jnp.sqrt(sq_d)  # [C, P]
        log_w = jnp.log(jnp.sqrt(sq_w) + eps)
        log_g = jnp.log(jnp.sqrt(sq_g) + eps)
        log_d = jnp.log(norm_d + eps)

        # Scale-free features (config.feature_scale): norms relative to the component's first update.
        first = active_c & (state.layer_count == 0)  # [C]
        ref_log_w = jnp.where(first, log_w, state.ref_log_w)
        ref_log_g = jnp.where(first, log_g, state.ref_log_g)
        ref_log_d = jnp.where(first[:, None], log_d, state.ref_log_d)
        loss = jnp.asarray(value, jnp.float32)
        loss_ok = jnp.isfinite(loss)
        ref_loss = jnp.where(loss_ok & (state.loss_count == 0), loss, state.ref_loss)
        if config.feature_scale == "absolute":
            xi_w, xi_g, xi_d, xi_loss = log_w, log_g, log_d, loss
        else:
            xi_w, xi_g, xi_d = log_w - ref_log_w, log_g - ref_log_g, log_d - ref_log_d
            scale0 = jnp.abs(ref_loss) + eps
            if config.feature_scale == "relative":
                xi_loss = loss / scale0
            else:  # "log_relative"
                xi_loss = jnp.log(jnp.maximum(loss, eps)) - jnp.log(scale0)

        # Bias-corrected EMAs (§4.1): a ← γa + (1−γ)ξ, ã = a / (1 − γ^t), t = the number of updates that reached
        # this EMA, including this one (skipped layers and non-finite losses do not count).
        layer_count = state.layer_count + active_c.astype(jnp.int32)
        loss_count = state.loss_count + loss_ok.astype(jnp.int32)
        # A skipped component keeps its EMA exactly: γ → 1 and 1 − γ → 0 for it (ξ is finite: grads were cleaned).
        g_keep = jnp.where(active_c[:, None], gammas, 1.0)
        g_new = jnp.where(active_c[:, None], 1 - gammas, 0.0)
        ema_w = g_keep * state.ema_log_w + g_new * xi_w[:, None]
        ema_g = g_keep * state.ema_log_g + g_new * xi_g[:, None]
        ema_loss = jnp.where(loss_ok, gammas * state.ema_loss + (1 - gammas) * xi_loss, state.ema_loss)
        t = state.count + 1
        correction = 1.0 - gammas ** t.astype(jnp.float32)  # [G], for EMAs that saw every step (the usual case)
        in_step = (layer_count == t)[:, None]  # components whose EMA saw every step: the plain §4.1 correction
        lag_corr = _correction(gammas, layer_count[:, None])  # [C, G]
        feat_w = jnp.where(in_step, ema_w / correction, ema_w / lag_corr)
        feat_g = jnp.where(in_step, ema_g / correction, ema_g / lag_corr)
        feat_loss = jnp.where(loss_count == t, ema_loss / correction, ema_loss / _correction(gammas, loss_count))

        # Time features (§4.1): k is the index of this step (0-based), K the horizon.
        k = state.count.astype(jnp.float32)
        big_k = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
        k_rel = k if config.past_horizon == "extrapolate" else jnp.minimum(k, big_k - 1.0)
        rel_time = jnp.tanh(10.0 * (k_rel / big_k - alphas))
        k_abs = big_k if config.absolute_time_k_max is None else jnp.minimum(big_k, config.absolute_time_k_max)
        abs_time = jnp.tanh(jnp.log(k_abs * betas))

        c = log_w.shape[0]
        shared = jnp.concatenate([feat_loss, rel_time, abs_time])
        parts = [
            feat_w,
            feat_g,
            jnp.broadcast_to(shared, (c, shared.shape[0])),
            xi_d,
        ]
        if config.effective_embedding_dim:
            parts.append(psi.embedding[idx])
        features = jnp.concatenate(parts, axis=1)  # [C, F]

        mlp = jax.tree.map(lambda w: w[idx], psi.mlp) if per_layer_mlp else psi.mlp
        z = _mlp_apply(mlp, features, per_layer_mlp)  # [C, P+1]
        mixing = jax.nn.softmax(z[:, :p_dirs], axis=-1)
        log_lam = z[:, p_dirs] + (log_d[:, 0] if config.lambda_skip else 0.0)
        if config.lambda_max_adam_ratio is not None:
            # Smooth bound in Adam-equivalent steps (config docstring): ratio' = c·σ(log ratio − log(c − 1)).
            c_max = float(config.lambda_max_adam_ratio)
            log_unit = log_d[:, 0] + float(np.log(config.init_lr))  # log(lr₀·‖d_1‖)
            log_ratio = log_lam - log_unit
            log_lam = log_unit + float(np.log(c_max)) + jax.nn.log_sigmoid(log_ratio - float(np.log(c_max - 1.0)))
        if config.past_horizon == "decay":
            log_lam = log_lam + jnp.minimum(jnp.log(big_k) - jnp.log(k + 1.0), 0.0)
        lam = jnp.exp(jnp.minimum(log_lam, _LOG_LAMBDA_MAX))

        # Eq. 2: Δθ = λ Σ_p μ_p d_p / ‖d_p‖ (a zero direction contributes nothing).
        inv_norm = jnp.where(norm_d > 0, 1.0 / jnp.where(norm_d > 0, norm_d, 1.0), 0.0)  # [C, P]
        coef = lam[:, None] * mixing * inv_norm  # [C, P]
        if is_global:
            coef = jnp.broadcast_to(coef, (n, p_dirs))
            mixing, lam = jnp.broadcast_to(mixing, (n, p_dirs)), jnp.broadcast_to(lam, (n,))
        coef = jnp.where(active[:, None], coef, 0.0)
        updates = []
        for i, p_leaf in enumerate(p_leaves):
            u = sum(coef[i, j] * dirs[j][i].astype(jnp.float32) for j in range(p_dirs))
            updates.append(u.astype(p_leaf.dtype))

        new_state = L3RSState(
            count=t,
            base_states=tuple(base_states),
            ema_log_w=ema_w,
            ema_log_g=ema_g,
            ema_loss=ema_loss,
            mixing=mixing,
            step_norm=jnp.where(active, lam, 0.0),
            layer_count=layer_count,
            loss_count=loss_count,
            ref_log_w=ref_log_w,
            ref_log_g=ref_log_g,
            ref_log_d=ref_log_d,
            ref_loss=ref_loss,
        )
        return jax.tree.unflatten(treedef, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
