"""The inner loop (paper Fig. 1, left): K fine-tuning steps from θ0, then the loss on one evaluation batch.

One jitted function per (model, task pool, optimizer family): K is a traced loop bound (``lax.fori_loop`` with a
dynamic trip count), the task's batches are gathered by index from images resident on the device, and the
optimizer's own parameters (a ψ vector, an Adam learning rate, ...) are traced arguments. So one compile serves
every K, every task and every candidate ψ (``InnerLoop.compiles`` counts traces; tests check it stays 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l3rs.meta.tasks import Task, TaskPool

__all__ = [
    "OptimizerFn",
    "InnerLoop",
    "learned_optimizer_fn",
    "adam_optimizer_fn",
    "cosine_schedule",
    "head_only",
]

# (optimizer parameters, K) -> optax transformation. The parameters are traced: a ψ vector, a learning rate, ...
OptimizerFn = Callable[[Any, jax.Array], optax.GradientTransformationExtraArgs]


def learned_optimizer_fn(config, template) -> OptimizerFn:
    """A learned optimizer of any family whose meta-parameters arrive as a flat vector (NES candidates).

    ``config`` is the family config (``l3rs.L3RSConfig``, ...), ``template`` a meta-parameter pytree giving the
    structure (e.g. ``config.init(params, key)``).
    """
    from l3rs.optim import vector_to_meta

    def make(meta_vector: jax.Array, total_steps: jax.Array) -> optax.GradientTransformationExtraArgs:
        return config.build(vector_to_meta(meta_vector, template), total_steps)

    return make


def cosine_schedule(learning_rate: jax.Array, total_steps: jax.Array) -> optax.Schedule:
    """lr·½(1 + cos(π·min(k/K, 1))): cosine decay to 0 at K, with K traced (optax's own checks need a static K)."""

    def schedule(count: jax.Array) -> jax.Array:
        frac = jnp.minimum(count.astype(jnp.float32) / jnp.maximum(total_steps, 1).astype(jnp.float32), 1.0)
        return learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def adam_optimizer_fn(schedule: Literal["constant", "cosine"] = "constant") -> OptimizerFn:
    """Adam with a traced learning rate: constant, or cosine-decayed over the task's K (paper's baselines)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule: {schedule!r} must be 'constant' or 'cosine'.")

    def make(learning_rate: jax.Array, total_steps: jax.Array) -> optax.GradientTransformationExtraArgs:
        lr = cosine_schedule(learning_rate, total_steps) if schedule == "cosine" else learning_rate
        return optax.with_extra_args_support(optax.adam(lr))

    return make


def head_only(
    tx: optax.GradientTransformation, params: Any, head: str = "head"
) -> optax.GradientTransformationExtraArgs:
    """Trains only the classifier ``head`` (the layer at that path); every other layer is frozen."""
    from l3rs.models import head_mask

    labels = jax.tree.map(lambda m: "train" if m else "freeze", head_mask(params, head))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _split_variables(variables: dict[str, Any]) -> tuple[Any, Any]:
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state


class InnerLoop:
    """A compiled fine-tuning loop for one model, θ0 and task pool.

    Args:
      module: the flax model (``__call__(x, train)``; its classifier is ``head``).
      variables0: θ0 as flax variables (``params`` and, for BatchNorm models, ``batch_stats``).
      pool: the task images (kept on the default device as uint8).
      optimizer_fn: builds the optimizer from traced parameters (see :data:`OptimizerFn`).
      num_classes: N of the tasks (size of the fresh head).
      train_scope: ``"all"`` or ``"head"`` (head-only fine-tuning).
      vmap_candidates: if True, ``__call__`` takes a leading batch axis of optimizer parameters (several
        candidates on the same task, e.g. both members of an antithetic pair) and vmaps over it.
      head: path of the classifier layer in params (``model.head``).
    """

    def __init__(
        self,
        module: Any,
        variables0: dict[str, Any],
        pool: TaskPool,
        optimizer_fn: OptimizerFn,
        *,
        num_classes: int,
        train_scope: Literal["all", "head"] = "all",
        vmap_candidates: bool = False,
        head: str = "head",
    ) -> None:
        if train_scope not in ("all", "head"):
            raise ValueError(f"train_scope: {train_scope!r} must be 'all' or 'head'.")
        from l3rs.data import normalize
        from l3rs.models import fresh_head

        self.compiles = 0
        self._module = module
        self._normalize = normalize
        self._fresh_head = fresh_head
        self._num_classes = num_classes
        self._head = head
        self._train_scope = train_scope
        self._optimizer_fn = optimizer_fn
        self._variables0 = jax.device_put(variables0)
        self._train_images = jax.device_put(pool.train_images)
        self._eval_images = jax.device_put(pool.eval_images)
        run = self._run
        if vmap_candidates:
            run = jax.vmap(run, in_axes=(0,) + (None,) * 11)
        self._jitted = jax.jit(run)

    # ------------------------------------------------------------------------------------------------------------
    def _loss(self, params, model_state, x, y, train: bool):
        variables = {"params": params, **model_state}
        if train and model_state:
            logits, new_state = self._module.apply(variables, x, train=True, mutable=list(model_state))
        else:
            logits, new_state = self._module.apply(variables, x, train=train), model_state
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (new_state, logits)

    def _run(
        self,
        opt_params,
        variables0,
        train_images,
        eval_images,
        train_idx,
        train_y,
        eval_idx,
        eval_y,
        k,
        k_told,
        head_seed,
        eval_at,
    ):
        self.compiles += 1  # runs at trace time only
        params, model_state = _split_variables(variables0)
        params = self._fresh_head(params, jax.random.key(head_seed), self._num_classes, self._head)
        tx = self._optimizer_fn(opt_params, k_told)  # the horizon the optimizer is told; the loop runs k steps
        if self._train_scope == "head":
            tx = head_only(tx, params, self._head)
        opt_state = tx.init(params)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        x_eval = self._normalize(eval_images[eval_idx])

        def evaluate(params, model_state):
            loss, (_, logits) = self._loss(params, model_state, x_eval, eval_y, False)
            return loss, jnp.mean((jnp.argmax(logits, -1) == eval_y).astype(jnp.float32))

        def step(i, carry):
            params, model_state, opt_state, _, curve = carry
            x = self._normalize(train_images[train_idx[i]])
            (loss, (model_state, _)), grads = grad_fn(params, model_state, x, train_y[i], True)
            updates, opt_state = tx.update(grads, opt_state, params, value=loss)
            params = optax.apply_updates(params, updates)
            if eval_at.shape[0]:  # static: intermediate evaluations after eval_at[m] steps
                hit = eval_at == i + 1
                lo, acc = jax.lax.cond(
                    jnp.any(hit), evaluate, lambda *_: (jnp.float32(0), jnp.float32(0)), params, model_state
                )
                curve = (jnp.where(hit, lo, curve[0]), jnp.where(hit, acc, curve[1]))
            return params, model_state, opt_state, loss, curve

        m = eval_at.shape[0]
        curve0 = (jnp.full((m,), jnp.nan, jnp.float32), jnp.full((m,), jnp.nan, jnp.float32))
        init = (params, model_state, opt_state, jnp.zeros([], jnp.float32), curve0)
        params, model_state, opt_state, last_loss, curve = jax.lax.fori_loop(0, k, step, init)
        eval_loss, accuracy = evaluate(params, model_state)
        out = {"loss": eval_loss, "accuracy": accuracy, "train_loss": last_loss}
        if m:
            out.update(curve_loss=curve[0], curve_accuracy=curve[1])
        return out

    # ------------------------------------------------------------------------------------------------------------
    def run_arrays(
        self, opt_params: Any, task: Task, num_steps: int | None = None, eval_at: Any = (), *, variables0: Any = None
    ) -> dict[str, jax.Array]:
        """Runs one task (asynchronously dispatched).

        Args:
          opt_params: the optimizer's traced parameters (ψ vector, learning rate, ...).
          task: the task (its batches, eval batch and head seed). It runs ``task.num_steps`` steps with the
            optimizer told ``task.told_steps`` (more than the steps run for a task cut short).
          num_steps: overrides the task's K, both run and told (at most its number of batch rows).
          eval_at: step counts after which to also evaluate (``curve_loss``/``curve_accuracy`` in the result): one
            run of a K-independent optimizer (constant-LR Adam) then serves every K of a grid. Each distinct length
            of ``eval_at`` compiles once.
          variables0: another θ0 of the same shapes to start from (a task mixture's sources share this loop,
            ``l3rs.meta.mixture``); None = the loop's own.
        """
        k = task.num_steps if num_steps is None else num_steps
        if not 0 <= k <= task.train_idx.shape[0]:
            raise ValueError(f"num_steps: {k} outside [0, {task.train_idx.shape[0]}] for this task.")
        told = k if num_steps is not None or task.told_steps is None else task.told_steps
        eval_at = np.asarray(eval_at, np.int32).reshape(-1)
        return self._jitted(
            opt_params,
            self._variables0 if variables0 is None else variables0,
            self._train_images,
            self._eval_images,
            task.train_idx,
            task.train_y,
            task.eval_idx,
            task.eval_y,
            np.int32(k),
            np.int32(told),
            np.int32(task.head_seed),
            eval_at,
        )

    def __call__(
        self, opt_params: Any, task: Task, num_steps: int | None = None, eval_at: Any = (), *, variables0: Any = None
    ) -> dict[str, np.ndarray]:
        """Runs one task and returns numpy results: eval ``loss``, ``accuracy`` and the last ``train_loss``."""
        out = self.run_arrays(opt_params, task, num_steps, eval_at, variables0=variables0)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}
