"""``splitglm bench soak``, briefly: a few sessions on the secure topology for half a minute, nothing lost."""

from __future__ import annotations

import pytest

from splitglm.bench.soak import bench_soak, format_report

pytestmark = pytest.mark.slow


def test_a_short_soak_fails_nothing_and_reports_memory(demo_checkpoint):
    from partitioner.plan.demo import demo_plan

    report = bench_soak(str(demo_plan(demo_checkpoint)), minutes=0.5, sessions=4, max_tokens=12,
                        slow_consumers=False)
    assert report["requests_failed"] == 0, report["errors"]
    assert report["requests_done"] >= 4 and report["tokens"] > 0 and report["tokens_per_s"] > 0
    assert (report["http_sessions"], report["mqtt_sessions"]) == (2, 2) and report["secure"]
    assert {"broker", "cloud", "edge", "bench (devices)"} == set(report["rss_mib"])
    assert all(m["after_warmup"] > 0 and m["end"] > 0 for m in report["rss_mib"].values())
    assert report["p99_token_ms"] >= report["p50_token_ms"] > 0
    assert set(report["exit_codes"].values()) == {0}
    assert "requests: " in format_report(report)
