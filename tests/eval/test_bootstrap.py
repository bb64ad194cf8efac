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


def test_report_prints_each_gated_row_against_always_on_with_its_interval():
    from evaluation.run import markdown, score_results
    from spa.model.reference import Generation

    class Decoder:
        decode = staticmethod(lambda tokens: " ".join(tokens))

    class Paper:
        def __init__(self, summary):
            self.summaries = {"outcome": summary}

    papers = [Paper("a b c d"), Paper("e f g h")]
    gens = lambda texts, sigma: [Generation(tokens=t.split(), sigmas=[sigma] * len(t.split())) for t in texts]  # noqa
    generations = {"backbone, generic instruction": gens(["x", "y"], 0),
                   "outcome|side always on": gens(["a b", "e f"], 1),
                   "outcome|SPA": gens(["a b c d", "e f"], 0),
                   "outcome|SPA with flip-label gate": gens(["a b", "x"], 0)}
    plugin = {"tau": 0.5, "settings": {}, "sweep": {}, "tau_tuning": None, "recipes": {}}
    results = score_results(Decoder(), papers, 2, "test", 48, 384, {"outcome": plugin}, generations,
                     {"outcome": gens(["x", "y"], 0)}, 60.0)
    intervals = results["profiles"]["outcome"]["vs_always_on"]
    assert set(intervals) == {"SPA", "SPA with flip-label gate"}
    per_paper = results["profiles"]["outcome"]["rows"]["SPA"]["per_paper"]
    assert per_paper == pytest.approx([100.0, 2 * 100 / 3])  # "a b" vs "a b c d": P 1, R 1/2 -> F 2/3
    assert intervals["SPA"]["diff"] == pytest.approx((100 - 200 / 3) / 2)
    md = markdown(results, "spa eval")
    assert f"| outcome | SPA | 83.33 | 0% | 66.67 | {format_interval(intervals['SPA'])} | met |" in md
    assert "| outcome | SPA with flip-label gate | 33.33 | 0% | 66.67 |" in md and "| missed |" in md
