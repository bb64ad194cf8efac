"""The paired bootstrap of the quality report (evaluation/bootstrap.py) on known input."""

import numpy as np
import pytest

from evaluation.bootstrap import format_interval, paired_bootstrap


def test_constant_difference_gives_a_point_interval():
    ci = paired_bootstrap([3.0, 5.0, 7.0, 1.0], [2.0, 4.0, 6.0, 0.0])
    assert (ci["diff"], ci["low"], ci["high"]) == pytest.approx((1.0, 1.0, 1.0))
    assert ci["papers"] == 4 and ci["level"] == 0.95


def test_two_papers_interval_spans_the_possible_resample_means():
    # d = [0, 1]: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th percentile is 0 and the 97.5th is 1; the point estimate is the plain mean.
    ci = paired_bootstrap([10.0, 21.0], [10.0, 20.0])
    assert ci["diff"] == pytest.approx(0.5)
    assert (ci["low"], ci["high"]) == (0.0, 1.0)


def test_matches_a_direct_computation_and_is_seeded():
    rng = np.random.default_rng(7)
    a, b = rng.normal(30, 10, 100), rng.normal(29, 10, 100)
    ci = paired_bootstrap(list(a), list(b), resamples=2000, seed=3)
    d = a - b
    draws = np.random.default_rng(3).integers(0, 100, size=(2000, 100))
    low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    assert (ci["low"], ci["high"]) == pytest.approx((low, high))
    assert ci["diff"] == pytest.approx(a.mean() - b.mean())
    assert ci["low"] < ci["diff"] < ci["high"]
    assert paired_bootstrap(list(a), list(b), resamples=2000, seed=3) == ci  # same seed, same interval
    swapped = paired_bootstrap(list(b), list(a), resamples=2000, seed=3)  # the same resamples, negated
    assert (swapped["low"], swapped["high"]) == pytest.approx((-ci["high"], -ci["low"]))


def test_refuses_unpaired_input_and_formats_points():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    assert format_interval({"diff": 0.42, "low": -0.8, "high": 1.613}) == "+0.42 [-0.80, +1.61]"
