"""Paired bootstrap for a difference of mean Rouge-L between two rows.

Both rows summarize the same papers, so the comparison is paired: per paper,
d_i = score_a(i) - score_b(i). The bootstrap resamples *papers* with
replacement (`resamples` times, seeded), takes the mean of d over each
resample, and reports the 2.5th and 97.5th percentiles of those means: a 95 %
percentile interval for mean(a) - mean(b). The point estimate is mean(d),
which equals mean(a) - mean(b) exactly.
"""

import numpy as np

RESAMPLES = 10_000
SEED = 0


def paired_bootstrap(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = 0.95) -> dict:
    """{"diff": mean(a - b), "low": ..., "high": ..., "resamples": n, "seed": s, "level": level, "papers": n}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("need two equally long, non-empty lists of per-paper scores")
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "resamples": resamples, "seed": seed,
            "level": level, "papers": len(d)}


def format_interval(ci: dict) -> str:
    """'+0.42 [-0.80, +1.61]': the difference and its interval, in Rouge-L points."""
    return f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"
