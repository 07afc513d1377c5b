"""Fig. 4 of the paper: L3RS's mixing coefficients μ and step sizes λ of every layer over one fine-tuning run."""

from __future__ import annotations

from typing import Any

import numpy as np

from l3rs.config import Config
from l3rs.meta.eval_optimizers import OptimizerSpec
from l3rs.meta.settings import eval_distribution, eval_task_seed, setting_spec

__all__ = ["trace_layer_stats"]


def trace_layer_stats(
    cfg: Config, optimizer: OptimizerSpec, *, num_steps: int = 100, setting: str = "A"
) -> dict[str, Any]:
    """Fine-tunes one evaluation task of ``setting`` for ``num_steps`` steps with L3RS and records, after every step,
    the mixing coefficients μ ([L, P]) and step sizes λ ([L]) of every layer (``l3rs.optim.layer_stats``; paper
    Fig. 4, a 100-step run).

    Returns numpy arrays: ``mixing`` [steps, L, P], ``step_norm`` [steps, L], ``train_loss`` [steps], and
    ``layer_paths``, ``directions``, ``eval_accuracy`` (after the run), ``task_seed``, ``optimizer``.
    """
    import jax
    import optax

    from l3rs.data import normalize
    from l3rs.meta.inner import head_only
    from l3rs.meta.runner import load_theta0, model_for
    from l3rs.meta.tasks import load_task_pool, sample_task
    from l3rs.models import fresh_head, head_mask
    from l3rs.optim import L3RSState, l3rs, layer_paths, layer_stats

    if optimizer.kind != "learned" or optimizer.config.family != "l3rs":
        raise ValueError(f"trace_layer_stats: {optimizer.name!r} is not an L3RS optimizer.")
    spec = setting_spec(cfg, setting)
    dist = eval_distribution(cfg, spec.dataset, num_steps)
    pool = load_task_pool(dist)
    seed = eval_task_seed(cfg.run.seed, cfg.evaluate.seed, f"fig4-{setting}", 0)
    task = sample_task(seed, dist, pool)
    variables0, _ = load_theta0(cfg, spec.checkpoint)
    module = model_for(cfg)
    params = fresh_head(variables0["params"], jax.random.key(task.head_seed), cfg.task.num_classes, cfg.model.head)
    model_state = {k: v for k, v in variables0.items() if k != "params"}
    tx = l3rs(optimizer.psi, optimizer.config, num_steps)
    paths = list(layer_paths(params))
    if optimizer.train_scope == "head":
        mask = jax.tree.leaves(head_mask(params, cfg.model.head))
        paths = [p for p, m in zip(paths, mask, strict=True) if m]
        tx = head_only(tx, params, cfg.model.head)
    opt_state = tx.init(params)
    train_images, eval_images = jax.device_put(pool.train_images), jax.device_put(pool.eval_images)

    def loss_fn(params, model_state, x, y, train):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, new_state = module.apply(variables, x, train=True, mutable=list(model_state))
        else:
            logits, new_state = module.apply(variables, x, train=train), model_state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new_state, logits)

    def l3rs_state(state):
        found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, L3RSState)) if
                 isinstance(s, L3RSState)]  # fmt: skip
        return found[0]

    # The images are arguments, not closed-over constants (jit would embed the whole pool into the program).
    @jax.jit
    def step(params, model_state, opt_state, idx, y, train_images):
        x = normalize(train_images[idx])
        (value, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y, True)
        updates, opt_state = tx.update(grads, opt_state, params, value=value)
        return optax.apply_updates(params, updates), model_state, opt_state, value, layer_stats(l3rs_state(opt_state))

    @jax.jit
    def accuracy(params, model_state, x, y):
        _, (_, logits) = loss_fn(params, model_state, normalize(x), y, False)
        return (logits.argmax(-1) == y).mean()

    mixing, step_norm, losses = [], [], []
    for k in range(num_steps):
        params, model_state, opt_state, value, stats = step(
            params, model_state, opt_state, task.train_idx[k], task.train_y[k], train_images
        )
        mixing.append(stats["mixing"])
        step_norm.append(stats["step_norm"])
        losses.append(value)
    mixing, step_norm, losses = jax.device_get((mixing, step_norm, losses))
    return {
        "optimizer": optimizer.name,
        "setting": setting,
        "task_seed": int(seed),
        "num_steps": int(num_steps),
        "layer_paths": paths,
        "directions": list(optimizer.config.direction_names),
        "mixing": np.asarray(mixing, np.float64),
        "step_norm": np.asarray(step_norm, np.float64),
        "train_loss": np.asarray(losses, np.float64),
        "eval_accuracy": float(accuracy(params, model_state, eval_images[task.eval_idx], task.eval_y)),
    }
