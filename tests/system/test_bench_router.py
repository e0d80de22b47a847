"""``splitglm bench router`` on the real demo model: real processes, a real delaying proxy, a short trace."""

from __future__ import annotations

import pytest

from splitglm.bench.router import (
    PROMPTS,
    Phase,
    agreement,
    derive_budgets,
    make_trace,
    parse_trace,
)

FIELDS = {"policy", "requests", "budget_met_frac", "accurate_token_frac", "accurate_token_frac_calm", "p50_ms",
          "p99_ms", "token_agreement", "switches", "degraded", "errors", "phases"}  # fmt: skip


def test_trace_is_seeded_and_follows_the_phases():
    phases = parse_trace("20:2,300:1.5,50:1.5")
    assert phases == [Phase(20, 0.4), Phase(300, 0.3), Phase(50, 0.3)]
    trace = make_trace(200, phases, [900, 1200], seed=3)
    assert trace == make_trace(200, phases, [900, 1200], seed=3)
    assert trace != make_trace(200, phases, [900, 1200], seed=4)
    assert [item.rtt_ms for item in trace] == [20.0] * 80 + [300.0] * 60 + [50.0] * 60
    assert [item.calm for item in trace] == [True] * 80 + [False] * 60 + [True] * 60
    assert {item.budget_ms for item in trace} == {900, 1200} and {item.prompt for item in trace} <= set(PROMPTS)
    with pytest.raises(ValueError, match="RTT_MS:SHARE"):
        parse_trace("20,300")


def test_budgets_separate_calm_from_congested():
    calibration = {"accurate_ms": {20.0: 800.0, 50.0: 1000.0, 300.0: 3000.0}, "fast_ms": 700.0}
    budgets = derive_budgets(calibration, parse_trace("20:1,300:1,50:1"))
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    assert budgets[0] >= 1.5 * 1000 and budgets[-1] < 3000  # calm accurate fits every one, congested none


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 9, 3]) == (2, 3)
    assert agreement([], [1]) == (0, 0)


@pytest.mark.slow
def test_bench_router_reports_each_policy(demo_checkpoint):
    from partitioner.plan.demo import demo_plan
    from splitglm.bench.router import bench_router

    max_tokens = 4
    result = bench_router(
        str(demo_plan(demo_checkpoint)), requests=12, max_tokens=max_tokens, policies=("accurate", "fast"),
        calibration_repeats=2, progress=False,
    )  # fmt: skip
    trace = result["trace"]
    assert [p["requests"] for p in trace["phases"]] == [5, 4, 3] and trace["budgets_ms"] == sorted(trace["budgets_ms"])
    by_policy = {r["policy"]: r for r in result["results"]}
    assert list(by_policy) == ["accurate", "fast"]
    for r in by_policy.values():
        assert set(r) == FIELDS and r["requests"] == 12 and r["errors"] == 0
        for name in ("budget_met_frac", "accurate_token_frac", "accurate_token_frac_calm", "token_agreement"):
            assert 0 <= r[name] <= 1, (name, r)
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert [p["requests"] for p in r["phases"]] == [5, 4, 3]
    accurate, fast = by_policy["accurate"], by_policy["fast"]
    assert accurate["accurate_token_frac"] == 1 and accurate["token_agreement"] == 1
    assert accurate["switches"] == 0 and accurate["degraded"] == 0
    # the proxy is on the accurate path: a request pays the congested round trip (300 ms, not 20) for its
    # prompt and at least once more for the other tokens (one per token, or fewer when speculation verifies
    # several per round trip)
    calm, congested = accurate["phases"][0]["p50_ms"], accurate["phases"][1]["p50_ms"]
    assert congested - calm > 1.5 * (300 - 20), accurate["phases"]
    assert fast["accurate_token_frac"] == 0 and fast["accurate_token_frac_calm"] == 0
    assert len(result["records"]) == 24 and all(row["wall_ms"] > 0 for row in result["records"])
