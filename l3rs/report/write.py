"""Writing the report folder: figures, ``report.csv``, ``report.md`` and, last, ``report.json``, each atomically
through :mod:`l3rs.storage`."""

from __future__ import annotations

import json
import time
from typing import Any

from l3rs import storage
from l3rs.report.build import FILES, read_history
from l3rs.report.figures import plot_baselines, plot_layer_stats, plot_meta_evaluation
from l3rs.report.render import csv_text, render_markdown

__all__ = ["write_report"]


def write_report(
    report: dict[str, Any],
    out: str,
    *,
    trace: dict[str, Any] | None = None,
    history: str | None = None,
    started: float | None = None,
) -> dict[str, str]:
    """Writes figures, ``report.csv``, ``report.md`` and, last, ``report.json`` under ``out`` (each atomically).

    ``trace``: the Fig. 4 run (:func:`l3rs.meta.trace.trace_layer_stats`). ``history``: the run's
    ``history.jsonl`` to copy the meta-training curves from (the report itself names it relative to the run).
    ``started``: a ``time.perf_counter()`` value; if given, ``meta.seconds.total`` is set to the time since then
    (figures included). Returns the written files' URIs by kind.
    """
    storage.makedirs(out)
    written = {}
    if report["settings"]:
        plot_meta_evaluation(report, storage.join(out, FILES["fig3"]))
        written["fig3"] = storage.join(out, FILES["fig3"])
        plot_baselines(report, storage.join(out, FILES["fig3_baselines"]))
        written["fig3_baselines"] = storage.join(out, FILES["fig3_baselines"])
    if trace is not None:
        plot_layer_stats(trace, storage.join(out, FILES["fig4"]))
        written["fig4"] = storage.join(out, FILES["fig4"])
    mt = report.get("meta_training")
    if history and mt and mt.get("generations"):
        try:
            from l3rs.plots import plot_meta_training

            uri = storage.join(out, FILES["meta_training"])
            plot_meta_training(read_history(history), uri, "meta-training (copied from the run's history)")
            written["meta_training"] = uri
        except (OSError, KeyError, TypeError, ValueError) as e:  # another version's history: keep the pointer only
            mt["error"] = f"could not plot it: {type(e).__name__}"
    if storage.exists(storage.join(out, FILES["tasks"])):  # the finished tasks (l3rs.meta.eval_journal)
        written["tasks"] = storage.join(out, FILES["tasks"])
    report["files"] = {k: FILES[k] for k in (*written, "csv", "markdown", "json")}  # what this folder holds
    if started is not None:
        report["meta"].setdefault("seconds", {})["total"] = round(time.perf_counter() - started, 3)
    storage.write_bytes_atomic(storage.join(out, FILES["csv"]), csv_text(report).encode())
    written["csv"] = storage.join(out, FILES["csv"])
    storage.write_bytes_atomic(storage.join(out, FILES["markdown"]), render_markdown(report).encode())
    written["markdown"] = storage.join(out, FILES["markdown"])
    body = json.dumps(report, indent=1, allow_nan=False, ensure_ascii=False)
    storage.write_bytes_atomic(storage.join(out, FILES["json"]), body.encode())
    written["json"] = storage.join(out, FILES["json"])
    return written
