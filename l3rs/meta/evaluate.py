"""Meta-evaluation (paper §5 "Meta-Evaluation and Baselines", Fig. 3 A–F, Fig. 4, Appendix C Tables 5–10): the entry
point that runs it and writes the report.

For ψ artifacts (and ψ₀, the untrained start of meta-training, as a reference), :func:`run_evaluation` draws
evaluation tasks per setting from the setting dataset's meta-test classes, fine-tunes for every K of
``evaluate.k_grid`` with every optimizer on the same tasks (common random numbers), and writes ``report.md``,
``report.csv``, ``report.json`` and figures (:mod:`l3rs.report`). "Best Adam" is, per K, the Adam variant (schedule,
scope, learning rate) with the highest mean accuracy: a per-K oracle tuning of the baseline, the paper's choice.

The parts, one module each, in the order they are used:

- :mod:`l3rs.meta.settings`: settings A–E (θ0 and task dataset of each), their task seeds and task distribution;
- :mod:`l3rs.meta.eval_optimizers`: the rows under test (artifacts, ψ₀, Adam baselines);
- :mod:`l3rs.meta.provenance`: which classes θ0, meta-training and the evaluation tasks used, per setting;
- :mod:`l3rs.meta.eval_setting`: the work, one setting (or a shard of its tasks) at a time;
- :mod:`l3rs.meta.eval_pool`: where that work runs (this process or a spawn pool);
- :mod:`l3rs.meta.eval_journal`: the finished tasks, kept under ``<out>/tasks`` so a stopped evaluation resumes;
- :mod:`l3rs.meta.trace`: Fig. 4's λ and μ per layer over one run;
- :mod:`l3rs.meta.stats`: means, standard errors, best Adam, wins and Fig. 3 F's speedups.

The names below are re-exported from those modules, so ``from l3rs.meta.evaluate import ...`` keeps working.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from l3rs import storage
from l3rs.config import Config, ConfigError
from l3rs.meta.eval_journal import TaskJournal
from l3rs.meta.eval_optimizers import (
    Artifact,
    OptimizerSpec,
    artifact_label,
    build_optimizers,
    format_lr,
    load_artifacts,
    model_params_shapes,
    velo_og_artifacts,
)
from l3rs.meta.eval_pool import run_in_process, run_pool
from l3rs.meta.eval_setting import SettingResult, clear_runners, evaluate_setting, merge_results
from l3rs.meta.provenance import classes_for_setting
from l3rs.meta.settings import (
    SETTINGS,
    SettingSpec,
    absolute_uri,
    eval_distribution,
    eval_task_seed,
    eval_task_seeds,
    plan_settings,
    setting_spec,
)
from l3rs.meta.stats import (
    BEST_ADAM,
    best_per_k,
    interp_steps,
    mean_std,
    speedup_table,
    standard_error,
    summarize_setting,
    win_counts,
)
from l3rs.meta.trace import trace_layer_stats
from l3rs.names import display_uri
from l3rs.report import build_report, summary_text, write_report

__all__ = [
    "SETTINGS",
    "BEST_ADAM",
    "SettingSpec",
    "OptimizerSpec",
    "Artifact",
    "SettingResult",
    "eval_task_seed",
    "eval_task_seeds",
    "eval_distribution",
    "setting_spec",
    "plan_settings",
    "load_artifacts",
    "artifact_label",
    "velo_og_artifacts",
    "model_params_shapes",
    "format_lr",
    "build_optimizers",
    "evaluate_setting",
    "merge_results",
    "clear_runners",
    "trace_layer_stats",
    "mean_std",
    "standard_error",
    "best_per_k",
    "interp_steps",
    "speedup_table",
    "win_counts",
    "summarize_setting",
    "run_evaluation",
    "run_evaluation_cli",
]


def _find_history(psi_dirs: Sequence[str]) -> str | None:
    """The run's ``history.jsonl`` next to the first artifact (``<run>/psi`` → ``<run>/history.jsonl``)."""
    if not psi_dirs:
        return None
    uri = psi_dirs[0].rstrip("/")
    run_dir = uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(uri)
    candidate = storage.join(run_dir, "history.jsonl")
    return candidate if storage.exists(candidate) else None


def _steps_per_task(cfg: Config, num_optimizers: Mapping[str, int]) -> int:
    """Training steps per task: L3RS and Adam (cosine) run every K; Adam (const) runs once to the largest K."""
    ks = cfg.evaluate.k_grid
    return num_optimizers.get("per_k", 0) * sum(ks) + num_optimizers.get("once", 0) * max(ks)


def run_evaluation(
    cfg: Config,
    psi_dirs: Sequence[str],
    *,
    out: str,
    tasks: int | None = None,
    settings: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    history: str | None = None,
    velo_og: str | None = None,
) -> dict[str, Any]:
    """Meta-evaluates ψ artifacts against Adam baselines and writes the report (``report.md``, ``report.csv``,
    ``report.json``, figures) to ``out``.

    Resumable: each finished task is stored under ``<out>/tasks`` (:mod:`l3rs.meta.eval_journal`), so the same call
    after an interruption, with more ``tasks`` or with another artifact beside the same baselines, runs only the
    tasks and rows not yet done; the report is the same as an uninterrupted one's.

    Args:
      cfg: the validated config (``evaluate`` section: k_grid, adam_lrs, settings, other dataset/checkpoint).
      psi_dirs: ψ artifact folders (may be empty: then only ψ₀ of ``cfg.optimizer`` and the baselines).
      out: report folder (local path or URI).
      tasks: tasks per setting (default ``evaluate.tasks``).
      settings: subset of "ABCDE" (default ``evaluate.settings``). A setting whose other checkpoint is missing is
        skipped with a message; a missing in-domain checkpoint is an error.
      workers: processes (default ``evaluate.workers`` where the config has it, else ``os.cpu_count()``); 1 runs
        in this process. More start ``spawn`` processes
        (CPU, single-threaded XLA, a shared persistent compilation cache: ``JAX_COMPILATION_CACHE_DIR`` if set,
        else a temporary one), which re-import the caller's main module: call this under
        ``if __name__ == "__main__":`` in a script.
      progress: tqdm bars per setting.
      history: the run's ``history.jsonl`` (default: next to the first artifact, if there).
      velo_og: a downloaded VeLO checkpoint (learned_optimization ``hyper_v2`` format): adds the rows "VeLO (og)"
        and "VeLO (og, head)" (:func:`velo_og_artifacts`).

    Returns:
      The report dict (what ``report.json`` holds).
    """
    start = time.perf_counter()
    cfg = cfg.validate()
    num_tasks = int(tasks if tasks is not None else cfg.evaluate.tasks)
    if num_tasks < 1:
        raise ConfigError(f"evaluate.tasks: must be >= 1, got {num_tasks}.")
    if workers is None:  # an ``evaluate.workers`` config field (if the config has one; 0 = one per core)
        workers = getattr(cfg.evaluate, "workers", 0) or os.cpu_count() or 1
    workers = int(workers)
    psi_dirs = [absolute_uri(p) for p in psi_dirs]
    artifacts = load_artifacts(psi_dirs)
    if velo_og:
        artifacts += velo_og_artifacts(velo_og)
    optimizers = build_optimizers(cfg, artifacts)
    named = [(a.label, a.meta, display_uri(a.uri, root=cfg.run.storage)) for a in artifacts]
    specs, skipped = plan_settings(cfg, settings)
    for message in skipped.values():
        print(f"l3rs evaluate: {message}", file=sys.stderr)
    # Which classes θ0, meta-training and the tasks used, per setting: read before any work, stated in the report.
    classes = {
        s.name: classes_for_setting(
            s, cfg.task.num_classes, named, root=cfg.run.storage, dataset_spec=cfg.data.spec(s.dataset)
        )
        for s in specs
    }
    seeds = {s.name: eval_task_seeds(cfg, s.name, num_tasks) for s in specs}
    history = history if history is not None else _find_history(psi_dirs)
    per_k = sum(1 for o in optimizers if not (o.is_adam and o.schedule == "constant"))
    once = len(optimizers) - per_k
    steps = _steps_per_task(cfg, {"per_k": per_k, "once": once})
    journal = TaskJournal(out, cfg, specs, optimizers)
    plan = journal.plan(specs, seeds)
    resumed = {"tasks": sum(len(done) for done in plan.done.values()), "rows": plan.rows_stored}
    if progress:
        print(
            f"l3rs evaluate: {len(specs)} setting(s) x {num_tasks} task(s) x {len(optimizers)} optimizers, "
            f"K in {list(cfg.evaluate.k_grid)}: {steps} training steps per task, {workers} process(es).",
            file=sys.stderr,
        )
        if plan.rows_stored:
            print(f"l3rs evaluate: resuming from {journal.root}: {resumed['tasks']} of {len(specs) * num_tasks} "
                  f"tasks done, {resumed['rows']} of {len(specs) * num_tasks * len(optimizers)} task x optimizer "
                  "runs stored; running the rest.", file=sys.stderr)  # fmt: skip
    # Fig. 4 (λ and μ per layer) exists for L3RS only: the first L3RS row (ψ₀ without artifacts), on setting A if
    # evaluated; none when every learned row is another family.
    trace_opt = next((o for o in optimizers if o.kind == "learned" and o.config.family == "l3rs"), None)
    run_start = time.perf_counter()
    if workers <= 1 or not specs:
        results, trace = run_in_process(cfg, specs, seeds, trace_opt, progress, journal, plan)
    else:
        results, trace = run_pool(cfg, specs, seeds, trace_opt, progress, workers, journal, plan)
    seconds = {
        "evaluation": round(time.perf_counter() - run_start, 3),
        "per_setting_process_seconds": {k: round(v.seconds, 3) for k, v in results.items()},
    }
    report = build_report(
        cfg,
        artifacts=artifacts,
        optimizers=optimizers,
        specs=specs,
        results=results,
        classes=classes,
        skipped=skipped,
        trace=trace,
        history=history,
        meta={
            "workers": workers,
            "tasks_per_setting": num_tasks,
            "resumed": resumed,  # tasks and task x optimizer runs read back from <out>/tasks, not run (or timed) here
            "steps_per_task": steps,
            "compiles": {k: v.compiles for k, v in results.items()},
            "seconds": seconds,
        },
    )
    write_report(report, out, trace=trace, history=history, started=start)
    return report


def run_evaluation_cli(args: Any, cfg: Config) -> int:
    """``l3rs evaluate``: ``args.psi`` (artifact folders; default ``<run.storage>/<run.name>/psi``), ``args.tasks``,
    ``args.out`` (default ``<run.storage>/<run.name>/evaluation``); optional ``args.settings``, ``args.workers``."""
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    psi_dirs = list(args.psi) if getattr(args, "psi", None) else [storage.join(run_dir, "psi")]
    for uri in psi_dirs:
        if not storage.exists(storage.join(uri, "metadata.json")):
            print(
                f"l3rs evaluate: no ψ artifact at {uri!r}; meta-train first (`l3rs train`) or pass --psi DIR.",
                file=sys.stderr,
            )
            return 2
    out = getattr(args, "out", None) or storage.join(run_dir, "evaluation")
    settings = getattr(args, "settings", None)
    if isinstance(settings, str):  # "AB", "A,B" or "A B"
        settings = [c for c in settings.upper() if c.isalpha()]
    try:
        report = run_evaluation(
            cfg,
            psi_dirs,
            out=out,
            tasks=getattr(args, "tasks", None),
            settings=settings,
            workers=getattr(args, "workers", None),
            velo_og=getattr(args, "velo_og", None),
        )
    except ValueError as e:  # bad artifacts / checkpoints: a clear message, not a traceback
        if isinstance(e, ConfigError):
            raise
        print(f"l3rs evaluate: {e}", file=sys.stderr)
        return 2
    print(summary_text(report))
    print(f"report: {storage.join(out, 'report.md')}")
    return 0
