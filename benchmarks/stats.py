"""Numbers the benchmarks measure and print: percentiles, resident memory, and "-" for what was not measured."""


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile of `values`, q a FRACTION in [0, 1] (0.95 is p95; not a percent).

    Linear interpolation between the two nearest ranks (numpy's default
    method); None when there are no values.
    """
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(value, spec: str, none: str = "-") -> str:
    """`value` formatted with `spec`, or `none` where it was not measured (None)."""
    return none if value is None else format(value, spec)


def rss(pid: int) -> int:
    """Bytes resident in memory (VmRSS) of process `pid`; 0 when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
