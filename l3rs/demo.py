"""``l3rs demo``: the whole story on the embedded default data, on one machine.

1. pretrain θ0 (small CNN, Fashion-MNIST classes 0–4) and, for settings C/D, a second checkpoint on scikit-learn's
   digits (classes 0–4);
2. meta-train ψ with NES on a local Ray cluster (loopback only; dashboard at http://127.0.0.1:8265), one
   single-threaded worker per core;
3. meta-test ψ against the Adam baselines on held-out tasks (settings A–E, paper §5), both cores;
4. print the in-domain table and the speedup, and where the report, plots and ψ artifact are.

Every stage is resumable: running the demo again reuses the checkpoints and the finished meta-training run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

__all__ = ["run_demo", "DEMO", "QUICK"]

# The demo's budget: <= 30 minutes on 2 CPU cores (measured: see README). Meta-training gets ~half of it:
# NES population 16 (8 antithetic pairs), meta-batch 2, K ~ U[10, 100] (the embedded default), 100 generations,
# 2 single-core workers (~6 s per generation). Evaluation gets the rest: 16 held-out tasks per setting A-E,
# K in {10, 25, 50, 100, 200}, Adam constant and cosine at 5 learning rates (3e-2 ... 3e-4, the best one inside),
# two processes. Head-only baselines are left to `l3rs evaluate` (they nearly double the evaluation).
DEMO = {
    "nes": {"generations": 100},
    "evaluate": {"tasks": 16, "adam_lrs": [3e-2, 1e-2, 3e-3, 1e-3, 3e-4], "head_only_baselines": False},
}

# `--quick`: a few-minute smoke version of the same pipeline (CI-sized; numbers are not meaningful).
QUICK = {
    "pretrain": {"steps": 300},
    "nes": {"generations": 3, "population_size": 8},
    "evaluate": {"tasks": 3, "k_grid": [10, 50, 200], "adam_lrs": [1e-2, 1e-3]},
}


def _pretrain_if_missing(dataset: str, model: str, output: str, p: Any, steps: int | None = None) -> None:
    from l3rs.meta.pretrain import ensure_pretrained

    steps = steps or p.steps
    print(f"[demo] checkpoint {output}: pretraining {model} on {dataset} ({steps} steps) unless it exists", flush=True)
    meta = ensure_pretrained(dataset=dataset, model_name=model, output=output, steps=steps, batch_size=p.batch_size,
                             learning_rate=p.learning_rate, seed=p.seed)  # fmt: skip
    if meta is None:
        print(f"[demo]   found: {output}", flush=True)
    else:
        print(f"[demo]   test accuracy on the pretrain classes: {100 * meta['test_accuracy']:.1f}%", flush=True)


def _stage(name: str, start: float) -> None:
    print(f"[demo] === {name} (t = {time.perf_counter() - start:.0f} s) ===", flush=True)


def run_demo(args: Any, cfg: Any) -> int:
    from l3rs.config import EvaluateSection, ModelSection
    from l3rs.meta.evaluate import run_evaluation
    from l3rs.service.driver import Driver, resolve_paths
    from l3rs.service.raycluster import init_local

    start = time.perf_counter()
    out = os.path.abspath(args.out)
    if not args.config and not args.set:  # the embedded default: the demo's budget choices (see DEMO)
        cfg = cfg.replace(**DEMO)
    if args.quick:
        cfg = cfg.replace(**{k: v for k, v in QUICK.items() if k != "pretrain"})
    # The demo keeps its run and checkpoints under --out, unless the config names other places.
    moved: dict[str, Any] = {"run": {"storage": out}}
    if cfg.model.checkpoint == ModelSection().checkpoint:
        moved["model"] = {"checkpoint": os.path.join(out, "pretrain-fmnist")}
    if cfg.evaluate.other_checkpoint == EvaluateSection().other_checkpoint:
        moved["evaluate"] = {"other_checkpoint": os.path.join(out, "pretrain-digits")}
    cfg = resolve_paths(cfg.replace(**moved))
    print(
        f"[demo] meta-training: population {cfg.nes.population_size}, meta-batch {cfg.nes.meta_batch_size}, "
        f"K ~ U[{cfg.task.k_min}, {cfg.task.k_max}], {cfg.nes.generations} generations, "
        f"{cfg.workers.max_workers} workers; evaluation: {cfg.evaluate.tasks} tasks x settings "
        f"{''.join(cfg.evaluate.settings)}, K in {list(cfg.evaluate.k_grid)}",
        flush=True,
    )

    _stage("1/4 pretrain", start)
    quick_steps = QUICK["pretrain"]["steps"] if args.quick else None
    _pretrain_if_missing(cfg.data.dataset, cfg.model.name, cfg.model.checkpoint, cfg.pretrain, quick_steps)
    ev = cfg.evaluate
    if {"C", "D"} & set(ev.settings):
        # Setting C/D's checkpoint: the same architecture pretrained on the other dataset's pretrain classes.
        other = resolve_paths(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=ev.other_checkpoint))
        )
        _pretrain_if_missing(ev.other_dataset, cfg.model.name, other.model.checkpoint, cfg.pretrain,
                             quick_steps or max(cfg.pretrain.steps // 3, 100))  # fmt: skip

    _stage("2/4 meta-train on a local Ray cluster", start)
    import ray

    w = cfg.workers
    num_cpus = max(int(w.max_workers * w.resources.get("CPU", 1)), 1)
    ctx = init_local(num_cpus=num_cpus, include_dashboard=not args.no_dashboard)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(f"[demo] Ray dashboard: http://{url}  (jobs, actors, metrics)", flush=True)
    try:
        result = Driver(cfg).run()
    finally:
        ray.shutdown()  # frees both cores for the evaluation
    print(f"[demo] ψ artifact: {result.psi_uri} (sha256 {result.psi_sha256[:12]}…)", flush=True)

    _stage("3/4 meta-test against Adam baselines", start)
    report_dir = os.path.join(out, "report")
    report = run_evaluation(cfg, [result.psi_uri], out=report_dir, progress=True,
                            history=os.path.join(result.run_dir, "history.jsonl"))  # fmt: skip

    _stage("4/4 summary", start)
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "run_dir": result.run_dir,
        "psi": result.psi_uri,
        "psi_sha256": result.psi_sha256,
        "generations": result.generations,
        "report": os.path.join(report_dir, "report.md"),
        "report_json": os.path.join(report_dir, "report.json"),
        "plots": sorted(os.path.join(report_dir, f) for k, f in report["files"].items() if f.endswith(".png")),
        "meta_training_plot": os.path.join(result.run_dir, "plots", "meta_training.png"),
    }
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    from l3rs.report import summary_text

    print(summary_text(report), flush=True)
    print(json.dumps(summary, indent=2), flush=True)
    print(f"[demo] done in {summary['seconds'] / 60:.1f} min", flush=True)
    return 0
