"""The meta-evaluation report (paper §5, Fig. 3, Fig. 4, Appendix C Tables 5–10): ``report.md``, ``report.csv``,
``report.json`` and figures, all written atomically through :mod:`l3rs.storage`.

- ``report.json``: per setting its classes (which classes of which dataset θ0 was pretrained on, each learned row
  was meta-trained on, and the evaluation tasks use, and how they relate), rows per (optimizer, K) with mean,
  population std and standard error over the tasks, per-task numbers, best Adam per K, per-task wins; the speedups,
  Fig. 4's μ/λ trace and meta (config, artifact sha256s, the best-Adam rule naming the variants run, which
  artifact's options ψ₀ was made with, seconds, versions).
- ``report.csv``: long format, one row per (setting, optimizer, K) (:data:`CSV_FIELDS`): the numbers (accuracy as a
  fraction in [0, 1]; an empty cell is a non-finite number) and the row's classes.
- ``report.md``: per setting its class statement, then tables shaped like the paper's (rows = optimizers, columns =
  K, "mean ± standard error" in %), wins, speedups and the figures: ``fig3_meta_evaluation.png`` (accuracy vs K per
  setting + panel F), ``fig3_baselines.png`` (every Adam learning rate, one column per baseline family, like the
  paper's Fig. 3), ``fig4_layer_stats.png``.

Paths are named relative to the run storage (:mod:`l3rs.names`): a report never holds an absolute machine path.

Modules: :mod:`~l3rs.report.build` (the dict), :mod:`~l3rs.report.render` (CSV and markdown),
:mod:`~l3rs.report.figures` (figures), :mod:`~l3rs.report.write` (the folder).
"""

from l3rs.report.build import FILES, FORMAT, best_adam_rule, build_report, psi0_statement
from l3rs.report.figures import (
    baselines_figure,
    figure_text,
    layer_stats_figure,
    meta_evaluation_figure,
    plot_baselines,
    plot_layer_stats,
    plot_meta_evaluation,
)
from l3rs.report.render import CSV_FIELDS, csv_text, render_markdown, summary_text
from l3rs.report.write import write_report

__all__ = [
    "FORMAT",
    "FILES",
    "CSV_FIELDS",
    "build_report",
    "best_adam_rule",
    "psi0_statement",
    "write_report",
    "render_markdown",
    "csv_text",
    "summary_text",
    "meta_evaluation_figure",
    "baselines_figure",
    "layer_stats_figure",
    "figure_text",
    "plot_meta_evaluation",
    "plot_baselines",
    "plot_layer_stats",
]
