"""``runtime.stats.percentile``, the one percentile: nearest rank, against values worked out by hand."""

from __future__ import annotations

import random

import pytest

from runtime.stats import percentile

TENS = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]


@pytest.mark.parametrize("q, expected", [
    (0.0, 10.0),  # ceil(0) = 0: the smallest
    (0.05, 10.0),  # ceil(0.5) = 1st
    (0.5, 50.0),  # ceil(5) = 5th: the lower middle, not 55 (no interpolation)
    (0.55, 60.0),  # ceil(5.5) = 6th
    (0.9, 90.0),  # 9th
    (0.99, 100.0),  # ceil(9.9) = 10th
    (1.0, 100.0),
])  # fmt: skip
def test_ten_values(q, expected):
    shuffled = random.Random(0).sample(TENS, len(TENS))  # the order given does not matter
    assert percentile(shuffled, q) == expected


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_one_value_is_every_percentile(q):
    assert percentile([7.0], q) == 7.0


def test_no_values_give_zero():
    assert percentile([], 0.5) == 0.0 and percentile([], 0.99) == 0.0


def test_other_small_lists():
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0  # ceil(2.5) = 3rd
    assert percentile([1.0, 100.0], 0.5) == 1.0 and percentile([1.0, 100.0], 0.99) == 100.0
    assert percentile(range(1, 21), 0.95) == 19  # the router's p95 over 20 samples
    assert percentile(range(1, 101), 0.5) == 50
    assert percentile(range(1, 101), 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point: still 7th


def test_every_user_shares_it():
    import edge_node.estimates
    import splitglm.bench.stats

    assert splitglm.bench.stats.percentile is percentile and edge_node.estimates.percentile is percentile
