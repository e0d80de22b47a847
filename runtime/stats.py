"""The one percentile: nearest rank.

``percentile(values, q)``, q in [0, 1], is the ceil(q * n)-th smallest of the
n values (index max(ceil(q * n) - 1, 0) of the sorted values), and 0.0 for no
values. It is always one of the values, never an interpolation between two:
p50 of [1, 2, 3, 4] is 2, p99 of 10 values is the largest, p0 the smallest.

The edge router's high estimates (``edge_node.estimates``) and every
benchmark's p50 / p99 (``splitglm.bench.stats``) use it, so a p99 in one
place is the p99 of every other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank q-quantile of ``values``: the ceil(q * n)-th smallest (0.0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = math.ceil(round(q * len(ordered), 9))  # (rounded: 0.07 * 100 is 7.000000000000001: rank 7, not 8)
    return ordered[max(rank - 1, 0)]
