"""spark_jobs.intervals: bootstrap intervals with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from spark_jobs.intervals import bootstrap_ci, paired_diff_ci


def test_constant_values_have_a_zero_width_interval():
    assert bootstrap_ci(np.full(50, 0.3), 200) == pytest.approx((0.3, 0.3))


def test_interval_matches_the_normal_approximation():
    # Bernoulli(0.5) over 10,000 users: sd of the mean 0.005, 95% half-width ~0.0098
    v = np.zeros(10_000)
    v[::2] = 1.0
    lo, hi = bootstrap_ci(v, 1000, 0.95, seed=3)
    assert lo < 0.5 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.005, rel=0.15)
    assert bootstrap_ci(v, 1000, 0.95, seed=3) == (lo, hi)  # seeded


def test_paired_difference_sees_what_separate_intervals_hide():
    rng = np.random.default_rng(0)
    base = rng.random(400)  # users differ a lot...
    a, b = base + 0.02, base  # ...but a beats b by 0.02 on every one of them
    d, lo, hi = paired_diff_ci(a, b, 300)
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    a_lo, _ = bootstrap_ci(a, 300)
    _, b_hi = bootstrap_ci(b, 300)
    assert a_lo < b_hi  # the separate intervals overlap
    with pytest.raises(ValueError, match="shape"):
        paired_diff_ci(a, b[:-1])
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci(np.empty(0))
