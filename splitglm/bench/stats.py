"""The benchmarks' statistics: one definition of each, which every bench calls.

- ``percentile(values, q)``, q in [0, 1]: **nearest rank**, the ceil(q * n)-th
  smallest of the n values (index max(ceil(q * n) - 1, 0) of the sorted
  values), 0.0 for no values. Always one of the values, never interpolated.
  Every p50 / p99 a bench reports is this one (``runtime.stats``: the edge's
  router estimates its p95 with it too).
- ``median(values)``: the middle value, the mean of the two middle ones for an
  even count (``statistics.median``): for figures reported as a median of runs
  or repeats, not as a p50.
- ``mean(values)``: the arithmetic mean (``statistics.fmean``).
- ``ratio(a, b, digits)``: a / b rounded, None where b is 0: speed-ups (a
  rate over the baseline's rate, or the baseline's time over a time) and
  p99 ratios.
- ``overhead_pct(ms, reference_ms)``: how much longer ``ms`` takes than
  ``reference_ms``, %: 100 * (ms / reference_ms - 1).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from runtime.stats import percentile

__all__ = ["mean", "median", "overhead_pct", "percentile", "ratio"]


def median(values: Iterable[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    return statistics.median(values)


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean."""
    return statistics.fmean(values)


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    """a / b rounded to ``digits``; None where b is 0 (nothing to compare with)."""
    return round(a / b, digits) if b else None


def overhead_pct(ms: float, reference_ms: float, digits: int = 1) -> float:
    """How much longer ``ms`` is than ``reference_ms``, %, rounded to ``digits``."""
    return round(100 * (ms / reference_ms - 1), digits)
