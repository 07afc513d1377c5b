"""The L3RS of the paper's §4.1 as written: absolute features, λ unbounded. The package's default adds issue 11's
bound on λ in Adam-equivalent steps (the other stability options, such as scale-free features, are off by default;
all are tested in test_stability.py). Tests
that check the paper's formulas, or bit-exact behaviour recorded before those defaults, build their configs here."""

from __future__ import annotations

import l3rs

PAPER = {"feature_scale": "absolute", "lambda_max_adam_ratio": None}


def paper_config(**kwargs) -> l3rs.L3RSConfig:
    """``L3RSConfig(**kwargs)`` with the paper's features and no bound unless ``kwargs`` set them."""
    return l3rs.L3RSConfig(**{**PAPER, **kwargs})
