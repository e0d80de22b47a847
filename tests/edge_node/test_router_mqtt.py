"""Device sessions over MQTT go through the router too: a real Mosquitto broker, a real cloud process, an in-process
EdgeNode, and a device driven by plain paho (``tests/edge_node/test_relay.py``); the device's answer JSON
(``device_agent.agent.summary``) reports what the router did, from the StepResults alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from device_agent.agent import summary
from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings
from protos import splitglm_pb2 as pb
from runtime.artifacts import load_tier
from runtime.owner import Generation
from splitglm.linkproxy import DelayProxy
from tests.edge_node.test_cloud_client import Letters, start_cloud
from tests.edge_node.test_relay import MqttDevice, MqttDownstream, wait_until
from tests.edge_node.test_router import PROMPT, exact_plan, reference, warm_up  # noqa: F401 -- fixtures


@pytest.fixture()
def system(exact_plan, mosquitto):  # noqa: F811 -- the imported fixture
    """A cloud process behind a delaying proxy, an edge with MQTT, a device: (cloud proc, proxy, edge, device)."""
    proc, address = start_cloud(exact_plan)
    host, port = address.rsplit(":", 1)
    proxy = DelayProxy(host, int(port), rtt_ms=150).start()
    node = EdgeNode(EdgeSettings(plan=exact_plan, broker=mosquitto.url, cloud=proxy.address, edge_id="edge-r",
                                 http_host="127.0.0.1", http_port=0, connect_timeout_s=30, mqtt_protocol="5",
                                 speculate=False))  # one frame a token here (test_speculative drafts)
    device = None
    try:
        node.start()
        device = MqttDevice(mosquitto.url)
        yield proc, proxy, node, device
    finally:
        if device is not None:
            device.close()
        node.close()
        proxy.stop()
        proc.stop()


def device_generation(segment, device, n: int, on_token=None, **params) -> tuple[Generation, MqttDownstream]:
    """A device agent's session: its frames carry the deadline it sets from its budget (as ``DeviceAgent`` does)."""
    downstream = MqttDownstream(device)
    budget = params.get("latency_budget_ms", 0)
    gen = Generation(segment, downstream, PROMPT, pb.GenerationParams(max_tokens=n, **params), "fp32", Letters(),
                     deadline_unix_ms=int(time.time() * 1e3) + budget if budget else 0, lock=threading.Lock())
    for i, _ in enumerate(gen):
        if on_token is not None:
            on_token(i)
    return gen, downstream


def test_device_answers_report_paths_predictions_and_degradation(system, exact_plan, reference):  # noqa: F811
    proc, proxy, node, device = system
    segment = load_tier(exact_plan, "device")  # embedding + [0, k1)

    warm_up(node, tokens=22)  # the estimates are the edge's, whichever kind of session measured them
    budget = 1200  # the cloud needs 8 x (150 ms + the MQTT hops): only the fast path fits
    gen, downstream = device_generation(segment, device, 8, latency_budget_ms=budget, policy="adaptive")
    results = [r for r, _, _ in downstream.answers]
    assert all(r.path == pb.FAST and not r.error for r in results) and results[0].predicted_ms > 0
    assert results[0].policy == "adaptive" and all(r.edge_id == "edge-r" for r in results)
    answer = summary(gen)
    assert answer["path"] == "fast" and answer["paths"] == ["fast"] * 8 and answer["switches"] == []
    assert answer["policy"] == "adaptive" and answer["degraded"] is False and answer["budget_met"] is True
    assert 0 < answer["predicted_ms"] < budget and answer["actual_ms"] == answer["timings_ms"]["total"] <= budget
    assert gen.tokens == reference[:8]

    def kill(i: int) -> None:
        if i == 3:
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)

    gen, downstream = device_generation(segment, device, 12, kill)  # no budget: accurate until the cloud dies
    answer = summary(gen)
    assert answer["tokens"] == 12 and answer["finish_reason"] == "length" and answer["error"] is None
    assert answer["paths"] == ["accurate"] * 4 + ["fast"] * 8 and answer["path"] == "mixed"
    assert answer["degraded"] is True and answer["budget_met"] is None
    assert [s["token"] for s in answer["switches"]] == [4] and answer["switches"][0]["reason"].startswith("cloud_error")
    assert gen.tokens == reference[:12]
    assert [r.degraded for r, _, _ in downstream.answers] == [False] * 4 + [True] * 8
    assert wait_until(lambda: not node.relay.sessions and node.router.fast.sessions() == 0)
