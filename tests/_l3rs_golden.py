"""Golden L3RS updates computed with main's code before the edge-case changes (issue 12), for a bit-exact check.

``python tests/_l3rs_golden.py OUT.npz`` writes the file; run it with the *old* code on PYTHONPATH to regenerate.
Only public API that existed before the change is used, so the same function runs on both code versions.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import l3rs

try:  # code from issue 11 on: the golden updates are the original behaviour, which these fields' legacy values give
    from l3rs.optim.config import LEGACY_VALUES as ORIGINAL
except ImportError:  # the code the golden file was computed with had no such fields
    ORIGINAL = {}
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "norm": {"scale": (4,)}, "head": {"kernel": (4, 3)}}
STEPS = 6
HORIZON = 5  # one step past K, so the past-horizon path is covered too

CASES = {
    "default": {},
    "all_directions": {"directions": ("adam", "sgd", "lion", "lamb", "adamax", "weight_decay")},
    "global": {"variant": "global"},
    "per_layer_mlp": {"variant": "per_layer_mlp"},
    "no_skip": {"lambda_skip": False},
}


def _tree(rng: np.random.Generator, scale: float) -> dict:
    leaf = lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32)  # noqa: E731
    return {m: {n: leaf(s) for n, s in v.items()} for m, v in SHAPES.items()}


def golden_run(case: str) -> dict[str, np.ndarray]:
    """Updates, μ and λ of ``STEPS`` jitted updates of a perturbed ψ₀ on fixed inputs: {name: array}."""
    config = l3rs.L3RSConfig(**{**ORIGINAL, **CASES[case]})
    rng = np.random.default_rng(1234)
    params = _tree(rng, 1.0)
    psi0 = l3rs.init_psi(config, params, jax.random.key(7))
    vec = l3rs.psi_to_vector(psi0)
    psi = l3rs.vector_to_psi(vec + jnp.asarray(0.1 * rng.normal(size=vec.shape), jnp.float32), psi0)
    tx = l3rs.l3rs(psi, config, HORIZON)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    state = jax.jit(tx.init)(params)
    out = {}
    for t in range(STEPS):
        grads = _tree(rng, 0.3 / (t + 1))
        updates, state = step(grads, state, params, jnp.float32(2.0 / (t + 1)))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for i, u in enumerate(jax.tree.leaves(updates)):
            out[f"{case}/{t}/u{i}"] = np.asarray(u)
        out[f"{case}/{t}/mixing"] = np.asarray(state.mixing)
        out[f"{case}/{t}/step_norm"] = np.asarray(state.step_norm)
    return out


def golden_loop() -> dict[str, np.ndarray]:
    """Final params of ``STEPS`` default-config updates inside one jitted ``lax.fori_loop`` with in-graph gradients
    (as the meta-training inner loop runs them, where XLA may fuse the gradient with the base optimizers)."""
    config = l3rs.L3RSConfig(**ORIGINAL)
    rng = np.random.default_rng(99)
    params = _tree(rng, 1.0)
    target = _tree(rng, 1.0)
    psi0 = l3rs.init_psi(config, params, jax.random.key(3))
    vec = l3rs.psi_to_vector(psi0)
    psi = l3rs.vector_to_psi(vec + jnp.asarray(0.1 * rng.normal(size=vec.shape), jnp.float32), psi0)

    def loss_fn(p):
        sq = jax.tree.map(lambda a, b: jnp.sum(jnp.tanh(a - b) ** 2), p, target)
        return sum(jax.tree.leaves(sq))

    @jax.jit
    def run(psi, params, k):
        tx = l3rs.l3rs(psi, config, k)

        def step(i, carry):
            p, s = carry
            value, grads = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(grads, s, p, value=value)
            return jax.tree.map(lambda a, b: a + b, p, u), s

        return jax.lax.fori_loop(0, k, step, (params, tx.init(params)))[0]

    out = run(psi, params, jnp.int32(STEPS))
    return {f"loop/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(out))}


if __name__ == "__main__":
    arrays = golden_loop()
    for name in CASES:
        arrays.update(golden_run(name))
    np.savez(sys.argv[1], **arrays)
    print(len(arrays), "arrays written by", l3rs.__file__)
