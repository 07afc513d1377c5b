"""The report dict (what ``report.json`` holds): per setting its class provenance and tables, the speedups, Fig. 4's
trace, the meta-training history's summary and meta (config, artifacts, timings). Paths in it are named relative to
the run (:func:`l3rs.names.display_uri`), never by an absolute machine path.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from l3rs import storage
from l3rs.meta.eval_optimizers import format_lr
from l3rs.meta.stats import BEST_ADAM, speedup_table, summarize_setting
from l3rs.names import display_uri, scrub_paths

__all__ = ["FORMAT", "FILES", "build_report", "best_adam_rule", "curves", "psi0_statement", "read_history"]

FORMAT = "l3rs-evaluation/1"
FILES = {
    "markdown": "report.md",
    "csv": "report.csv",
    "json": "report.json",
    "fig3": "fig3_meta_evaluation.png",
    "fig3_baselines": "fig3_baselines.png",
    "fig4": "fig4_layer_stats.png",
    "meta_training": "meta_training.png",
    "tasks": "tasks",  # a folder: one file per finished task, so that a stopped evaluation resumes
}
SCOPE_WORDS = {"all": "the whole network", "head": "the head only"}


def _jsonable(x: Any) -> Any:
    """numpy → Python; non-finite floats → None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _versions() -> dict[str, str]:
    import flax
    import jax
    import optax

    from l3rs._version import __version__

    return {"l3rs": __version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def read_history(uri: str) -> list[dict[str, Any]]:
    """The rows of a run's ``history.jsonl``."""
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _history_summary(uri: str | None, root: str | None) -> dict[str, Any] | None:
    """The run's meta-training history (named relative to the run storage) and its first and last generation."""
    if not uri:
        return None
    out: dict[str, Any] = {"history": display_uri(uri, root=root)}
    try:
        rows = read_history(uri)
    except (OSError, ValueError) as e:
        out["error"] = scrub_paths(f"{type(e).__name__}: {e}", [uri], root=root)
        return out
    out["generations"] = len(rows)
    keys = ("generation", "fitness_mean", "fitness_best", "accuracy_mean")
    if rows:
        out["first"] = {k: rows[0].get(k) for k in keys}
        out["last"] = {k: rows[-1].get(k) for k in keys}
    return out


def _looks_local_absolute(value: str) -> bool:
    return value.startswith(("/", "~", "file://")) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")


def _named_config(config: dict[str, Any], root: str) -> dict[str, Any]:
    """The config as the report shows it: every absolute local path (``run.storage``, ``model.checkpoint``,
    ``pretrain.output``, ``evaluate.other_checkpoint``, ``data.data_dir`` and any other) by its
    :func:`l3rs.names.display_uri` name; ``run.storage`` itself relative to the working directory or by its last
    component."""

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, k) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, key) for v in x]
        if isinstance(x, str) and _looks_local_absolute(x):
            return display_uri(x, root=None if key == "storage" else root)
        return x

    return walk(config, "")


def best_adam_rule(optimizers: Sequence[dict[str, Any]]) -> str:
    """The rule that picks "best Adam", naming exactly the Adam variants that were run (``optimizers``: the report's
    optimizer entries), e.g. "best of constant and cosine Adam, on the whole network, at lr ∈ {1e-2, 1e-3}"."""
    groups: dict[tuple[str, str], list[float]] = {}
    for o in optimizers:
        if o["kind"] == "adam":
            groups.setdefault((o["schedule"], o["train_scope"]), []).append(float(o["learning_rate"]))
    if not groups:
        return "no Adam variant was run: there is no best Adam."
    count = sum(len(v) for v in groups.values())
    schedules = list(dict.fromkeys(s for s, _ in groups))
    scopes = list(dict.fromkeys(sc for _, sc in groups))
    lr_sets = {tuple(sorted(set(v), reverse=True)) for v in groups.values()}

    def lrs(values: Sequence[float]) -> str:
        return "{" + ", ".join(format_lr(x) for x in values) + "}"

    if len(lr_sets) == 1 and len(groups) == len(schedules) * len(scopes):  # a full grid: say it in one phrase
        what = (
            f"{' and '.join(schedules)} Adam, on {' and on '.join(SCOPE_WORDS.get(s, s) for s in scopes)}, "
            f"at lr ∈ {lrs(next(iter(lr_sets)))}"
        )
    else:
        what = "; ".join(
            f"{schedule} Adam on {SCOPE_WORDS.get(scope, scope)} at lr ∈ {lrs(sorted(set(v), reverse=True))}"
            for (schedule, scope), v in groups.items()
        )
    return (
        f"best Adam = per K, the best of {what} ({count} variants run): the variant with the highest mean accuracy "
        "over the tasks at that K, i.e. the baseline tuned per K with hindsight (the paper's choice of best "
        "baseline). Its row repeats that variant's per-task numbers."
    )


def psi0_statement(optimizers: Sequence[dict[str, Any]], artifact_labels: Sequence[str], seed: int) -> str | None:
    """What the ψ₀ row is: meta-training's untrained start, made with the first artifact's options (its family,
    architecture and stability options; the config's ``[optimizer]`` without artifacts), as
    :func:`l3rs.meta.eval_optimizers.build_optimizers` makes it. None without a ψ₀ row."""
    names = [o["name"] for o in optimizers if o.get("group") == "psi0"]
    if not names:
        return None
    if artifact_labels:
        source = f"the options of the first artifact, {artifact_labels[0]}"
        if len(artifact_labels) > 1:
            source += " (the other artifacts' own starts were not run)"
    else:
        source = "the config's [optimizer] options"
    return f"{names[0]} = the untrained start of meta-training (run.seed {seed}), with {source}."


def curves(summary: dict[str, Any], field: str) -> dict[str, list[float]]:
    """Per optimizer, ``field`` of its rows (e.g. "mean_acc") in k_grid order; NaN where missing or null."""
    ks = summary["k_grid"]
    out: dict[str, list[float]] = {}
    for row in summary["rows"]:
        out.setdefault(row["optimizer"], [math.nan] * len(ks))
        v = row.get(field)
        out[row["optimizer"]][ks.index(row["K"])] = math.nan if v is None else v
    return out


def build_report(
    cfg: Any,
    *,
    artifacts: Sequence[Any],
    optimizers: Sequence[Any],
    specs: Sequence[Any],
    results: dict[str, Any],
    classes: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    trace: dict[str, Any] | None,
    history: str | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The report: per evaluated setting its class provenance (``classes[name]``, from
    :func:`l3rs.meta.provenance.classes_for_setting`) and the summary of :func:`l3rs.meta.stats.summarize_setting`,
    the speedups of every learned row over best Adam per setting (panel F uses setting A, or the first one
    evaluated), the Fig. 4 trace, and meta (config and artifacts named relative to the run, sha256s, timings).

    Raises:
      KeyError: an evaluated setting has no entry in ``classes``.
    """
    root = cfg.run.storage
    k_range = None
    for art in artifacts:
        if art.meta.get("k_range"):
            k_range = [int(k) for k in art.meta["k_range"]]
            break
    if k_range is None:
        k_range = [cfg.task.k_min, cfg.task.k_max]
    settings: dict[str, Any] = {}
    speedup: dict[str, Any] = {}
    learned = [o.name for o in optimizers if not o.is_adam]
    for spec in specs:
        if spec.name not in results:
            continue
        summary = summarize_setting(results[spec.name], optimizers)
        settings[spec.name] = {
            "title": spec.title,
            "description": spec.description,
            "dataset": spec.dataset,
            "checkpoint": spec.checkpoint_name or display_uri(spec.checkpoint, root=root),
            "classes": classes[spec.name],
            **summary,
        }
        means = curves(summary, "mean_acc")
        speedup[spec.name] = {n: speedup_table(summary["k_grid"], means[BEST_ADAM], means[n]) for n in learned}
    panel_f = "A" if "A" in settings else next(iter(settings), None)
    optimizer_rows = [
        {
            "name": o.name,
            "kind": o.kind,
            "group": o.group,
            "train_scope": o.train_scope,
            "schedule": o.schedule,
            "learning_rate": o.learning_rate,
        }
        for o in optimizers
    ]
    report = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "meta": {
            "config": _named_config(cfg.to_dict(), root),
            "paths": (
                "checkpoints, artifacts and histories are named relative to the run storage (run.storage), else as "
                "the config wrote them; never by an absolute path"
            ),
            "artifacts": [
                {
                    "label": a.label,
                    "uri": display_uri(a.uri, root=root),
                    "sha256": a.meta.get("sha256"),
                    "run_name": a.meta.get("run_name"),
                    "model": a.meta.get("model"),
                    "dataset": a.meta.get("dataset"),
                    "generations": a.meta.get("generations"),
                    "k_range": a.meta.get("k_range"),
                    "train_scope": a.meta.get("train_scope"),
                }
                for a in artifacts
            ],
            "k_grid": [int(k) for k in cfg.evaluate.k_grid],
            "meta_train_k_range": k_range,
            "best_adam": best_adam_rule(optimizer_rows),
            "psi0": psi0_statement(optimizer_rows, [a.label for a in artifacts], cfg.run.seed),
            "std": "population standard deviation (ddof = 0) over the tasks",
            "se": "standard error of the mean over the tasks: sample standard deviation (ddof = 1) / √n",
            "tasks": (
                "evaluation tasks: N-way subsets of each setting's meta-test classes (see each setting's classes), "
                "training batches from the train split, the eval batch from the test split; task seeds from a "
                "stream disjoint from meta-training's; every optimizer runs on the same tasks"
            ),
            "versions": _versions(),
            **meta,
        },
        "optimizers": optimizer_rows,
        "settings": settings,
        "skipped": dict(skipped),
        "speedup": {"setting": panel_f, "baseline": BEST_ADAM, "by_setting": speedup},
        "layer_stats": _trace_summary(trace),
        "meta_training": _history_summary(history, root),
        "files": dict(FILES),
    }
    return _jsonable(report)


def _trace_summary(trace: dict[str, Any] | None) -> dict[str, Any] | None:
    if trace is None:
        return None
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in trace.items()}
