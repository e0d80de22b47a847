"""``splitglm.bench.stats``: the ratios, overheads and medians every bench reports."""

from __future__ import annotations

from splitglm.bench.stats import mean, median, overhead_pct, ratio


def test_ratio_overhead_median_mean():
    assert ratio(30.0, 20.0) == 1.5 and ratio(2.0, 3.0, 2) == 0.67 and ratio(1.0, 0.0) is None
    assert overhead_pct(115.0, 100.0) == 15.0 and overhead_pct(90.0, 100.0) == -10.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5 and median([3.0, 1.0, 2.0]) == 2.0  # (a median, not a p50)
    assert mean([1.0, 2.0, 6.0]) == 3.0
