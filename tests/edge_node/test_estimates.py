"""The router's online estimates: seeds, robustness to outliers, reaction to real changes, /metrics gauges."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_node.estimates import DEFAULT_SEEDS, Estimates, PathEstimate, RobustStat, Seed, seeds_from_plan


def steady(stat: RobustStat, n: int = 50, centre: float = 100.0, spread: float = 5.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    values = [centre + rng.uniform(-spread, spread) for _ in range(n)]
    for v in values:
        stat.observe(v)
    return values


def test_seed_stands_until_observations_arrive():
    stat = RobustStat(80.0)
    assert stat.mean == 80.0 and stat.high == 80.0 and stat.count == 0
    path = PathEstimate("accurate", Seed(prefill_ms_per_token=2.0, step_ms=50.0, rtt_ms=10.0))
    # rtt + prefill * P + (N - 1) * step
    assert path.predict(100, 11) == pytest.approx(10 + 2 * 100 + 10 * 50)
    assert path.predict(100, 1) == pytest.approx(10 + 200)
    assert path.get("replay") == 2.0  # defaults to the prefill seed


def test_one_huge_outlier_barely_moves_the_estimates():
    """The promise: with >= 20 samples, one outlier moves the mean by at most alpha * (high - mean)
    and leaves the p95 at or below the largest ordinary sample."""
    stat = RobustStat(100.0, alpha=0.1)
    values = steady(stat)
    mean, high = stat.mean, stat.high
    stat.observe(100_000.0)
    assert stat.mean - mean <= 0.1 * (high - mean) + 1e-9
    assert stat.mean < 101.0  # under 1% above the steady mean
    assert stat.high <= max(values)
    assert stat.last == 100_000.0


def test_an_early_outlier_does_not_swing_the_warm_up():
    stat = RobustStat(100.0)
    stat.observe(50_000.0)
    assert stat.high == 100.0 and stat.mean == 100.0  # 19 seed copies hold the p95; the sample is clipped to it


def test_a_real_slowdown_shows_in_the_high_percentile_within_four_steps():
    stat = RobustStat(100.0, window=64)
    steady(stat, n=64)
    for n in range(1, 5):
        stat.observe(400.0)
        assert (stat.high == 400.0) == (n == 4)  # the 61st of 64 sorted samples is slow from the 4th on
    for _ in range(40):
        stat.observe(400.0)
    assert stat.mean > 390.0  # and the mean follows once the percentile has moved


def test_a_wrong_seed_is_corrected():
    stat = RobustStat(10.0)
    steady(stat, n=40)
    assert 95.0 < stat.mean < 105.0 and 95.0 < stat.high <= 105.0
    stat = RobustStat(1000.0)  # too pessimistic: the seed copies leave as samples arrive, the mean decays
    steady(stat, n=20)
    assert stat.high < 150.0  # the mean (high never goes below it) still carries 1/21 of the seed
    steady(stat, n=20, seed=1)
    assert stat.high < 110.0 and stat.mean < 110.0


def test_bad_observations_are_refused():
    stat = RobustStat(1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            stat.observe(bad)
    with pytest.raises(ValueError, match="seed"):
        RobustStat(-1.0)
    with pytest.raises(ValueError, match="stat must be"):
        stat.value("p50")
    with pytest.raises(ValueError, match="at least one position"):
        PathEstimate("fast", Seed(1.0, 1.0)).observe_prefill(0, 5.0)


def test_prefill_takes_out_the_round_trip():
    path = PathEstimate("accurate", Seed(prefill_ms_per_token=1.0, step_ms=50.0, rtt_ms=20.0))
    for _ in range(30):
        path.observe_rtt(20.0)
        path.observe_prefill(100, 320.0)  # 20 ms round trip + 3 ms per position
    assert path.get("prefill") == pytest.approx(3.0, rel=0.05)
    assert path.get("rtt") == pytest.approx(20.0)
    path.observe_replay(50, 100.0)
    assert path.replay_ms(10) == 10.0  # one replay at 2 ms per position: clipped to the warm-up p95 (the seed)
    path.observe_replay(50, 100.0)
    assert path.replay_ms(10, "high") == 20.0  # a second one moves the p95 ...
    path.observe_replay(50, 100.0)
    assert 10.0 < path.replay_ms(10) < 20.0  # ... and the mean follows


def test_seeds_from_plans():
    assert seeds_from_plan(None) == DEFAULT_SEEDS
    assert seeds_from_plan({"topology": "fixed"}) == DEFAULT_SEEDS
    old = seeds_from_plan({"predicted": {"ttft_ms": 300.0, "per_token_ms": 42.0}})
    assert old["accurate"].step_ms == 42.0 and old["fast"] == DEFAULT_SEEDS["fast"]
    paths = {
        "accurate": {"prefill_ms_per_token": 1.5, "step_ms": 30.0, "rtt_ms": 5.0, "replay_ms_per_token": 0.5},
        "fast": {"prefill_ms_per_token": 1.0, "step_ms": 12.0, "rtt_ms": 0.0, "replay_ms_per_token": 0.4},
    }
    est = Estimates.from_plan({"predicted": {"per_token_ms": 30.0, "paths": paths}})
    assert est.accurate.predict(10, 5) == pytest.approx(5 + 15 + 4 * 30)
    assert est.fast.predict(10, 5) == pytest.approx(10 + 4 * 12)
    assert est.fast.get("replay") == 0.4


def test_gauges_in_a_registry_follow_the_estimates():
    registry = CollectorRegistry()
    est = Estimates({"accurate": Seed(2.0, 50.0, 20.0), "fast": Seed(1.0, 30.0)})
    est.register(registry)
    assert registry.get_sample_value("splitglm_edge_router_step_seconds", {"path": "accurate", "stat": "mean"}) == 0.05
    assert registry.get_sample_value("splitglm_edge_router_rtt_seconds", {"path": "accurate", "stat": "high"}) == 0.02
    for _ in range(30):
        est.fast.observe_step(10.0)
    assert registry.get_sample_value(
        "splitglm_edge_router_step_seconds", {"path": "fast", "stat": "high"}
    ) == pytest.approx(0.01, rel=0.05)
    assert registry.get_sample_value("splitglm_edge_router_samples_total", {"path": "fast", "stat": "step"}) == 30
    text = generate_latest(registry).decode()
    assert 'splitglm_edge_router_prefill_seconds_per_token{path="fast",stat="mean"}' in text
    with pytest.raises(ValueError):  # registering twice would duplicate the names
        est.register(registry)


def test_concurrent_observations_are_all_counted():
    est = Estimates()
    threads = [threading.Thread(target=lambda: [est.accurate.observe_step(50.0) for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert est.accurate.snapshot()["step"]["samples"] == 2000
