"""``splitglm bench speculative`` on the real demo model, briefly: real processes, the delaying proxy, both paths."""

from __future__ import annotations

import pytest

from splitglm.bench.speculative import bench_speculative, format_rows, prompts

FIELDS = {"path", "rtt_ms", "mode", "tokens_per_s", "tokens_per_s_baseline", "speedup", "identical_frac",
          "acceptance_rate", "tokens_per_round_trip", "p50_token_ms", "p99_token_ms"}  # fmt: skip


def test_prompts_alternate_two_kinds_of_text():
    kinds = [kind for kind, _ in prompts(6)]
    assert kinds == ["gpl", "python-docs"] * 3
    assert len({text for _, text in prompts(6)}) == 6


@pytest.mark.slow
def test_a_short_run_gives_identical_tokens_and_every_field(demo_checkpoint):
    from partitioner.plan.demo import demo_plan

    rows = bench_speculative(str(demo_plan(demo_checkpoint)), rtts=(60,), requests=1, max_tokens=10)
    assert [(r["path"], r["mode"]) for r in rows] == [("http", "greedy"), ("device", "greedy"),
                                                      ("http", "sampled"), ("device", "sampled")]
    for row in rows:
        assert FIELDS <= set(row) and row["rtt_ms"] == 60
        assert row["identical_frac"] == 1.0  # speculation never changes a token
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_baseline"] > 0
    assert "tokens_per_round_trip" in format_rows(rows)
