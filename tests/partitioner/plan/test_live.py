"""Live runs: three tier processes on loopback give the in-process chain's tokens, with shaped links."""

from __future__ import annotations

import multiprocessing as mp

import torch

from partitioner.plan.live import LiveChain, dilated_ms, measure_candidates, summary
from partitioner.plan.topology import Topology
from runtime.local import Chain, split_segments


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
            "workload": [{"prompt_tokens": 12, "output_tokens": 4}],
        }
    )


def _no_children_left():
    assert [p for p in mp.active_children() if p.name.startswith("splitglm-live")] == []


def test_live_tokens_equal_chain_and_links_are_shaped(tiny_glm):
    prompt = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    chain = Chain(split_segments(tiny_glm, 2, 4))
    expected = [t for t, _ in chain.generate(prompt, 6)]
    topo = _topo(rtt_ms=50.0)
    codecs = {"device_edge": "fp32", "edge_cloud": "fp32"}
    none = {"device": "none", "edge": "none", "cloud": "none"}
    try:
        with LiveChain(tiny_glm, topo, (2, 4), codecs, none) as live:
            run = live.run(prompt, 5)
            again = live.run(prompt, 5)  # a second session on the same processes
    finally:
        _no_children_left()
    assert run.tokens == expected and again.tokens == expected
    assert run.ttft_ms > 0 and run.per_token_ms > 0
    assert run.per_token_ms >= 50.0  # one RTT on each link (25 + 25 ms) per token
    assert all(s["compute_ms"][t] > 0 for s in run.steps for t in ("device", "edge", "cloud"))


def test_dilation_rescales_compute():
    topo = _topo()
    topo.tiers["cloud"].speed_factor = 4.0
    topo.tiers["device"].speed_factor = 0.5
    got = dilated_ms(100.0, {"device": 10.0, "edge": 20.0, "cloud": 40.0}, topo)
    assert got == 100.0 + 10.0 + 0.0 - 30.0


def test_measure_candidates_rows(tiny_glm):
    topo = _topo(rtt_ms=10.0)
    cand = {
        "splits": [1, 5],
        "codecs": {"device_edge": "fp16", "edge_cloud": "int8"},
        "compression": {"device": "none", "edge": "int8", "cloud": "none"},
        "ttft_ms": 12.0,
        "per_token_ms": 11.0,
        "expected_ms": 45.0,
    }
    try:
        rows = measure_candidates(tiny_glm, topo, [cand], repeats=1, max_decode_steps=3)
    finally:
        _no_children_left()
    (row,) = rows
    assert row["measured"]["per_token_ms"] >= 10.0
    assert row["measured"]["expected_ms"] > row["measured"]["ttft_ms"] > 0
    assert summary(rows)["within_5pct"]
