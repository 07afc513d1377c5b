"""Per-step cost of L3RS, FC-LOpt and VeLO against optax.adam and optax.sgd on the default CNN, and the size of
each optimizer's state (paper Table 1: state bytes / parameter bytes; SGD 0, Adam 2.0×, L3RS 2.0×, VeLO more).

Goals (the issue): L3RS step time ≤ 1.10 × Adam's; optimizer state ≈ 2.0 × the parameters plus
a few scalars per layer. The learned baselines are measured in the same run with their default configs (what
``jobs/configs/baselines`` meta-trains), each at its ψ₀.

Measured in one run, on one CPU core, with the optimizers interleaved within each repeat; the median of
``--repeats`` runs of ``--steps`` steps each, for each optimizer:

  python  N training steps (forward + backward + optimizer update + apply), one jitted step per Python call;
  fori    the same N steps inside one jitted ``lax.fori_loop`` (how the meta-training inner loop runs);
  update  the optimizer update + apply alone, N times in a jitted ``fori_loop`` with fixed gradients.

Usage::

    python benchmarks/step_overhead.py [--repeats 7] [--steps 50] [--batch 64] [--model small_cnn]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

common.single_thread_cpu()  # before jax is imported

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import l3rs  # noqa: E402

NUM_CLASSES = 5
INPUT_SHAPE = (28, 28, 1)
BATCH_POOL = 8  # distinct batches on device, gathered by step index (as the inner loop does)

# ----------------------------------------------------------------------------------------------------
# The optimizers compared. To add one (e.g. VeLO), add a maker to OPTIMIZERS: it gets the model's
# params and K (total steps) and returns an optax transformation whose update is called as
# ``update(grads, state, params, value=loss)`` (wrap optimizers that want the loss under another
# name). BASELINE and SUBJECT name the pair of the goal ratio.
# ----------------------------------------------------------------------------------------------------
Maker = Callable[[Any, int], optax.GradientTransformationExtraArgs]


def make_adam(params: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(optax.adam(1e-3))


def make_sgd(params: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(optax.sgd(1e-2))


def make_l3rs(params: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
    config = l3rs.L3RSConfig()  # the default: Adam + SGD directions, embedding variant, ψ₀ ≈ Adam(3e-3)
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    return l3rs.l3rs(psi, config, total_steps)


def make_family(config: Any) -> Maker:
    """Any learned-optimizer family at its ψ₀ (``config.init``)."""

    def make(params: Any, total_steps: int) -> optax.GradientTransformationExtraArgs:
        return config.build(config.init(params, jax.random.key(0)), total_steps)

    return make


OPTIMIZERS: dict[str, Maker] = {
    "adam": make_adam,
    "sgd": make_sgd,
    "l3rs": make_l3rs,
    "fc_lopt": make_family(l3rs.FCLoptConfig()),
    "velo": make_family(l3rs.VeLOConfig()),
}
BASELINE, SUBJECT = "adam", "l3rs"
GOAL_STEP_TIME_RATIO = 1.10


# ----------------------------------------------------------------------------------------------------
def build_task(model_name: str, batch: int, seed: int = 0):
    """Model, params, other variables, synthetic batches on device (timings ignore the values)."""
    from l3rs.models import create, init_variables

    module = create(model_name, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(BATCH_POOL, batch, *INPUT_SHAPE)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(BATCH_POOL, batch)), jnp.int32)
    variables = dict(init_variables(module, jax.random.key(seed), INPUT_SHAPE))
    params = variables.pop("params")
    return module, params, variables, images, labels  # variables: other collections (e.g. batch_stats)


def make_loss(module):
    """(params, model_state, x, y) → (mean cross-entropy, new model_state)."""

    def loss_fn(params, model_state, x, y):
        if model_state:  # e.g. BatchNorm statistics, updated in the forward pass
            variables = {"params": params, **model_state}
            logits, new_state = module.apply(variables, x, train=True, mutable=list(model_state))
        else:
            logits, new_state = module.apply({"params": params}, x, train=True), model_state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    return loss_fn


def make_train_step(module, tx, images, labels):
    """((params, model_state, opt_state), step index) → (same, loss): forward + backward + update + apply."""
    grad_fn = jax.value_and_grad(make_loss(module), has_aux=True)

    def train_step(carry, i):
        params, model_state, opt_state = carry
        x, y = images[i % BATCH_POOL], labels[i % BATCH_POOL]
        (loss, model_state), grads = grad_fn(params, model_state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return (optax.apply_updates(params, updates), model_state, opt_state), loss

    return train_step


def make_runners(module, params, model_state, images, labels, tx, steps: int) -> dict[str, Callable[[], Any]]:
    """Callables that each run ``steps`` steps (or updates) from the same start and return the final carry."""
    train_step = make_train_step(module, tx, images, labels)
    carry0 = (params, model_state, tx.init(params))
    step = jax.jit(train_step)

    def python_loop():
        carry = carry0
        for i in range(steps):
            carry, _ = step(carry, i)
        return carry

    fori = jax.jit(lambda carry: jax.lax.fori_loop(0, steps, lambda i, c: train_step(c, i)[0], carry))

    # Update only: fixed gradients and loss, passed as arguments so XLA cannot fold them into constants.
    grad_fn = jax.jit(jax.value_and_grad(make_loss(module), has_aux=True))
    (loss, _), grads = grad_fn(params, model_state, images[0], labels[0])

    @jax.jit
    def updates_only(params, opt_state, grads, loss):
        def body(_, c):
            p, s = c
            u, s = tx.update(grads, s, p, value=loss)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps, body, (params, opt_state))

    return {
        "python": python_loop,
        "fori": lambda: fori(carry0),
        "update": lambda: updates_only(params, carry0[2], grads, loss),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per optimizer and mode (median)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed run (N)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="small_cnn", help="a name for l3rs.models.create")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"subset of {sorted(OPTIMIZERS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; known: {sorted(OPTIMIZERS)}")
    if args.repeats < 1 or args.steps < 1 or args.batch < 1:
        parser.error("--repeats, --steps and --batch must be positive")

    start = time.perf_counter()
    module, params, model_state, images, labels = build_task(args.model, args.batch)
    param_bytes = common.tree_bytes(params)
    num_layers = len(jax.tree.leaves(params))

    runners: dict[str, dict[str, Callable[[], Any]]] = {}
    state_bytes: dict[str, int] = {}
    compile_s: dict[str, float] = {}
    for name in names:
        tx = OPTIMIZERS[name](params, args.steps)
        state_bytes[name] = common.tree_bytes(tx.init(params))
        runners[name] = make_runners(module, params, model_state, images, labels, tx, args.steps)
        t0 = time.perf_counter()
        for fn in runners[name].values():  # compile + one warm-up run each
            common.block(fn())
        compile_s[name] = time.perf_counter() - t0
        print(f"compiled {name} in {compile_s[name]:.1f} s", file=sys.stderr, flush=True)

    timings: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for mode in ("python", "fori", "update"):
        times = common.median_times({n: runners[n][mode] for n in names}, args.repeats, warmup=0)
        for name in names:
            timings[name][mode] = times[name]

    ms = {n: {m: 1e3 * common.median(t) / args.steps for m, t in timings[n].items()} for n in names}
    noise = {n: {m: common.spread(t) for m, t in timings[n].items()} for n in names}
    rows = [
        {
            "optimizer": n,
            "ms/step python": ms[n]["python"],
            "ms/step fori": ms[n]["fori"],
            "ms/update": ms[n]["update"],
            f"python ×{BASELINE}": ms[n]["python"] / ms[BASELINE]["python"] if BASELINE in ms else float("nan"),
            f"update ×{BASELINE}": ms[n]["update"] / ms[BASELINE]["update"] if BASELINE in ms else float("nan"),
            "state/params": state_bytes[n] / param_bytes,
            "±% (python)": 100 * noise[n]["python"],
        }
        for n in names
    ]
    print(
        f"model {args.model}, batch {args.batch}, {num_layers} layers, {param_bytes / 1024:.1f} KiB params; "
        f"median of {args.repeats} × {args.steps} steps, 1 CPU core"
    )
    print(common.format_table(rows, list(rows[0])))

    result: dict[str, Any] = {
        "benchmark": "step_overhead",
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "num_layers": num_layers,
        "param_bytes": param_bytes,
        "ms_per_step": ms,
        "noise": noise,
        "compile_s": compile_s,
        "state_bytes": state_bytes,
        "wall_s": time.perf_counter() - start,
    }
    for name in names:
        result[f"state_ratio_{name}"] = state_bytes[name] / param_bytes
        if BASELINE in ms:
            result[f"step_time_ratio_{name}"] = ms[name]["python"] / ms[BASELINE]["python"]
    if BASELINE in ms and SUBJECT in ms:
        extra = state_bytes[SUBJECT] - 2 * param_bytes
        result.update(
            step_time_ratio=ms[SUBJECT]["python"] / ms[BASELINE]["python"],
            step_time_ratio_fori=ms[SUBJECT]["fori"] / ms[BASELINE]["fori"],
            update_time_ratio=ms[SUBJECT]["update"] / ms[BASELINE]["update"],
            # The step ratio the update costs imply (less noisy than timing whole steps on a shared CPU):
            # 1 + (extra update time) / (baseline step time).
            step_time_ratio_from_update=1.0 + (ms[SUBJECT]["update"] - ms[BASELINE]["update"]) / ms[BASELINE]["python"],
            state_ratio=state_bytes[SUBJECT] / param_bytes,
            state_bytes_beyond_2x_params=extra,
            state_scalars_beyond_2x_params_per_layer=extra / 4 / num_layers,
            goal_step_time_ratio=GOAL_STEP_TIME_RATIO,
        )
        result["step_time_goal_met"] = bool(result["step_time_ratio"] <= GOAL_STEP_TIME_RATIO)
    common.emit_json(result)
    return result


if __name__ == "__main__":
    main()
