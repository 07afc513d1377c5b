"""``l3rs demo``: the product's story on the embedded default data, on one machine.

Stage 1 of the demo (this version): pretrain θ0 on the pretrain classes, then fine-tune it on held-out tasks with
L3RS(ψ₀) and with Adam, and print both. Meta-training and the full evaluation are added by later stages.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

__all__ = ["run_demo"]


def _pretrained(cfg) -> Any:
    """θ0 of the config, pretraining it first if its checkpoint does not exist yet."""
    from l3rs import storage
    from l3rs.meta.pretrain import pretrain

    if not storage.exists(storage.join(cfg.model.checkpoint, "meta.json")):
        p = cfg.pretrain
        print(f"[demo] pretraining {cfg.model.name} on {cfg.data.dataset} ({p.steps} steps) -> {cfg.model.checkpoint}")
        pretrain(
            dataset=cfg.data.dataset,
            model_name=cfg.model.name,
            steps=p.steps,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            seed=p.seed,
            data_dir=cfg.data.data_dir or None,
            output=cfg.model.checkpoint,
        )
    else:
        print(f"[demo] using pretrained checkpoint {cfg.model.checkpoint}")


def run_demo(args, cfg) -> int:
    import jax

    from l3rs.meta.inner import InnerLoop, adam_optimizer_fn, l3rs_optimizer_fn
    from l3rs.meta.runner import initial_psi, load_theta0, model_for, task_distribution
    from l3rs.meta.tasks import load_task_pool, sample_task
    from l3rs.optim import psi_to_vector
    from l3rs.service.driver import resolve_paths

    start = time.perf_counter()
    cfg = resolve_paths(cfg)
    _pretrained(cfg)
    tasks = 3 if args.quick else 10
    dist = task_distribution(cfg, "meta_test")
    pool = load_task_pool(dist)
    variables0, _ = load_theta0(cfg)
    psi0 = initial_psi(cfg)
    module = model_for(cfg)
    l3rs_loop = InnerLoop(
        module, variables0, pool, l3rs_optimizer_fn(cfg.optimizer, psi0), num_classes=dist.num_classes
    )
    adam_loop = InnerLoop(module, variables0, pool, adam_optimizer_fn("constant"), num_classes=dist.num_classes)
    vec = np.asarray(psi_to_vector(psi0))
    rows = []
    for i in range(tasks):
        task = sample_task(10_000 + i, dist, pool)
        a = jax.device_get(l3rs_loop.run_arrays(vec, task))
        b = jax.device_get(adam_loop.run_arrays(np.float32(cfg.optimizer.init_lr), task))
        rows.append((task.num_steps, float(a["loss"]), float(a["accuracy"]), float(b["loss"]), float(b["accuracy"])))
        print(f"[demo] task {i + 1}/{tasks} K={task.num_steps}: L3RS(ψ₀) loss {a['loss']:.4f} acc "
              f"{100 * a['accuracy']:.1f}% | Adam({cfg.optimizer.init_lr:g}) loss {b['loss']:.4f} acc "
              f"{100 * b['accuracy']:.1f}%")  # fmt: skip
    arr = np.asarray(rows)
    summary = {
        "tasks": tasks,
        "l3rs_psi0": {"loss": float(arr[:, 1].mean()), "accuracy": float(arr[:, 2].mean())},
        "adam": {"lr": cfg.optimizer.init_lr, "loss": float(arr[:, 3].mean()), "accuracy": float(arr[:, 4].mean())},
        "seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0
