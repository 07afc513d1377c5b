"""Run metrics through ``ray.util.metrics`` (exported to Prometheus, shown in the Ray dashboard's Metrics view)."""

from __future__ import annotations

from typing import Any

__all__ = ["RunMetrics"]

_GAUGES = {
    "l3rs_generation": "Current NES generation.",
    "l3rs_fitness_mean": "Population mean fitness (= -mean eval loss).",
    "l3rs_fitness_best": "Best candidate fitness of the generation.",
    "l3rs_eval_accuracy": "Population mean eval accuracy.",
    "l3rs_sigma": "NES noise standard deviation.",
    "l3rs_meta_lr": "NES meta learning rate.",
    "l3rs_live_workers": "Worker actors alive.",
    "l3rs_units_per_s": "Work units (antithetic pair x task) completed per second in the last generation.",
}
_COUNTERS = {
    "l3rs_unit_retries": "Work units re-queued after a worker died, hung or left.",
    "l3rs_worker_failures": "Worker actors that died or were killed.",
    "l3rs_units_done": "Work units completed.",
}


class RunMetrics:
    """Gauges and counters tagged with the run name."""

    def __init__(self, run_name: str) -> None:
        from ray.util import metrics

        tags = ("run",)
        self._tags = {"run": run_name}
        self.gauges = {n: metrics.Gauge(n, description=d, tag_keys=tags) for n, d in _GAUGES.items()}
        self.counters = {n: metrics.Counter(n, description=d, tag_keys=tags) for n, d in _COUNTERS.items()}
        self._last: dict[str, float] = {}

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            self.gauges[f"l3rs_{name}"].set(float(value), tags=self._tags)

    def count(self, name: str, total: float) -> None:
        """Advances counter ``name`` to ``total`` (the pool reports cumulative totals)."""
        delta = float(total) - self._last.get(name, 0.0)
        if delta > 0:
            self.counters[f"l3rs_{name}"].inc(delta, tags=self._tags)
        self._last[name] = float(total)
