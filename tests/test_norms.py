"""aggregator.norms.l2_norm: the float64 L2 norm the round engine, DP clipping and adaptive clipping use."""

from __future__ import annotations

import math

import numpy as np

from aggregator.norms import l2_norm


def test_l2_norm_is_the_float64_norm_of_every_value_in_any_shape() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1000, 37)).astype(np.float32)
    assert math.isclose(l2_norm(values), float(np.linalg.norm(values.astype(np.float64))), rel_tol=1e-12)
    assert l2_norm(np.array([3.0, 4.0], dtype=np.float32)) == 5.0
    assert l2_norm(np.zeros(0, dtype=np.float32)) == 0.0


def test_l2_norm_does_not_overflow_in_float32_and_carries_non_finite_values() -> None:
    big = np.full(4, 3e38, dtype=np.float32)  # squares overflow float32, not float64
    assert math.isclose(l2_norm(big), 6e38, rel_tol=1e-6)
    assert math.isinf(l2_norm(np.array([1.0, np.inf], dtype=np.float32)))
    assert math.isnan(l2_norm(np.array([1.0, np.nan], dtype=np.float32)))
