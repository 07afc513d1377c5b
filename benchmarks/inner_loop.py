"""ms/step of the compiled inner loop (K traced, batches gathered on device) over a plain jitted optax.adam step
called from Python, same model, batch size and machine, measured in the same run; and the compile count.

One CPU core (one worker per core is how the service runs on CPU). Last line: one JSON object.

    python benchmarks/inner_loop.py [--repeats 7] [--k 100]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The flags alone do not stop XLA:CPU's thread pool from using every core (see l3rs/cpu.py): pin to one core.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--k", type=int, default=100, help="steps per timed inner-loop run")
    parser.add_argument("--model", default="small_cnn")
    args = parser.parse_args()

    from l3rs.data import normalize
    from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, learned_optimizer_fn
    from l3rs.meta.tasks import TaskDistribution, load_task_pool, sample_task
    from l3rs.models import create, fresh_head, init_variables
    from l3rs.optim import L3RSConfig, init_psi, psi_to_vector

    dist = TaskDistribution("fashion_mnist_debian", "meta_train", num_classes=5, k_min=args.k, k_max=args.k)
    pool = load_task_pool(dist)
    task = sample_task(0, dist, pool)
    module = create(args.model, num_classes=5)
    variables = init_variables(module, jax.random.key(0), pool.train_images.shape[1:])

    # Baseline: the usual training step, jitted, called from Python once per step (data on device, same batches).
    params = fresh_head(variables["params"], jax.random.key(1), 5)
    tx = optax.adam(1e-3)
    images = jax.device_put(pool.train_images)

    @jax.jit
    def step(params, opt_state, idx, y):
        def loss_fn(p):
            logits = module.apply({"params": p}, normalize(images[idx]), train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def python_loop() -> float:
        p, s = params, tx.init(params)
        start = time.perf_counter()
        for i in range(args.k):
            p, s, loss = step(p, s, task.train_idx[i], task.train_y[i])
        jax.block_until_ready(loss)
        return (time.perf_counter() - start) / args.k

    adam_loop = InnerLoop(module, variables, pool, adam_optimizer_fn("constant"), num_classes=5)
    # The formulation we replaced: flax's nn.Conv (lax.conv) inside the loop; same parameters, same results.
    lax_loop = InnerLoop(create(args.model, num_classes=5, conv="lax"), variables, pool, adam_optimizer_fn("constant"),
                         num_classes=5)  # fmt: skip
    cfg = L3RSConfig()
    psi = init_psi(cfg, variables["params"], jax.random.key(0))
    l3rs_loop = InnerLoop(module, variables, pool, learned_optimizer_fn(cfg, psi), num_classes=5)
    psi_vec = np.asarray(psi_to_vector(psi))

    def compiled(loop, opt_params) -> float:
        start = time.perf_counter()
        jax.block_until_ready(loop.run_arrays(opt_params, task)["loss"])
        return (time.perf_counter() - start) / args.k

    # Warm up (compile) everything, and check that K is really traced: other K values must not recompile.
    python_loop()
    compiled(adam_loop, np.float32(1e-3))
    compiled(lax_loop, np.float32(1e-3))
    compiled(l3rs_loop, psi_vec)
    for k in (10, 37, args.k - 1):
        jax.block_until_ready(adam_loop.run_arrays(np.float32(1e-3), task, num_steps=k)["loss"])
        jax.block_until_ready(l3rs_loop.run_arrays(psi_vec, task, num_steps=k)["loss"])

    times: dict[str, list[float]] = {"python_adam": [], "loop_adam": [], "loop_l3rs": [], "loop_adam_lax_conv": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all three alike
        times["python_adam"].append(python_loop())
        times["loop_adam"].append(compiled(adam_loop, np.float32(1e-3)))
        times["loop_l3rs"].append(compiled(l3rs_loop, psi_vec))
        times["loop_adam_lax_conv"].append(compiled(lax_loop, np.float32(1e-3)))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "model": args.model,
        "batch_size": dist.batch_size,
        "k": args.k,
        "repeats": args.repeats,
        "ms_per_step_python_adam": round(med["python_adam"], 3),
        "ms_per_step_loop_adam": round(med["loop_adam"], 3),
        "ms_per_step_loop_l3rs": round(med["loop_l3rs"], 3),
        "ms_per_step_loop_adam_lax_conv": round(med["loop_adam_lax_conv"], 3),
        "lax_conv_over_im2col_in_loop": round(med["loop_adam_lax_conv"] / med["loop_adam"], 2),
        "step_time_ratio": round(med["loop_adam"] / med["python_adam"], 3),
        "l3rs_loop_over_python_adam": round(med["loop_l3rs"] / med["python_adam"], 3),
        "compiles": adam_loop.compiles,
        "compiles_l3rs": l3rs_loop.compiles,
        "k_values_run": [args.k, 10, 37, args.k - 1],
    }
    print(f"{'formulation':<38}{'ms/step':>10}")
    print(f"{'jitted adam step called from Python':<38}{med['python_adam']:>10.2f}")
    print(f"{'inner loop (fori_loop, K traced), adam':<38}{med['loop_adam']:>10.2f}")
    print(f"{'inner loop, L3RS(psi0)':<38}{med['loop_l3rs']:>10.2f}")
    print(f"{'inner loop, adam, nn.Conv (lax.conv)':<38}{med['loop_adam_lax_conv']:>10.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
