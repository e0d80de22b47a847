"""The planner's side of live runs: candidates run on a rig passed in, time dilation, rows and summary.

The rig on real processes (``splitglm.live.system_rig``) is tested in ``tests/system/test_live_rig.py``.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from partitioner.plan.live import LiveRun, contrasting, dilated_ms, format_table, measure_candidates, summary
from partitioner.plan.topology import Topology

CANDIDATE = {
    "splits": [1, 5],
    "codecs": {"device_edge": "fp16", "edge_cloud": "int8"},
    "compression": {"device": "none", "edge": "int8", "cloud": "none"},
    "ttft_ms": 12.0,
    "per_token_ms": 11.0,
    "expected_ms": 45.0,
}


def _topo(rtt_ms: float = 50.0, speed: float = 1.0) -> Topology:
    tier = {"threads": 1, "memory_mb": 1024, "speed_factor": speed}
    return Topology.model_validate(
        {
            "name": "test",
            "tiers": {"device": tier, "edge": tier, "cloud": tier},
            "links": {
                "device_edge": {"bandwidth_mbit_s": 100, "rtt_ms": rtt_ms / 2},
                "edge_cloud": {"bandwidth_mbit_s": 100, "rtt_ms": rtt_ms / 2},
            },
            "workload": [{"prompt_tokens": 12, "output_tokens": 4, "weight": 3},
                         {"prompt_tokens": 20, "output_tokens": 3, "weight": 1}],
        }
    )


class FakeRig:
    """A rig whose steps take fixed times: prefill 10 ms + 1 ms per prompt token, decode 4 ms (1 ms cloud)."""

    def __init__(self):
        self.started, self.runs = [], []

    @contextmanager
    def __call__(self, model, topo, candidate, threads):
        self.started.append((candidate["splits"], threads))
        yield self

    def run(self, prompt_ids: list[int], decode_steps: int) -> LiveRun:
        self.runs.append((len(prompt_ids), decode_steps))
        prefill = {"wall_ms": 10.0 + len(prompt_ids), "compute_ms": {"device": 2.0, "edge": 2.0, "cloud": 2.0}}
        decode = [{"wall_ms": 4.0, "compute_ms": {"device": 1.0, "edge": 1.0, "cloud": 1.0}}] * decode_steps
        return LiveRun(list(range(1 + decode_steps)), [dict(s) for s in [prefill, *decode]])


def test_dilation_rescales_compute():
    topo = _topo()
    topo.tiers["cloud"].speed_factor = 4.0
    topo.tiers["device"].speed_factor = 0.5
    got = dilated_ms(100.0, {"device": 10.0, "edge": 20.0, "cloud": 40.0}, topo)
    assert got == 100.0 + 10.0 + 0.0 - 30.0
    run = LiveRun([1, 2], [{"wall_ms": 100.0, "compute_ms": {"device": 10.0, "edge": 20.0, "cloud": 40.0}},
                           {"wall_ms": 8.0, "compute_ms": {"cloud": 4.0}}]).dilate(topo)
    assert run.ttft_ms == got and run.per_token_ms == 8.0 - 3.0


def test_measure_candidates_runs_each_workload_on_the_rig(tiny_glm):
    rig = FakeRig()
    topo = _topo(rtt_ms=10.0)
    topo.tiers["cloud"].speed_factor = 2.0  # the cloud's compute counts half
    rows = measure_candidates(tiny_glm, topo, [CANDIDATE, {**CANDIDATE, "splits": [2, 4]}], rig, repeats=2,
                              max_decode_steps=16, threads=1)
    assert rig.started == [([1, 5], 1), ([2, 4], 1)]
    # per candidate: a warm-up, then two runs of each workload (decode steps = output_tokens - 1)
    assert rig.runs[:5] == [(8, 2), (12, 3), (12, 3), (20, 2), (20, 2)]
    row = rows[0]
    assert row["measured"]["per_token_ms"] == 4.0 - 0.5
    ttft = {12: 22.0 - 1.0, 20: 30.0 - 1.0}
    assert row["measured"]["ttft_ms"] == pytest.approx((3 * ttft[12] + ttft[20]) / 4)
    expected = (3 * (ttft[12] + 3 * 3.5) + (ttft[20] + 2 * 3.5)) / 4
    assert row["measured"]["expected_ms"] == pytest.approx(expected, abs=1e-3)
    assert row["predicted"] == {"ttft_ms": 12.0, "per_token_ms": 11.0, "expected_ms": 45.0}
    assert row["predicted_live"] is None  # no measurements given
    assert row["error_pct"] == pytest.approx(100 * (expected - 45.0) / 45.0, abs=0.01)
    assert (row["threads"], row["repeats"], row["max_decode_steps"]) == (1, 2, 16)
    s = summary(rows)
    assert s["within_5pct"] and s["gap_pct"] == 0.0 and s["chosen_splits"] == [1, 5]
    table = format_table(rows)
    assert len(table) == 4 and table[2].startswith("| 1 | 1,5 | fp16 / int8 | none / int8 |")


def test_contrasting_adds_other_cuts():
    ranked = [{**CANDIDATE, "splits": s} for s in ([1, 5], [1, 5], [2, 4], [3, 3], [2, 6])]
    ranked[1] = {**ranked[1], "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"}}
    picks = contrasting(ranked, 6, ranked[:1])
    assert [p["splits"] for p in picks] == [[2, 4], [3, 3], [2, 6]]  # [1, 5] with other codecs: not other cuts
