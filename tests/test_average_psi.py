"""jobs/budget/average_psi.py on the shipped artifacts: the demo's ψ and NES seed 1's (docs/generalization/seed1),
two runs of one config that differ only in their seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from l3rs.artifact import load_psi, verify_artifact

REPO = Path(__file__).resolve().parent.parent
DEMO, SEED1 = str(REPO / "docs" / "demo" / "psi"), str(REPO / "docs" / "generalization" / "seed1" / "psi")


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("average_psi", REPO / "jobs" / "budget" / "average_psi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mean_of_two_seeds_is_their_elementwise_mean_with_its_sources_named(job, tmp_path):
    meta = job.average_psi(str(tmp_path / "mean"), [DEMO, SEED1])
    assert verify_artifact(str(tmp_path / "mean"))["sha256"] == meta["sha256"]
    mean, config, _ = load_psi(str(tmp_path / "mean"))
    (a, config_a, meta_a), (b, _, meta_b) = load_psi(DEMO), load_psi(SEED1)
    assert config == config_a and meta["k_range"] == meta_a["k_range"] and meta["seeds"] == [0, 1]
    for got, x, y in zip(jax.tree.leaves(mean), jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        want = ((np.asarray(x, np.float64) + np.asarray(y, np.float64)) / 2).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert any(not np.array_equal(g, x) for g, x in zip(jax.tree.leaves(mean), jax.tree.leaves(a), strict=True))
    assert [d["sha256"] for d in meta["derived_from"]] == [meta_a["sha256"], meta_b["sha256"]]
    names = [d["artifact"] for d in meta["derived_from"]]  # never this machine's absolute paths (l3rs.names)
    assert not any(n.startswith("/") for n in names) and names[0].endswith("demo/psi")
    assert meta["label"] == "L3RS (mean of glyphs-default, glyphs-default-seed1)"


def test_psis_of_different_configs_or_an_occupied_folder_are_refused(job, tmp_path):
    exp_z = str(REPO / "docs" / "stability_ablation" / "options32" / "psi-g3-exp-z")
    with pytest.raises(ValueError, match="'optimizer' differs"):
        job.average_psi(str(tmp_path / "a"), [DEMO, exp_z])
    with pytest.raises(ValueError, match="at least two"):
        job.average_psi(str(tmp_path / "b"), [DEMO])
    assert job.main([str(tmp_path / "c"), DEMO, SEED1]) == 0
    assert job.main([str(tmp_path / "c"), DEMO, SEED1]) == 2  # an artifact is already there
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
