"""``l3rs demo``: the whole story on the embedded default data, on one machine.

1. pretrain θ0 (small CNN) on the 360 pretrain classes of ``glyphs`` (the offline many-class benchmark,
   :mod:`l3rs.data.glyphs`) and, for settings C/D, a second checkpoint on Fashion-MNIST classes 0–4;
2. meta-train ψ with NES on a local Ray cluster (loopback only; dashboard at http://127.0.0.1:8265), one
   single-threaded worker per core;
3. meta-test ψ against the Adam baselines (settings A–E, paper §5), both cores: in-domain tasks on the 180 meta-test
   glyph classes, which neither pretraining nor meta-training saw (the paper's three-way split), and Fashion-MNIST
   classes 5–9 out of domain;
4. print the in-domain table and the speedup, and where the report, plots and ψ artifact are.

Every stage is resumable: running the demo again reuses the checkpoints and the finished meta-training run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

__all__ = ["run_demo", "demo_config", "GLYPHS", "DEMO", "QUICK", "OTHER_PRETRAIN"]

# The embedded benchmark (= jobs/configs/glyphs_default.toml): 720 glyph classes split 360 / 180 / 180 into pretrain,
# meta-train and meta-test classes, pairwise disjoint (paper §5). Eval batches hold all 20 validation (meta-training)
# or test (meta-test) images of the task's 5 classes. Settings B-D: Fashion-MNIST (same 28x28x1 input), its classes
# 5-9 for tasks and a checkpoint pretrained on its classes 0-4 (``OTHER_PRETRAIN``).
GLYPHS = {
    "run": {"name": "glyphs-default"},
    "data": {"dataset": "glyphs"},
    "task": {"eval_batch_size": 100},
    "nes": {"weight_decay": 1.0, "weight_decay_toward": "psi0"},  # the pull toward ψ₀ (docs/anchor)
    "pretrain": {"steps": 3000, "learning_rate": 3e-3, "output": "runs/pretrain-glyphs"},
    "model": {"checkpoint": "runs/pretrain-glyphs"},
    "evaluate": {"other_dataset": "fashion_mnist_debian", "other_checkpoint": "runs/pretrain-fmnist"},
}
# The other checkpoint's pretraining: `l3rs pretrain`'s defaults for Fashion-MNIST (= runs/pretrain-fmnist).
OTHER_PRETRAIN = {"steps": 1500, "learning_rate": 1e-3}

# The demo's budget: <= 30 minutes on 2 CPU cores (18.7 to 26.9 min measured on idle machines, README "Time").
# Meta-training: NES population 16 (8 antithetic pairs), meta-batch 2, K ~ U[10, 100] (the embedded default),
# 100 generations, 2 single-core workers (2-22 s per generation, 7-10 min). Evaluation (10-15 min): 16 held-out tasks
# per setting A-E, K in {10, 25, 50, 100, 200}, Adam constant and cosine at 5 learning rates (3e-2 ... 3e-4, the best
# one inside), two processes. Head-only baselines are left to `l3rs evaluate` (they nearly double the evaluation).
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


def demo_config(cfg: Any, *, out: str, embedded: bool, quick: bool = False) -> Any:
    """The demo's run config: ``cfg`` (the embedded default when ``embedded``, which then becomes the glyphs benchmark
    with the demo's budget, :data:`GLYPHS` and :data:`DEMO`), ``QUICK``-sized when ``quick``, with the run and the
    checkpoints that sit in their default places (``runs/X``) moved under ``out``, paths resolved."""
    from l3rs.config import EvaluateSection, ModelSection
    from l3rs.service.driver import resolve_paths

    if embedded:
        cfg = cfg.replace(**GLYPHS).replace(**DEMO)
    if quick:
        cfg = cfg.replace(**{k: v for k, v in QUICK.items() if k != "pretrain"})
    moved: dict[str, Any] = {"run": {"storage": out}}
    for section, default in (("model", ModelSection()), ("evaluate", EvaluateSection())):
        field = "checkpoint" if section == "model" else "other_checkpoint"
        uri = getattr(getattr(cfg, section), field)
        if uri in (getattr(default, field), GLYPHS[section][field]):
            moved[section] = {field: os.path.join(out, os.path.basename(uri))}
    return resolve_paths(cfg.replace(**moved))


def run_demo(args: Any, cfg: Any) -> int:
    from l3rs.meta.evaluate import run_evaluation
    from l3rs.service.driver import Driver, resolve_paths
    from l3rs.service.raycluster import init_local

    start = time.perf_counter()
    out = os.path.abspath(args.out)
    cfg = demo_config(cfg, out=out, embedded=not args.config and not args.set, quick=args.quick)
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
        if ev.other_dataset == GLYPHS["evaluate"]["other_dataset"]:
            other_p = dataclasses.replace(cfg.pretrain, **OTHER_PRETRAIN)
        else:
            other_p = dataclasses.replace(cfg.pretrain, steps=max(cfg.pretrain.steps // 3, 100))
        _pretrain_if_missing(ev.other_dataset, cfg.model.name, other.model.checkpoint, other_p, quick_steps)

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
