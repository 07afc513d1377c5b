"""Run metrics through ``ray.util.metrics`` (exported to Prometheus, shown in Grafana and the Ray dashboard).

Every series carries the tag ``run`` (the run name). Ray exports a metric named ``l3rs_x`` as ``ray_l3rs_x``, and a
counter with the suffix ``_total`` (``ray_l3rs_units_done_total``): :data:`EXPORTED` lists the names exactly as
Prometheus scrapes them, and that is what the docs and ``cluster/monitoring/l3rs_grafana_dashboard.json`` use.

Generations are counted as *generations completed*, the same number the driver's log line ``gen N/T`` shows
(``ray_l3rs_generation`` is 60 after ``gen 60/60``; history rows carry it as ``generations_completed``).

A ``ray.util.metrics`` series exists only once a value was recorded for it, so :class:`RunMetrics` records the
counters (at 0) and the generation gauge when it is created: a dashboard shows "0 failures" from the start.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COUNTERS", "EXPORTED", "GAUGES", "RunMetrics", "exported_name"]

GAUGES: dict[str, str] = {
    "l3rs_generation": "Generations completed (the N of the log's 'gen N/T').",
    "l3rs_fitness_mean": "Population mean fitness (= -mean eval loss) of the last completed generation.",
    "l3rs_fitness_best": "Best candidate fitness of the last completed generation.",
    "l3rs_eval_accuracy": "Population mean eval accuracy of the last completed generation.",
    "l3rs_sigma": "NES noise standard deviation.",
    "l3rs_meta_lr": "NES meta learning rate.",
    "l3rs_live_workers": "Worker actors alive and ready.",
    "l3rs_units_per_s": "Work units (antithetic pair x task) completed per second in the last generation.",
}
COUNTERS: dict[str, str] = {
    "l3rs_unit_retries": "Work units re-queued after a worker died, hung or left.",
    "l3rs_worker_failures": "Worker actors that died, hung, were killed or failed to start.",
    "l3rs_units_done": "Work units completed.",
}


def exported_name(name: str) -> str:
    """The Prometheus name Ray exports metric ``name`` under: ``ray_`` prefix, and ``_total`` for a counter."""
    if name in COUNTERS:
        return f"ray_{name}_total"
    if name in GAUGES:
        return f"ray_{name}"
    raise KeyError(f"unknown l3rs metric {name!r}")


# Exported series name -> ("gauge" | "counter", description). The documented list (cluster/README.md, "Monitoring").
EXPORTED: dict[str, tuple[str, str]] = {
    **{exported_name(n): ("gauge", d) for n, d in GAUGES.items()},
    **{exported_name(n): ("counter", d) for n, d in COUNTERS.items()},
}


class RunMetrics:
    """Gauges and counters tagged with the run name.

    Args:
      run_name: the value of the ``run`` tag.
      generation: generations already completed (a resumed run starts there); recorded at once, with every
        counter at 0, so those series exist before the first generation ends.
    """

    def __init__(self, run_name: str, generation: int = 0) -> None:
        from ray.util import metrics

        tags = ("run",)
        self._tags = {"run": run_name}
        self.gauges = {n: metrics.Gauge(n, description=d, tag_keys=tags) for n, d in GAUGES.items()}
        self.counters = {n: metrics.Counter(n, description=d, tag_keys=tags) for n, d in COUNTERS.items()}
        self._last: dict[str, float] = {}
        for counter in self.counters.values():
            # Counter.inc refuses 0; recording 0 is what creates the series (value 0) without advancing it.
            counter._record(0.0, tags=self._tags)
        self.set(generation=generation)

    def set(self, **values: Any) -> None:
        """Sets gauges by short name: ``set(generation=3, sigma=0.03)`` sets ``l3rs_generation`` and ``l3rs_sigma``."""
        for name, value in values.items():
            self.gauges[f"l3rs_{name}"].set(float(value), tags=self._tags)

    def count(self, name: str, total: float) -> None:
        """Advances counter ``name`` (short name, e.g. ``"units_done"``) to ``total`` (the pool reports cumulative
        totals)."""
        delta = float(total) - self._last.get(name, 0.0)
        if delta > 0:
            self.counters[f"l3rs_{name}"].inc(delta, tags=self._tags)
        self._last[name] = float(total)
