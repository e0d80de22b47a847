"""``splitglm bench split`` on the real demo model: real processes, both split paths, a short run."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bench_split_reports_both_paths_and_where_the_time_goes(demo_checkpoint):
    from partitioner.plan.demo import demo_plan
    from splitglm.bench.split import bench_split

    plan = demo_plan(demo_checkpoint, codecs=("fp32", "fp32"))
    result = bench_split(str(plan), demo_checkpoint, tokens=6, repeats=1)
    for key in ("monolithic_ms_per_token", "split_http_ms_per_token", "split_mqtt_ms_per_token"):
        assert result[key] > 0
    assert result["overhead_pct"] == pytest.approx(
        100 * (result["split_http_ms_per_token"] / result["monolithic_ms_per_token"] - 1), abs=0.1
    )
    http, device = result["split_http_stages_ms"], result["split_mqtt_stages_ms"]
    assert set(http) == {"owner", "edge_cloud_link", "cloud"}  # the edge owns HTTP sessions
    assert set(device) == {"owner", "owner_edge_link", "edge", "edge_cloud_link", "cloud"}
    assert all(ms >= 0 for ms in [*http.values(), *device.values()])
    # the stages are parts of the device's steps: together no longer than its time per token
    assert sum(device.values()) <= result["split_mqtt_ms_per_token"] + 0.5
