"""Issue 11 part 3: trace a learned L3RS ψ on held-out tasks, per step: per-layer λ, the loss feature and the
Adam-equivalent ratio λ / (lr₀·‖d_adam‖), with the stability options switched on one at a time.

    python benchmarks/stability_trace.py --psi tests/data/psi_v0_fmnist --theta0 runs/pretrain-fmnist \
        --dataset sklearn_digits --steps 200 --tasks 2

Prints one JSON line per (task, variant); the last line is a summary. Numbers are recorded in NOTES-stable.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import l3rs
from l3rs.artifact import load_psi
from l3rs.data import normalize
from l3rs.meta.evaluate import eval_task_seed
from l3rs.meta.pretrain import load_variables
from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task
from l3rs.models import create, fresh_head


def trace(psi, config, module, variables0, pool, task, steps, num_classes):
    model_state = {k: v for k, v in variables0.items() if k != "params"}
    timgs, eimgs = jax.device_put(pool.train_images), jax.device_put(pool.eval_images)

    def loss_fn(params, x, y):
        variables = {"params": params, **model_state}
        if model_state:
            logits, _ = module.apply(variables, x, train=True, mutable=list(model_state))
        else:
            logits = module.apply(variables, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    tx = l3rs.l3rs(psi, config, steps)
    params = fresh_head(variables0["params"], jax.random.key(task.head_seed), num_classes)
    state = tx.init(params)
    hp = psi.hparams["adam"]
    b1, b2 = jax.nn.sigmoid(hp["b1"]), jax.nn.sigmoid(hp["b2"])
    gammas = jnp.asarray(config.ema_decays, jnp.float32)

    @jax.jit
    def step(params, state, idx, y):
        (value, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, normalize(timgs[idx]), y)
        upd, state = tx.update(grads, state, params, value=value)
        adam = state.base_states[0][0]  # "adam" = chain(scale_by_adam, scale(-1))
        c = adam.count.astype(jnp.float32)
        d = jax.tree.map(lambda m, v: (m / (1 - b1**c)) / (jnp.sqrt(v / (1 - b2**c)) + 1e-8), adam.mu, adam.nu)
        norm_d = jnp.stack([jnp.linalg.norm(x) for x in jax.tree.leaves(d)])
        ratio = state.step_norm / (config.init_lr * norm_d)
        corr = jnp.where(state.loss_count > 0, 1 - gammas ** state.loss_count.astype(jnp.float32), 1.0)
        return optax.apply_updates(params, upd), state, value, state.step_norm, ratio, state.ema_loss / corr

    rows = []
    for k in range(steps):
        params, state, value, lam, ratio, loss_feature = step(params, state, task.train_idx[k], task.train_y[k])
        rows.append((float(value), np.asarray(lam), np.asarray(ratio), np.asarray(loss_feature)))
    _, logits = loss_fn(params, normalize(eimgs[task.eval_idx]), task.eval_y)
    out = {"eval_accuracy": float((np.asarray(logits).argmax(-1) == task.eval_y).mean())}
    for k in [x for x in (10, 25, 50, 75, 100, 150, 200, 500) if x <= steps]:
        value, lam, ratio, loss_feature = rows[k - 1]
        out[f"k{k}"] = {
            "train_loss": value,
            "max_lambda": float(np.nanmax(lam)),
            "max_adam_ratio": float(np.nanmax(ratio)),
            "loss_feature": [float(x) for x in loss_feature],
        }
    out["max_lambda"] = float(np.nanmax([r[1] for r in rows]))
    out["max_adam_ratio"] = float(np.nanmax([r[2] for r in rows]))
    out["non_finite_loss"] = bool(not np.all(np.isfinite([r[0] for r in rows])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--psi", default="tests/data/psi_v0_fmnist")  # the first release's Fashion-MNIST ψ
    ap.add_argument("--theta0", required=True, help="θ0 checkpoint folder (l3rs pretrain)")
    ap.add_argument("--dataset", default="sklearn_digits")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--steps", type=int, default=200, help="steps run = K told")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--stream", default="B", help="evaluation seed stream (setting name)")
    ap.add_argument("--bounds", default="10,3", help="lambda_max_adam_ratio values to try")
    args = ap.parse_args()

    psi, config, meta = load_psi(args.psi)
    num_classes = int(meta.get("num_classes", 5))
    variables0, _ = load_variables(args.theta0)
    module = create(meta.get("model", "small_cnn"), num_classes=num_classes)
    dist = TaskDistribution(args.dataset, "meta_test", num_classes, 64, 256, args.steps, args.steps, args.data_dir)
    pool = load_task_pool(dist)
    psi0_config = l3rs.L3RSConfig()
    psi0 = l3rs.init_psi(psi0_config, variables0["params"], jax.random.key(0))
    k_max = (meta.get("k_range") or [None, None])[1]
    variants = [("shipped ψ", psi, config)]
    for c in [float(x) for x in args.bounds.split(",") if x]:
        variants.append((f"ψ, lambda_max_adam_ratio={c:g}", psi, dataclasses.replace(config, lambda_max_adam_ratio=c)))
    if k_max:
        variants.append(
            (f"ψ, absolute_time_k_max={k_max}", psi, dataclasses.replace(config, absolute_time_k_max=k_max))
        )
    variants += [
        ("ψ₀", psi0, psi0_config),
        ("ψ₀, relative", psi0, dataclasses.replace(psi0_config, feature_scale="relative")),
    ]
    summary = {}
    for i in range(args.tasks):
        task = sample_task(eval_task_seed(0, 2024, args.stream, i), dist, pool)
        for name, p, c in variants:
            out = trace(p, c, module, variables0, pool, task, args.steps, num_classes)
            print(json.dumps({"task": i, "optimizer": name, **out}), flush=True)
            summary.setdefault(name, []).append(out["eval_accuracy"])
    print(json.dumps({"summary_eval_accuracy": summary}))


if __name__ == "__main__":
    main()
