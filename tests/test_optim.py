"""The L3RS optimizer (paper §4.1, Eq. 2) against values computed by hand in numpy.

Every expected value comes from a small float64 numpy re-derivation of §4.1 (``HandL3RS``)
or from optax's own optimizers, never from l3rs' code paths. The features the MLP sees are
read black-box: a ψ whose MLP is the exact identity z_λ = relu(x_i) − relu(−x_i) = x_i on
one feature i makes λ = exp(x_i), which ``l3rs.layer_stats`` reports; one such ψ per
feature, vmapped through ``l3rs.vector_to_psi``.

Feature order (as ``HandL3RS.step`` builds it; the implementation must agree): the
bias-corrected EMAs of log‖w‖ (one per γ), of log‖g‖ and of the loss; 11 relative time;
4 absolute time; log‖d_p‖ per direction; the layer's embedding.
"""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _paper import paper_config  # every formula here is §4.1's: absolute features, λ unbounded

import l3rs

EPS = 1e-8

GAMMAS = np.array([0.0, 0.9, 0.99])
ALPHAS = np.linspace(0.0, 1.0, 11)  # §4.1: 11 relative-time anchors in [0, 1]
BETAS = np.logspace(-4.0, -1.0, 4)  # §4.1: 4 absolute-time scales in [1e-4, 0.1]
K = 20
LOSSES = (2.3, 1.7, 1.9)

# A flax-like params tree: a conv, a norm layer and a dense head (every leaf is its own L3RS layer).
SHAPES = {
    "Conv_0": {"kernel": (3, 3, 1, 4), "bias": (4,)},
    "LayerNorm_0": {"scale": (4,), "bias": (4,)},
    "head": {"kernel": (4, 3), "bias": (3,)},
}
PATHS = (
    "Conv_0/bias",
    "Conv_0/kernel",
    "LayerNorm_0/bias",
    "LayerNorm_0/scale",
    "head/bias",
    "head/kernel",
)


def _tree(seed: int, scale: float = 1.0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        mod: {name: jnp.asarray(scale * rng.normal(size=shape), dtype) for name, shape in leaves.items()}
        for mod, leaves in SHAPES.items()
    }


PARAMS_SEQ = [_tree(10 + t) for t in range(3)]
GRADS_SEQ = [_tree(20 + t, scale=0.1 * (t + 1)) for t in range(3)]


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """(path, float64 array) of every leaf of a nested dict, keys sorted (jax's dict order)."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flat(value, path + "/")
        else:
            out.append((path, np.asarray(value, np.float64)))
    return out


def _leaves(tree: dict) -> list[np.ndarray]:
    return [x for _, x in _flat(tree)]


def _norm(x) -> float:
    return float(np.sqrt(np.sum(np.square(np.asarray(x, np.float64)))))


def _sigmoid(x) -> float:
    return float(1.0 / (1.0 + np.exp(-np.float64(x))))


def _logit(p: float) -> jax.Array:
    return jnp.float32(np.log(p) - np.log1p(-p))


# ----------------------------------------------------------------------------------------------------------
# The numpy reference of §4.1
# ----------------------------------------------------------------------------------------------------------
class HandAdam:
    """d = −m̂/(√v̂ + ε) per leaf (Kingma & Ba), float64."""

    def __init__(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.b1, self.b2, self.eps, self.t, self.m, self.v = b1, b2, eps, 0, None, None

    def __call__(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        if self.m is None:
            self.m = [np.zeros_like(g) for g in grads]
            self.v = [np.zeros_like(g) for g in grads]
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads, strict=True)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads, strict=True)]
        mhat = [m / (1 - self.b1**self.t) for m in self.m]
        vhat = [v / (1 - self.b2**self.t) for v in self.v]
        return [-a / (np.sqrt(b) + self.eps) for a, b in zip(mhat, vhat, strict=True)]


class HandL3RS:
    """§4.1 written out in float64 numpy: features → MLP → (μ, λ) → Eq. 2. Directions: "adam" and/or "sgd"."""

    def __init__(self, psi, directions=("adam", "sgd"), variant="embedding", lambda_skip=True, total_steps=K):
        self.mlp = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in psi.mlp]
        self.emb = np.asarray(psi.embedding, np.float64)
        self.rows = {path: i for i, path in enumerate(psi.layer_paths)}
        self.directions, self.variant, self.skip, self.K = directions, variant, lambda_skip, total_steps
        hp = psi.hparams.get("adam", {})
        self.adam = HandAdam(_sigmoid(hp["b1"]), _sigmoid(hp["b2"])) if "adam" in directions else None
        self.t = 0
        self.ema_w = self.ema_g = self.ema_loss = 0.0

    def _mlp(self, x: np.ndarray, rows: list[int]) -> np.ndarray:
        for i, layer in enumerate(self.mlp):
            if self.variant == "per_layer_mlp":  # one MLP per layer: pick each layer's own weights
                x = np.einsum("cf,cfo->co", x, layer["w"][rows]) + layer["b"][rows]
            else:
                x = x @ layer["w"] + layer["b"]
            if i < len(self.mlp) - 1:
                x = np.maximum(x, 0.0)
        return x

    def step(self, params: dict, grads: dict, loss: float):
        """Returns (features [C, F], μ [C, P], λ [C], updates: list of leaves)."""
        flat_p = _flat(params)
        paths = [p for p, _ in flat_p]
        w = [x for _, x in flat_p]
        g = _leaves(grads)
        d = []
        for name in self.directions:
            d.append(self.adam(g) if name == "adam" else [-x for x in g])
        if self.variant == "global":  # the whole model is one layer: global norms
            cat = lambda leaves: np.concatenate([x.ravel() for x in leaves])  # noqa: E731
            nw, ng = np.array([_norm(cat(w))]), np.array([_norm(cat(g))])
            nd = np.array([[_norm(cat(dp)) for dp in d]])
        else:
            nw, ng = np.array([_norm(x) for x in w]), np.array([_norm(x) for x in g])
            nd = np.array([[_norm(dp[i]) for dp in d] for i in range(len(w))])
        c = len(nw)
        self.t += 1
        k = self.t - 1  # 0-based index of this step
        # Bias-corrected EMAs, γ ∈ {0, .9, .99}: a ← γa + (1−γ)ξ, ã = a/(1−γ^t).
        corr = 1.0 - GAMMAS**self.t
        self.ema_w = GAMMAS * self.ema_w + (1 - GAMMAS) * np.log(nw + EPS)[:, None]
        self.ema_g = GAMMAS * self.ema_g + (1 - GAMMAS) * np.log(ng + EPS)[:, None]
        self.ema_loss = GAMMAS * self.ema_loss + (1 - GAMMAS) * loss
        rel = np.tanh(10.0 * (k / self.K - ALPHAS))
        absolute = np.tanh(np.log(self.K * BETAS))
        shared = np.concatenate([self.ema_loss / corr, rel, absolute])
        log_d = np.log(nd + EPS)
        parts = [self.ema_w / corr, self.ema_g / corr, np.tile(shared, (c, 1)), log_d]
        rows = [self.rows[p] for p in paths] if self.variant != "global" else [0]
        if self.variant == "embedding":
            parts.append(self.emb[rows])
        features = np.concatenate(parts, axis=1)
        z = self._mlp(features, rows)
        p_dirs = len(self.directions)
        e = np.exp(z[:, :p_dirs] - z[:, :p_dirs].max(axis=1, keepdims=True))
        mu = e / e.sum(axis=1, keepdims=True)
        lam = np.exp(z[:, p_dirs] + (log_d[:, 0] if self.skip else 0.0))
        updates = []
        for i in range(len(w)):
            ci = 0 if self.variant == "global" else i
            updates.append(lam[ci] * sum(mu[ci, j] * d[j][i] / nd[ci, j] for j in range(p_dirs)))  # Eq. 2
        return features, mu, lam, updates


# ----------------------------------------------------------------------------------------------------------
# Running the implementation
# ----------------------------------------------------------------------------------------------------------
def _update_fn(psi, config, total_steps, grads, state, params, loss):
    updates, state = l3rs.l3rs(psi, config, total_steps).update(grads, state, params, value=loss)
    return updates, state, l3rs.layer_stats(state)


_init = jax.jit(
    lambda psi, config, total_steps, params: l3rs.l3rs(psi, config, total_steps).init(params),
    static_argnums=(1, 2),
)
_update = jax.jit(_update_fn, static_argnums=(1, 2))


def _trajectory(psi, config, total_steps, params_seq, grads_seq, losses):
    """init + one jitted update per (params, grads, loss): [(updates, layer_stats)], final state."""
    state = _init(psi, config, total_steps, params_seq[0])
    outs = []
    for params, grads, loss in zip(params_seq, grads_seq, losses, strict=True):
        updates, state, stats = _update(psi, config, total_steps, grads, state, params, jnp.float32(loss))
        outs.append((updates, stats))
    return outs, state


def _vtrajectory(template, vectors, config, params_seq=PARAMS_SEQ, grads_seq=GRADS_SEQ, losses=LOSSES):
    """The same for a batch of ψ vectors, vmapped through ``l3rs.vector_to_psi`` (leading axis: ψ)."""
    as_psi = lambda v: l3rs.vector_to_psi(v, template)  # noqa: E731
    init = jax.jit(jax.vmap(lambda v: l3rs.l3rs(as_psi(v), config, K).init(params_seq[0])))
    update = jax.jit(
        jax.vmap(
            lambda v, s, g, p, loss: _update_fn(as_psi(v), config, K, g, s, p, loss),
            in_axes=(0, 0, None, None, None),
        )
    )
    state, outs = init(vectors), []
    for params, grads, loss in zip(params_seq, grads_seq, losses, strict=True):
        updates, state, stats = update(vectors, state, grads, params, jnp.float32(loss))
        outs.append((updates, stats))
    return outs


def _run(psi, config, params_seq=PARAMS_SEQ, grads_seq=GRADS_SEQ, losses=LOSSES, total_steps=K):
    """[(update leaves, μ, λ)] per step (numpy), final state."""
    outs, state = _trajectory(psi, config, total_steps, params_seq, grads_seq, losses)
    return [(_leaves(u), np.asarray(s["mixing"]), np.asarray(s["step_norm"])) for u, s in outs], state


def _perturbed_psi(config, scale=0.05, seed=0, params=PARAMS_SEQ[0]):
    """ψ₀ plus noise, so μ and λ differ between layers and steps."""
    psi0 = l3rs.init_psi(config, params, jax.random.key(seed))
    vec = l3rs.psi_to_vector(psi0)
    noise = scale * np.random.default_rng(seed).normal(size=vec.shape)
    return l3rs.vector_to_psi(vec + jnp.asarray(noise, jnp.float32), psi0)


def _selector(template, config, i: int):
    """A ψ whose MLP computes z = (0, …, 0, x_i) exactly: μ uniform and (lambda_skip=False) λ = exp(x_i)."""
    p_dirs = config.num_directions
    sizes = [layer["b"].shape[-1] for layer in template.mlp]
    n_in = template.mlp[0]["w"].shape[-2]
    mlp = []
    for j, (fan_in, fan_out) in enumerate(zip([n_in, *sizes[:-1]], sizes, strict=True)):
        w = np.zeros((fan_in, fan_out), np.float32)
        if j == 0:
            w[i, 0], w[i, 1] = 1.0, -1.0  # h = (relu(x_i), relu(−x_i))
        elif j < len(sizes) - 1:
            w[0, 0], w[1, 1] = 1.0, 1.0  # pass both through
        else:
            w[0, p_dirs], w[1, p_dirs] = 1.0, -1.0  # z_λ = relu(x_i) − relu(−x_i) = x_i
        b = np.zeros((fan_out,), np.float32)
        if config.variant == "per_layer_mlp":
            n = len(template.layer_paths)
            w, b = np.broadcast_to(w, (n, *w.shape)), np.broadcast_to(b, (n, *b.shape))
        mlp.append({"w": jnp.asarray(w), "b": jnp.asarray(b)})
    return template.replace(mlp=mlp)


def _cos(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------------------------------
# Features (§4.1), read black-box
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["embedding", "global"])  # the others: test_updates_match_hand_computed_l3rs
def test_features_seen_by_the_mlp_match_hand_computed_features(variant):
    config = paper_config(variant=variant, lambda_skip=False)
    template = _perturbed_psi(config)
    n_features = config.num_features
    assert n_features == {"embedding": 42, "global": 26}[variant]
    vectors = jnp.stack([l3rs.psi_to_vector(_selector(template, config, i)) for i in range(n_features)])

    outs = _vtrajectory(template, vectors, config)
    lam = jnp.stack([s["step_norm"] for _, s in outs], axis=1)  # [F, T, L]
    mix = jnp.stack([s["mixing"] for _, s in outs], axis=1)  # [F, T, L, P]
    seen = np.log(np.asarray(lam, np.float64)).transpose(1, 2, 0)  # [T, L, F]
    np.testing.assert_allclose(np.asarray(mix), 0.5, atol=1e-6)  # z_μ = 0 → uniform μ

    hand = HandL3RS(template, variant=variant, lambda_skip=False)
    for t in range(3):
        features, _, _, _ = hand.step(PARAMS_SEQ[t], GRADS_SEQ[t], LOSSES[t])
        if variant == "global":  # one feature vector, broadcast to every layer
            features = np.broadcast_to(features, (len(PATHS), n_features))
        np.testing.assert_allclose(seen[t], features, rtol=1e-5, atol=2e-5, err_msg=f"step {t + 1}")


def test_feature_values_spelled_out_at_step_three():
    """The same, formula by formula, for one layer (head/kernel) at k = 2 (the third step)."""
    config = paper_config(lambda_skip=False)
    template = l3rs.init_psi(config, PARAMS_SEQ[0], jax.random.key(3))
    vectors = jnp.stack([l3rs.psi_to_vector(_selector(template, config, i)) for i in range(42)])
    lam = _vtrajectory(template, vectors, config)[2][1]["step_norm"]  # [F, L] at the third step
    x = np.log(np.asarray(lam, np.float64))[:, PATHS.index("head/kernel")]

    def ema(xis, gamma):  # bias-corrected EMA after len(xis) steps
        a = 0.0
        for xi in xis:
            a = gamma * a + (1 - gamma) * xi
        return a / (1 - gamma ** len(xis))

    w = [np.log(_norm(p["head"]["kernel"]) + EPS) for p in PARAMS_SEQ]
    g = [np.log(_norm(gr["head"]["kernel"]) + EPS) for gr in GRADS_SEQ]
    np.testing.assert_allclose(x[0:3], [w[2], ema(w, 0.9), ema(w, 0.99)], rtol=1e-5)  # γ=0 is the latest value
    np.testing.assert_allclose(x[3:6], [g[2], ema(g, 0.9), ema(g, 0.99)], rtol=1e-5)
    np.testing.assert_allclose(x[6:9], [LOSSES[2], ema(LOSSES, 0.9), ema(LOSSES, 0.99)], rtol=1e-5)
    np.testing.assert_allclose(x[9:20], np.tanh(10 * (2 / K - np.linspace(0, 1, 11))), atol=2e-6)
    np.testing.assert_allclose(x[20:24], np.tanh(np.log(K * np.array([1e-4, 1e-3, 1e-2, 1e-1]))), atol=2e-6)
    adam = HandAdam()
    for gr in GRADS_SEQ:
        d_adam = adam([np.asarray(gr["head"]["kernel"], np.float64)])[0]
    d_sgd = -np.asarray(GRADS_SEQ[2]["head"]["kernel"])
    np.testing.assert_allclose(x[24:26], [np.log(_norm(d_adam) + EPS), np.log(_norm(d_sgd) + EPS)], rtol=1e-5)
    row = template.layer_paths.index("head/kernel")
    np.testing.assert_allclose(x[26:42], np.asarray(template.embedding[row]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The whole update against the reference, every variant
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, lambda_skip",
    [
        ("embedding", True),
        ("embedding", False),
        ("no_embedding", True),
        ("per_layer_mlp", True),
        ("global", True),
    ],
)
def test_updates_match_hand_computed_l3rs(variant, lambda_skip):
    config = paper_config(variant=variant, lambda_skip=lambda_skip)
    psi = _perturbed_psi(config)
    # Adam's β1, β2 are meta-learned logits in ψ: use values far from the defaults to see they are read.
    psi = psi.replace(hparams={"adam": {"b1": _logit(0.7), "b2": _logit(0.95)}, "sgd": {}})
    got, _ = _run(psi, config)
    hand = HandL3RS(psi, variant=variant, lambda_skip=lambda_skip)
    for t in range(3):
        _, mu, lam, updates = hand.step(PARAMS_SEQ[t], GRADS_SEQ[t], LOSSES[t])
        u, mixing, step_norm = got[t]
        if variant == "global":
            mu, lam = np.broadcast_to(mu, (len(PATHS), 2)), np.broadcast_to(lam, (len(PATHS),))
        assert np.ptp(mu[:, 0]) > 1e-4 or variant == "global"  # μ really differs between layers
        np.testing.assert_allclose(mixing, mu, rtol=1e-4, err_msg=f"μ, step {t + 1}")
        np.testing.assert_allclose(step_norm, lam, rtol=1e-4, err_msg=f"λ, step {t + 1}")
        for path, a, b in zip(PATHS, u, updates, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-9, err_msg=f"Δθ {path}, step {t + 1}")


# ----------------------------------------------------------------------------------------------------------
# Invariants of Eq. 2
# ----------------------------------------------------------------------------------------------------------
def test_update_is_the_mu_weighted_sum_of_normalised_adam_and_sgd_directions():
    config = paper_config()
    psi = _perturbed_psi(config, scale=0.1)
    got, _ = _run(psi, config)
    adam = HandAdam(_sigmoid(psi.hparams["adam"]["b1"]), _sigmoid(psi.hparams["adam"]["b2"]))  # β's from ψ
    for t in range(2):
        g = _leaves(GRADS_SEQ[t])
        d_adam, d_sgd = adam(g), [-x for x in g]
        u, mu, lam = got[t]
        for i, path in enumerate(PATHS):
            want = lam[i] * (mu[i, 0] * d_adam[i] / _norm(d_adam[i]) + mu[i, 1] * d_sgd[i] / _norm(d_sgd[i]))
            np.testing.assert_allclose(u[i], want, rtol=1e-4, atol=1e-9, err_msg=f"{path}, step {t + 1}")
            assert _norm(u[i]) <= lam[i] * (1 + 1e-6)  # a convex mix of unit vectors: ‖Δθ‖ ≤ λ
            assert mu[i].sum() == pytest.approx(1.0, abs=1e-6)


def test_sgd_only_is_normalised_gradient_descent():
    config = paper_config(directions=("sgd",))
    got, _ = _run(_perturbed_psi(config, scale=0.1), config)
    for t in range(3):
        u, mu, lam = got[t]
        np.testing.assert_allclose(mu, 1.0)
        for i, g in enumerate(_leaves(GRADS_SEQ[t])):
            np.testing.assert_allclose(u[i], -lam[i] * g / _norm(g), rtol=1e-5, atol=1e-10)


# Reference directions (learning rate 1) of every built-in base optimizer; per layer,
# L3RS must move exactly λ along the normalised reference.
_REFERENCE = {
    "sgd": lambda hp: optax.sgd(1.0),
    "adam": lambda hp: optax.adam(1.0, **hp),
    "lion": lambda hp: optax.lion(1.0, weight_decay=0.0, **hp),
    "lamb": lambda hp: optax.lamb(1.0, weight_decay=1e-2, **hp),
    "adamax": lambda hp: optax.adamax(1.0, **hp),
    "weight_decay": None,  # -θ, by hand
}


@pytest.mark.parametrize("name", sorted(_REFERENCE))
def test_every_builtin_direction_alone_moves_lambda_along_its_direction(name):
    assert set(_REFERENCE) == set(l3rs.BUILTIN_DIRECTIONS)
    config = paper_config(directions=(name,))
    psi = _perturbed_psi(config, scale=0.1)
    got, _ = _run(psi, config)
    hparams = {k: _sigmoid(v) for k, v in psi.hparams[name].items()}  # ψ's meta-learned β's
    ref = _REFERENCE[name] and _REFERENCE[name](hparams)
    ref_state = ref.init(PARAMS_SEQ[0]) if ref else None
    for t in range(3):
        if ref:
            d, ref_state = jax.jit(ref.update)(GRADS_SEQ[t], ref_state, PARAMS_SEQ[t])
            d = _leaves(d)
        else:
            d = [-w for w in _leaves(PARAMS_SEQ[t])]
        u, _, lam = got[t]
        for i, path in enumerate(PATHS):
            assert _norm(u[i]) == pytest.approx(lam[i], rel=1e-5)  # one direction: ‖Δθ_l‖ = λ_l exactly
            np.testing.assert_allclose(u[i], lam[i] * d[i] / _norm(d[i]), rtol=1e-4, atol=1e-9, err_msg=path)
            if name != "weight_decay":  # gradient-based directions point downhill
                assert float(np.vdot(u[i], _leaves(GRADS_SEQ[t])[i])) < 0, (name, path, t)


def test_default_update_points_downhill_and_decreases_a_quadratic():
    config = paper_config()
    psi = l3rs.init_psi(config, PARAMS_SEQ[0], jax.random.key(0))
    target = _tree(99)

    def loss_fn(p):
        return 0.5 * sum(
            jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
        )

    tx = l3rs.l3rs(psi, config, total_steps=10)
    params, state = PARAMS_SEQ[0], tx.init(PARAMS_SEQ[0])
    step = jax.jit(lambda p, s: (lambda v, g: (tx.update(g, s, p, value=v), v, g))(*jax.value_and_grad(loss_fn)(p)))
    losses = []
    for _ in range(10):
        (updates, state), loss, grads = step(params, state)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            assert float(jnp.vdot(u, g)) < 0
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_user_supplied_direction():
    belief = l3rs.Direction(
        "adabelief",
        lambda hp: optax.chain(optax.scale_by_belief(b1=hp["b1"], b2=0.999, eps=1e-8), optax.scale(-1.0)),
        learnable={"b1": 0.8},
    )
    config = paper_config(directions=("sgd", belief))
    psi = _perturbed_psi(config, scale=0.1)
    assert _sigmoid(psi.hparams["adabelief"]["b1"]) == pytest.approx(0.8, abs=0.05)
    b1 = _sigmoid(psi.hparams["adabelief"]["b1"])  # the value ψ holds is the one used
    got, _ = _run(psi, config)
    ref = optax.adabelief(1.0, b1=b1, b2=0.999, eps=1e-8)
    ref_state = ref.init(PARAMS_SEQ[0])
    for t in range(3):
        d, ref_state = ref.update(GRADS_SEQ[t], ref_state, PARAMS_SEQ[t])
        u, mu, lam = got[t]
        for i, (gi, di) in enumerate(zip(_leaves(GRADS_SEQ[t]), _leaves(d), strict=True)):
            want = lam[i] * (mu[i, 0] * -gi / _norm(gi) + mu[i, 1] * di / _norm(di))
            np.testing.assert_allclose(u[i], want, rtol=2e-4, atol=1e-9)
    with pytest.raises(ValueError, match="b1"):
        l3rs.Direction("bad", lambda hp: optax.identity(), learnable={"b1": 1.5})


# ----------------------------------------------------------------------------------------------------------
# ψ₀ ≈ Adam(init_lr)
# ----------------------------------------------------------------------------------------------------------
def test_psi0_first_step_is_adam_3e_3():
    params, grads = PARAMS_SEQ[0], GRADS_SEQ[0]
    adam_update, _ = optax.adam(3e-3).update(grads, optax.adam(3e-3).init(params), params)
    adam_update = _leaves(adam_update)
    # Adam-only mixing: optax.adam(3e-3)'s direction, and its length up to the small-weight MLP output.
    config = paper_config(directions=("adam",))
    got, _ = _run(l3rs.init_psi(config, params, jax.random.key(0)), config, [params], [grads], [2.3])
    for path, u, a in zip(PATHS, got[0][0], adam_update, strict=True):
        assert _cos(u, a) > 1 - 1e-6, path
        assert _norm(u) / _norm(a) == pytest.approx(1.0, abs=0.1), path
    # Default config: λ = 3e-3·‖d_adam‖ (up to the same perturbation), μ = (0.9, 0.1).
    config = paper_config()
    assert config.init_lr == 3e-3
    got, _ = _run(l3rs.init_psi(config, params, jax.random.key(0)), config, [params], [grads], [2.3])
    _, mu, lam = got[0]
    d_adam = HandAdam()(_leaves(grads))
    np.testing.assert_allclose(lam / np.array([3e-3 * _norm(d) for d in d_adam]), 1.0, atol=0.1)
    np.testing.assert_allclose(mu, np.broadcast_to([0.9, 0.1], mu.shape), atol=0.02)


# ----------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------
def _finite_tree(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def test_zero_gradients_give_a_zero_update():
    config = paper_config()
    zeros = jax.tree.map(jnp.zeros_like, GRADS_SEQ[0])
    got, state = _run(_perturbed_psi(config), config, grads_seq=[zeros] * 3)
    for u, mu, lam in got:
        for x in u:
            np.testing.assert_array_equal(x, 0.0)
        assert np.all(np.isfinite(mu)) and np.all(np.isfinite(lam))
    assert _finite_tree(state)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_zeroes_only_that_layer(bad):
    config = paper_config()
    psi = _perturbed_psi(config)
    broken = jax.tree.map(lambda x: x, GRADS_SEQ[1])
    broken["head"]["kernel"] = broken["head"]["kernel"].at[1, 2].set(bad)
    clean, _ = _run(psi, config)
    got, state = _run(psi, config, grads_seq=[GRADS_SEQ[0], broken, GRADS_SEQ[2]])
    bad_i = PATHS.index("head/kernel")
    u, _, lam = got[1]
    np.testing.assert_array_equal(u[bad_i], 0.0)
    assert lam[bad_i] == 0.0
    for i, path in enumerate(PATHS):
        if i != bad_i:  # every other layer depends only on its own statistics, the loss and time: unchanged
            np.testing.assert_allclose(u[i], clean[1][0][i], rtol=1e-6, atol=1e-12, err_msg=path)
    assert _finite_tree(state)
    u, _, lam = got[2]  # the step after: everything finite, the broken layer moves again
    assert all(np.all(np.isfinite(x)) for x in u) and _norm(u[bad_i]) > 0


def test_nan_loss_does_not_poison_the_state():
    config = paper_config()
    got, state = _run(_perturbed_psi(config), config, losses=(2.3, float("nan"), 1.9))
    assert _finite_tree(state)
    for u, mu, lam in got:
        assert all(np.all(np.isfinite(x)) for x in u)
        assert np.all(np.isfinite(mu)) and np.all(lam > 0)


def test_bfloat16_params_keep_their_dtype():
    config = paper_config()
    psi = _perturbed_psi(config)
    to_bf16 = lambda seq: [jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in seq]  # noqa: E731
    outs, state = _trajectory(psi, config, K, to_bf16(PARAMS_SEQ), to_bf16(GRADS_SEQ), LOSSES)
    ref, _ = _run(psi, config)
    for t, (u, _) in enumerate(outs):
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
        for a, b in zip(_leaves(u), ref[t][0], strict=True):
            assert _cos(a, b) > 0.99
    assert _finite_tree(state)


def test_jit_matches_eager():
    config = paper_config()
    psi = _perturbed_psi(config)
    tx = l3rs.l3rs(psi, config, K)
    state = tx.init(PARAMS_SEQ[0])
    jitted, _ = _run(psi, config)
    for t in range(2):
        u, state = tx.update(GRADS_SEQ[t], state, PARAMS_SEQ[t], value=LOSSES[t])
        for a, b in zip(_leaves(u), jitted[t][0], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)


def test_vmap_over_a_batch_of_psi():
    config = paper_config()
    psis = [_perturbed_psi(config, scale=0.1, seed=s) for s in (0, 10, 20)]
    vectors = jnp.stack([l3rs.psi_to_vector(p) for p in psis])

    batched = [u for u, _ in _vtrajectory(psis[0], vectors, config)]
    for b, psi in enumerate(psis):
        one, _ = _run(psi, config)
        for t in range(3):
            for a, c in zip(_leaves(jax.tree.map(lambda x: x[b], batched[t])), one[t][0], strict=True):  # noqa: B023
                np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-10)
    assert _norm(np.concatenate([x.ravel() for x in _leaves(jax.tree.map(lambda x: x[0] - x[1], batched[0]))])) > 0


def test_one_compile_serves_every_horizon():
    config = paper_config()
    psi = _perturbed_psi(config)
    traces = 0

    @jax.jit
    def first_step(psi, total_steps, params, grads):
        nonlocal traces
        traces += 1
        tx = l3rs.l3rs(psi, config, total_steps)
        updates, state = tx.update(grads, tx.init(params), params, value=1.0)
        return updates, l3rs.layer_stats(state)["step_norm"]

    lams = [first_step(psi, k, PARAMS_SEQ[0], GRADS_SEQ[0])[1] for k in (10, 37, 100)]
    assert traces == 1
    assert not np.allclose(lams[0], lams[2])  # K really enters (absolute time features)
    static, _ = _run(psi, config, [PARAMS_SEQ[0]], [GRADS_SEQ[0]], [1.0], total_steps=37)
    np.testing.assert_allclose(lams[1], static[0][2], rtol=1e-6)


def _head_only(tree):
    return {key: key == "head" for key in tree}


@pytest.mark.parametrize("variant", ["embedding", "per_layer_mlp"])  # per-layer parts must follow the path
def test_masked_head_only_with_psi_built_on_all_layers(variant):
    config = paper_config(variant=variant)
    psi = _perturbed_psi(config)  # built for every layer
    full, _ = _run(psi, config)
    tx = optax.masked(l3rs.l3rs(psi, config, K), _head_only(PARAMS_SEQ[0]))
    state = tx.init(PARAMS_SEQ[0])
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for t in range(3):
        u, state = step(GRADS_SEQ[t], state, PARAMS_SEQ[t], LOSSES[t])
        for i, (path, x) in enumerate(_flat(u)):
            if path.startswith("head/"):  # per-layer: the head's update is the one it gets in a full run
                np.testing.assert_allclose(x, full[t][0][i], rtol=1e-5, atol=1e-10, err_msg=path)
            else:  # optax.masked passes the rest through untouched
                np.testing.assert_array_equal(x, _leaves(GRADS_SEQ[t])[i])


def test_multi_transform_head_only_training():
    config = paper_config()
    psi = _perturbed_psi(config)
    full, _ = _run(psi, config)
    labels = {key: "train" if key == "head" else "freeze" for key in PARAMS_SEQ[0]}
    tx = optax.multi_transform({"train": l3rs.l3rs(psi, config, K), "freeze": optax.set_to_zero()}, labels)
    state = tx.init(PARAMS_SEQ[0])
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for t in range(3):
        u, state = step(GRADS_SEQ[t], state, PARAMS_SEQ[t], LOSSES[t])
        for i, (path, x) in enumerate(_flat(u)):
            want = full[t][0][i] if path.startswith("head/") else 0.0
            np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-10, err_msg=path)


def test_state_round_trips_through_flax_serialization():
    config = paper_config()
    psi = _perturbed_psi(config)
    tx = l3rs.l3rs(psi, config, K)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    state = tx.init(PARAMS_SEQ[0])
    for t in range(2):
        _, state = step(GRADS_SEQ[t], state, PARAMS_SEQ[t], LOSSES[t])
    restored = flax.serialization.from_bytes(tx.init(PARAMS_SEQ[0]), flax.serialization.to_bytes(state))
    assert int(restored.count) == 2
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, restored)
    assert all(jax.tree.leaves(same))
    # Training continues identically.
    u1, _ = step(GRADS_SEQ[2], state, PARAMS_SEQ[2], LOSSES[2])
    u2, _ = step(GRADS_SEQ[2], restored, PARAMS_SEQ[2], LOSSES[2])
    for a, b in zip(_leaves(u1), _leaves(u2), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# ψ as a vector, layer matching, errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["embedding", "no_embedding", "per_layer_mlp", "global"])
def test_psi_vector_round_trip_and_shapes(variant):
    config = paper_config(variant=variant)
    psi = l3rs.init_psi(config, PARAMS_SEQ[0], jax.random.key(0))
    assert psi.layer_paths == PATHS == l3rs.layer_paths(PARAMS_SEQ[0])
    vec = l3rs.psi_to_vector(psi)
    assert vec.dtype == jnp.float32 and vec.shape == (l3rs.psi_size(psi),)
    back = l3rs.vector_to_psi(vec, psi)
    assert back.layer_paths == psi.layer_paths
    assert jax.tree.structure(back) == jax.tree.structure(psi)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(psi), strict=True):
        np.testing.assert_array_equal(a, b)
    # Size by hand: MLP F-32-16-(P+1), embeddings L×16 (embedding variant only), Adam's two logits.
    n_features = 42 if variant == "embedding" else 26
    mlp = (n_features * 32 + 32) + (32 * 16 + 16) + (16 * 3 + 3)
    layers = len(PATHS)
    expected = mlp * (layers if variant == "per_layer_mlp" else 1) + (16 * layers if variant == "embedding" else 0) + 2
    assert l3rs.psi_size(psi) == expected
    with pytest.raises(ValueError, match="vector_to_psi"):
        l3rs.vector_to_psi(vec[:-1], psi)


def test_global_variant_shares_one_lambda_and_the_global_norm_equals_it():
    config = paper_config(variant="global", directions=("adam",))
    got, _ = _run(_perturbed_psi(config, scale=0.1), config)
    for u, _, lam in got:
        assert np.ptp(lam) == 0.0
        total = np.sqrt(sum(np.sum(x**2) for x in u))
        assert total == pytest.approx(lam[0], rel=1e-5)
        assert max(_norm(x) for x in u) < lam[0] * (1 - 1e-3)  # no single layer gets the whole step


def test_layer_mismatch_is_a_clear_error():
    config = paper_config()
    psi = l3rs.init_psi(config, PARAMS_SEQ[0], jax.random.key(0))
    other = dict(PARAMS_SEQ[0], Dense_9={"kernel": jnp.ones((2, 2))})
    tx = l3rs.l3rs(psi, config, K)
    with pytest.raises(ValueError, match="Dense_9/kernel"):
        tx.init(other)
    with pytest.raises(ValueError, match="Dense_9/kernel"):
        tx.update(other, tx.init(PARAMS_SEQ[0]), other, value=1.0)


def test_missing_value_or_params_is_a_clear_error():
    config = paper_config()
    tx = l3rs.l3rs(l3rs.init_psi(config, PARAMS_SEQ[0], jax.random.key(0)), config, K)
    state = tx.init(PARAMS_SEQ[0])
    with pytest.raises(ValueError, match="value"):
        tx.update(GRADS_SEQ[0], state, PARAMS_SEQ[0])
    with pytest.raises(ValueError, match="params"):
        tx.update(GRADS_SEQ[0], state, value=1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"directions": ()}, "directions"),
        ({"directions": ("adam", "nadam")}, "directions"),
        ({"directions": ("adam", "adam")}, "directions"),
        ({"directions": "adam"}, "directions"),
        ({"variant": "local"}, "variant"),
        ({"hidden_sizes": (32, 0)}, "hidden_sizes"),
        ({"embedding_dim": -1}, "embedding_dim"),
        ({"ema_decays": (0.0, 1.0)}, "ema_decays"),
        ({"absolute_time_betas": (0.0, 0.1)}, "absolute_time_betas"),
        ({"init_lr": 0.0}, "init_lr"),
        ({"init_lr": float("nan")}, "init_lr"),
        ({"init_lr": "3e-3"}, "init_lr"),  # a quoted number in a TOML file
        ({"init_mixing": (0.5, 0.6)}, "init_mixing"),
        ({"init_mixing": (1.0,)}, "init_mixing"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        l3rs.L3RSConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_field():
    config = l3rs.L3RSConfig(directions=["adam", "lion"], hidden_sizes=[8, 8], variant="global", init_lr=1e-3)
    assert l3rs.L3RSConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="hidden_size"):
        l3rs.L3RSConfig.from_dict({"hidden_size": [8]})
