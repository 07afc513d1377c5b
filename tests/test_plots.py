"""Meta-training plots: readable when one diverging candidate pulls a generation's population mean far down."""

from __future__ import annotations

import numpy as np

from l3rs.plots import moving_average, plot_meta_training, robust_limits


def test_moving_average_and_median_skip_non_finite_values():
    x = np.array([1.0, np.nan, 3.0, -1e8, 5.0])
    np.testing.assert_allclose(moving_average(x, 2), [1.0, 1.0, 3.0, (3.0 - 1e8) / 2, (5.0 - 1e8) / 2])
    np.testing.assert_allclose(moving_average(x, 3, np.median), [1.0, 1.0, 2.0, (3.0 - 1e8) / 2, 3.0])
    assert np.isnan(moving_average(np.array([np.nan]), 3)[0])


def test_robust_limits_leave_out_a_huge_outlier_but_keep_the_bulk():
    mean = np.concatenate([np.linspace(-1.0, -0.4, 99), [-1.2e8]])
    best = mean + 0.1
    best[-1] = -0.3
    lo, hi = robust_limits([mean, best])
    assert -1.5 < lo < -0.9 and -0.3 < hi < -0.2  # the bulk of both curves, not the -1.2e8
    assert np.sum(mean < lo) == 1 + np.sum(mean[:-1] < lo)
    assert robust_limits([np.array([np.nan])]) == (-1.0, 0.0)


def test_plot_meta_training_writes_a_png_with_an_outlier_and_a_nan(tmp_path):
    history = [
        {"generation": g, "fitness_mean": -1.2e8 if g == 5 else -1.0 + 0.01 * g, "fitness_best": -0.9 + 0.01 * g,
         "accuracy_mean": None if g == 3 else 0.5 + 0.002 * g, "sigma": 0.03, "meta_lr": 0.02}
        for g in range(30)
    ]  # fmt: skip
    out = tmp_path / "plots" / "meta_training.png"
    plot_meta_training(history, str(out), "unit")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
