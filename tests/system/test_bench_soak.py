"""``splitglm bench soak``, briefly: a few sessions on the secure topology for a quarter of a minute, nothing lost."""

from __future__ import annotations

import pytest

from splitglm.bench.soak import bench_soak, format_report

pytestmark = pytest.mark.slow


def test_a_short_soak_fails_nothing_and_reports_memory(demo_checkpoint):
    from partitioner.plan.demo import demo_plan

    report = bench_soak(str(demo_plan(demo_checkpoint)), minutes=0.25, sessions=4, max_tokens=12,
                        slow_consumers=False)
    assert report["requests_failed"] == 0, report["errors"]
    assert report["requests_done"] >= 4 and report["tokens"] > 0 and report["tokens_per_s"] > 0
    assert (report["http_sessions"], report["mqtt_sessions"]) == (2, 2) and report["secure"]
    assert {"broker", "cloud", "edge", "bench (devices)"} == set(report["rss_mib"])
    assert all(m["after_warmup"] > 0 and m["end"] > 0 for m in report["rss_mib"].values())
    assert report["p99_token_ms"] >= report["p50_token_ms"] > 0
    assert set(report["exit_codes"].values()) == {0}
    assert "requests: " in format_report(report)


def test_a_short_soak_with_abusers_serves_the_honest_sessions_and_refuses_the_abusers(demo_checkpoint):
    from partitioner.plan.demo import demo_plan
    from splitglm.bench.abuse import refusals

    report = bench_soak(str(demo_plan(demo_checkpoint)), minutes=0.25, sessions=4, max_tokens=8,
                        slow_consumers=False, abusers=True)
    assert report["requests_failed"] == 0, report["errors"]
    assert report["requests_done"] >= 4
    abusers = report["abusers"]
    assert abusers["device"].get("device_max_sessions", 0) > 0, abusers["device"]  # beyond its 4 sessions
    assert abusers["device"].get("served", 0) > 0  # within its share it is served
    assert any(kind.startswith("http 429") for kind in abusers["key"]), abusers["key"]
    assert abusers["impostor"].get("mqtt wrong password: refused", 0) > 0, abusers["impostor"]
    assert abusers["impostor"].get("mqtt foreign client id: refused", 0) > 0
    assert not any("ACCEPTED" in kind for kind in abusers["impostor"])
    assert all(refusals(counts) > 0 for counts in abusers.values())
    assert set(report["exit_codes"].values()) == {0}
    assert "abusive key: " in format_report(report)
