"""Small statistics shared by the demo, the load generator and the benchmarks."""

from __future__ import annotations

import math


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
