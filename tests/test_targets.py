"""jobs/generalization/targets.py: issue 11's targets read off a real report (docs/demo/report.json), checked against
the report's own rows, and a doctored copy that must flip the per-task and non-finite targets."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def targets():
    spec = importlib.util.spec_from_file_location("targets", REPO / "jobs" / "generalization" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return json.loads((REPO / "docs" / "demo" / "report.json").read_text())


def _by_target(rows):
    return {r["target"]: r for r in rows}


def test_targets_agree_with_the_reports_own_rows(targets, report):
    rows = _by_target(targets.check(report))
    mean = {(r["optimizer"], r["K"]): 100 * r["mean_acc"] for r in report["settings"]["A"]["rows"]}
    gain = mean[("L3RS", 10)] - mean[("best Adam", 10)]
    assert rows["A: K=10 ≥ best Adam + 10 points"]["value"] == f"{gain:+.1f} points"
    assert rows["A: K=10 ≥ best Adam + 10 points"]["status"] == ("met" if gain >= 10 else "missed")
    own = mean[("L3RS", 10)] - mean[("L3RS ψ₀", 10)]
    assert rows["A: K=10 ≥ ψ₀ + 5 points (meta-learning's own gain)"]["value"] == f"{own:+.1f} points"
    speed = {r["k_baseline"]: r["speedup"] for r in report["speedup"]["by_setting"]["A"]["L3RS"]}
    assert rows["A: speedup ≥ 2× at every K ≥ 25"]["status"] == ("met" if min(speed[k] for k in speed if k >= 25) >= 2
                                                                  else "missed")  # fmt: skip
    # what the report cannot say is "not measured", never met: K = 500 is not on its grid, no FC-LOpt row
    assert rows["A: K = 5 × K_max ≥ best Adam − 0.5"]["status"] == "not measured"
    assert rows["B: above FC-LOpt at every K"]["status"] == "not measured"
    wins = report["settings"]["A"]["wins_vs_best_adam"]["L3RS"]
    ok = all(w["wins"] / 16 >= 0.75 for w, k in zip(wins, report["settings"]["A"]["k_grid"], strict=True) if k <= 100)
    assert rows["A: wins ≥ 75 % of tasks at every K ≤ K_max"]["status"] == ("met" if ok else "missed")
    assert "| target | status | measured |" in targets.markdown(list(rows.values()), report, "L3RS")


def test_a_doctored_task_flips_the_per_task_and_nonfinite_targets(targets, report):
    bad = copy.deepcopy(report)
    b = bad["settings"]["B"]["per_task"]
    best = b["best Adam"]["accuracy"]
    for i in range(len(best)):  # every task exactly at best Adam: nothing below, nothing non-finite
        b["accuracy"]["L3RS"][i] = list(best[i])
        b["loss"]["L3RS"][i] = [0.1] * len(best[i])
    rows = _by_target(targets.check(bad))
    assert rows["B: no task below best Adam − 2 points, any K"]["status"] == "met"
    assert rows["B: no non-finite loss"]["status"] == "met"
    assert rows["B: mean above best Adam at every K ≤ K_max"]["status"] == "missed"  # equal is not above
    b["accuracy"]["L3RS"][3][1] = best[3][1] - 0.021  # one task, one K: 2.1 points below
    b["loss"]["L3RS"][5][0] = math.nan
    rows = _by_target(targets.check(bad))
    assert rows["B: no task below best Adam − 2 points, any K"]["status"] == "missed"
    assert "K=25: 1/16 (worst -2)" in rows["B: no task below best Adam − 2 points, any K"]["value"]
    assert rows["B: no non-finite loss"] == {"target": "B: no non-finite loss", "status": "missed",
                                             "value": "1 of 80 runs"}  # fmt: skip


def test_reports_of_the_same_tasks_merge_setting_by_setting(targets, report):
    """A second evaluation that added rows in B only (as run.sh's B/D one adds FC-LOpt): its B wins, A stays the
    first report's; reports of other tasks are refused."""
    extra = copy.deepcopy(report)
    b = extra["settings"]["B"]["per_task"]
    b["accuracy"]["FC-LOpt"] = [[0.0] * len(t) for t in b["accuracy"]["L3RS"]]  # far behind: L3RS is above it
    extra["optimizers"].append({"name": "FC-LOpt"})
    del extra["settings"]["A"]
    merged = targets.merge([report, extra])
    assert merged["settings"]["A"] is report["settings"]["A"] and merged["settings"]["B"] is extra["settings"]["B"]
    rows = _by_target(targets.check(merged))
    assert rows["B: above FC-LOpt at every K"]["status"] == "met"
    assert rows["D: above FC-LOpt at every K"]["status"] == "not measured"
    k10 = "A: K=10 ≥ best Adam + 10 points"
    assert rows[k10] == _by_target(targets.check(report))[k10]
    other = copy.deepcopy(report)
    other["meta"]["tasks_per_setting"] = 32
    with pytest.raises(ValueError, match="meta.tasks_per_setting"):
        targets.merge([report, other])


def test_the_per_task_reference_counts_adams_second_best_variant(targets, report):
    """The reference row is Adam's runner-up (by mean, per K) against best Adam, task by task, and not a target."""
    rows = _by_target(targets.check(report))
    ref = rows["B: (reference) the second-best Adam variant, tasks below best Adam − 2"]
    assert ref["status"] == "reference"
    b = report["settings"]["B"]
    adam = {n: np.asarray(a) * 100 for n, a in b["per_task"]["accuracy"].items() if n.startswith("Adam")}
    best = np.asarray(b["per_task"]["best Adam"]["accuracy"]) * 100
    for j, k in enumerate(b["k_grid"]):
        means = sorted(adam, key=lambda n: -adam[n][:, j].mean())
        assert np.array_equal(adam[means[0]][:, j], best[:, j])  # the report's best Adam is the top mean
        below = int((adam[means[1]][:, j] < best[:, j] - 2).sum())
        assert f"K={k}: {below}/{len(best)} " in ref["value"]
    n_targets = sum(r["status"] != "reference" for r in rows.values())
    assert n_targets == len(rows) - 4  # one reference row per setting B-E, not counted as a target
    assert f"of {n_targets} met." in targets.markdown(list(rows.values()), report, "L3RS")
