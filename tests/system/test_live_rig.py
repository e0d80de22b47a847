"""The planner's live rig on the real processes: a candidate plan exported and run with shaped links."""

from __future__ import annotations

import psutil
import pytest
import torch

from partitioner.plan.topology import Topology
from runtime.local import Chain, split_segments
from splitglm.live import system_rig

pytestmark = pytest.mark.slow
RTT_MS = 30.0  # each link's round trip


def _topo() -> Topology:
    tier = {"threads": 1, "memory_mb": 1024, "speed_factor": 1.0}
    link = {"bandwidth_mbit_s": 100, "rtt_ms": RTT_MS}
    return Topology.model_validate({
        "name": "live-test", "tiers": {"device": tier, "edge": tier, "cloud": tier},
        "links": {"device_edge": link, "edge_cloud": link}, "workload": [{"prompt_tokens": 12, "output_tokens": 6}],
    })  # fmt: skip


def test_system_rig_gives_the_chains_tokens_over_shaped_links(talking_model):
    model = talking_model  # (the owners load a tokenizer)
    prompt = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = [t for t, _ in Chain(split_segments(str(model), 2, 4)).generate(prompt, 6)]
    candidate = {"splits": [2, 4], "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"},
                 "compression": {"device": "none", "edge": "none", "cloud": "none"}}
    before = set(psutil.Process().children(recursive=True))
    with system_rig(str(model), _topo(), candidate) as live:
        started = set(psutil.Process().children(recursive=True)) - before
        run = live.run(prompt, 5)
        again = live.run(prompt, 5)  # a second session on the same processes
    assert len(started) >= 3  # broker, cloud, edge
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert run.tokens == expected and again.tokens == expected
    assert len(run.steps) == 6
    for step in run.steps:
        assert step["wall_ms"] >= 2 * RTT_MS  # one round trip on each link per step
        assert all(step["compute_ms"][t] > 0 for t in ("device", "edge", "cloud"))
