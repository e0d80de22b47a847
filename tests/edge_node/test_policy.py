"""The router's policy: choosing a path from the budget, and switching a running generation in time."""

from __future__ import annotations

import pytest

from edge_node.estimates import Estimates, Seed
from edge_node.policy import DEFAULT_POLICY, Policy, choose, parse_policy, should_switch, total_budget_ms

# accurate: 20 ms round trip, 50 ms steps; fast: no round trip, 20 ms steps, 0.5 ms per position to replay
SEEDS = {
    "accurate": Seed(prefill_ms_per_token=1.0, step_ms=50.0, rtt_ms=20.0, replay_ms_per_token=1.0),
    "fast": Seed(prefill_ms_per_token=1.0, step_ms=20.0, rtt_ms=0.0, replay_ms_per_token=0.5),
}
P, N = 100, 21  # accurate: 20 + 100 + 20 * 50 = 1120 ms; fast: 100 + 20 * 20 = 500 ms


def estimates() -> Estimates:
    return Estimates(SEEDS)


def test_policy_names():
    assert DEFAULT_POLICY is Policy.ADAPTIVE and parse_policy(None) is Policy.ADAPTIVE
    assert parse_policy("fast") is Policy.FAST and parse_policy(Policy.ACCURATE) is Policy.ACCURATE
    with pytest.raises(ValueError, match="known: adaptive, accurate, fast"):
        parse_policy("cheapest")


def test_budgets():
    assert total_budget_ms(10) is None
    assert total_budget_ms(10, latency_budget_ms=500) == 500
    assert total_budget_ms(10, token_budget_ms=30) == 300  # per token * max_tokens
    assert total_budget_ms(10, latency_budget_ms=500, token_budget_ms=30) == 300  # the stricter
    with pytest.raises(ValueError, match="> 0"):
        total_budget_ms(10, latency_budget_ms=0)


def test_tight_budget_goes_fast_loose_goes_accurate_none_goes_accurate():
    est = estimates()
    tight = choose("adaptive", 800, P, N, est, margin=0.2)
    assert tight.path == "fast" and tight.predicted_ms == pytest.approx(500)
    loose = choose("adaptive", 1400, P, N, est, margin=0.2)  # 1120 * 1.2 = 1344 fits
    assert loose.path == "accurate" and loose.predicted_high_ms == pytest.approx(1120)
    assert choose("adaptive", 1300, P, N, est, margin=0.2).path == "fast"  # fits, but not with the margin
    none = choose("adaptive", None, P, N, est)
    assert none.path == "accurate" and "no latency budget" in none.reason
    per_token = total_budget_ms(N, token_budget_ms=30)  # 630 ms for 21 tokens
    assert choose("adaptive", per_token, P, N, est).path == "fast"


def test_explicit_policies_are_honoured():
    est = estimates()
    assert choose("accurate", 10, P, N, est).path == "accurate"  # even when it cannot fit
    assert choose(Policy.FAST, None, P, N, est).path == "fast"  # even without a budget
    assert not should_switch("accurate", 5000, 5, N, 1000, est, prompt_tokens=P)
    assert not should_switch("fast", 5000, 5, N, 1000, est, prompt_tokens=P)


def test_no_switch_to_a_path_that_is_no_quicker():
    slow_edge = Estimates({**SEEDS, "fast": Seed(prefill_ms_per_token=5.0, step_ms=80.0)})
    d = choose("adaptive", 800, P, N, slow_edge)
    assert d.path == "accurate" and "no quicker" in d.reason
    assert not should_switch("adaptive", 700, 5, N, 800, slow_edge, prompt_tokens=P)


def test_switching_fires_when_the_accurate_step_jumps_mid_generation():
    est = estimates()
    budget = 2000.0  # 1120 ms predicted: accurate
    assert choose("adaptive", budget, P, N, est).path == "accurate"
    elapsed, done = 140.0, 1  # prefill: 20 ms round trip + 100 positions
    for _ in range(30):  # settle the estimates on 50 ms steps; nothing to switch
        est.accurate.observe_step(50.0)
    for _ in range(4):  # tokens 2..5 at 50 ms
        elapsed += 50.0
        done += 1
        assert not should_switch("adaptive", elapsed, done, N, budget, est, prompt_tokens=P)
    fired = None
    for step in range(1, 10):  # the cloud slows down to 300 ms per step
        est.accurate.observe_step(300.0)
        elapsed += 300.0
        done += 1
        if should_switch("adaptive", elapsed, done, N, budget, est, prompt_tokens=P):
            fired = step
            break
    # 16 tokens left at 300 ms no longer fit in the ~1.5 s left; 16 fast steps + a 105-position replay do
    assert fired is not None and fired <= 4
    left = N - done
    assert left * est.accurate.get("step", "high") > budget - elapsed


def test_switching_accounts_for_the_replay_of_a_long_history():
    est = estimates()
    for _ in range(30):
        est.accurate.observe_step(300.0)
    # 2 tokens left: 600 ms on the accurate path vs 40 ms of fast steps + replaying the history
    assert should_switch("adaptive", 900, 19, N, 1000, est, prompt_tokens=100)  # replay ~59 ms
    assert not should_switch("adaptive", 900, 19, N, 1000, est, prompt_tokens=2000)  # replay ~1 s: stay
    assert not should_switch("adaptive", 900, N, N, 1000, est, prompt_tokens=100)  # nothing left
    assert not should_switch("adaptive", 900, 19, N, None, est, prompt_tokens=100)  # no budget
