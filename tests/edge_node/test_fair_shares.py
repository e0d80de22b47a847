"""Fair shares at a real edge: a device at its session and KV quota is refused by name while the others are served.

A real Mosquitto, a real cloud process, an ``EdgeNode`` in this process (relay,
router, HTTP API) on the talking plan, an honest ``DeviceAgent`` in this
process answering readings, and a hog: a plain paho device that opens
sessions and keeps them. The hog's refusals arrive on its own steps topic as
RESOURCE_EXHAUSTED naming the limit and its value; the honest device's
reading and an HTTP request are answered meanwhile; every share comes back
when the sessions are closed, fail, run on the fast path or idle out.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from device_agent.agent import DeviceAgent
from device_agent.settings import DeviceSettings
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from protos.topics import sensor_topic
from runtime.report import path_name
from splitglm.system import ResultListener
from tests.edge_node.test_relay import Edges, MqttDevice, wait_until

EDGE = "edge-fair"
EXHAUSTED = 8  # RESOURCE_EXHAUSTED


def refusals(node, limit: str) -> float:
    value = node.metrics.registry.get_sample_value("splitglm_edge_quota_refusals_total",
                                                   {"limit": limit, "kind": "device"})
    return value or 0.0


def first_frame(sid: str, max_tokens: int, **params) -> pb.Frame:
    """Seq 0 of a session: 3 prompt rows (the tiny model's 64 channels) and its generation parameters."""
    return make_frame(sid, 0, 0, torch.randn(3, 64), "fp32", params=pb.GenerationParams(max_tokens=max_tokens,
                                                                                      **params))


@pytest.fixture()
def edges(talking_plan, mosquitto, cloud):
    e = Edges(talking_plan, mosquitto.url, cloud)
    yield e
    e.close()


def test_a_device_at_its_quota_does_not_stop_another_device_nor_http(edges, mosquitto, talking_plan):
    node = edges.start(EDGE, mqtt_protocol="5", device_max_sessions=2, device_max_kv_positions=400)
    hog = MqttDevice(mosquitto.url, device_id="hog")
    honest = DeviceAgent(DeviceSettings(plan=talking_plan, device_id="honest", broker=mosquitto.url, max_tokens=4,
                                        step_timeout_s=30))
    listener = ResultListener(mosquitto.url, "honest")
    honest.start()
    try:
        assert honest.ready.wait(30)
        for sid in ("a", "b"):  # 3 + 150 positions each: 306 of 400 (the honest device's prompt is 140)
            hog.send(EDGE, first_frame(sid, 150))
            assert not hog.receive()[0].error
        hog.send(EDGE, first_frame("c", 1))
        refused = hog.receive()[0]
        assert refused.status == EXHAUSTED and refused.session_id == "c"
        assert "device_max_sessions is 2 sessions per device" in refused.error, refused.error
        hog.send(EDGE, make_frame("b", 1, 0, None, close=True))
        assert wait_until(lambda: node.relay.shares.held("hog") == (1, 153))
        hog.send(EDGE, first_frame("d", 250))  # 153 + 253 > 400
        refused = hog.receive()[0]
        assert refused.status == EXHAUSTED and "device_max_kv_positions is 400 KV positions" in refused.error
        assert refusals(node, "sessions") == 1 and refusals(node, "kv_positions") == 1
        assert set(node.relay.sessions) == {"a"}

        # meanwhile the hog holds its whole share: another device's reading and an HTTP request are answered
        listener.client.publish(sensor_topic("honest", "temperature"), b'{"value": 21.5, "unit": "C"}', qos=1)
        [answer] = listener.wait_for_readings(1, 120)
        assert answer["error"] is None and answer["tokens"] >= 1, answer
        r = httpx.post(f"{node.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert node.relay.shares.held("hog") == (1, 153)  # the honest session's share came and went

        hog.send(EDGE, make_frame("a", 1, 0, None, close=True))
        assert wait_until(lambda: node.relay.shares.holders() == 0 and not node.relay.sessions)
        assert node.relay.queued.holders() == 0
        hog.send(EDGE, first_frame("e", 150))  # the share is back: a new session is taken
        assert not hog.receive()[0].error
    finally:
        honest.stop()
        listener.close()
        hog.close()


def test_the_share_comes_back_when_a_session_fails_idles_out_or_runs_on_the_fast_path(edges, mosquitto):
    node = edges.start(EDGE, mqtt_protocol="5", device_max_sessions=1, session_ttl_s=0.5, max_tokens_limit=64,
                       default_max_tokens=16)
    hog = MqttDevice(mosquitto.url, device_id="hog")
    shares = node.relay.shares
    try:
        hog.send(EDGE, first_frame("too-long", 65))  # over max_tokens_limit: refused, not clipped
        refused = hog.receive()[0]
        assert refused.status == EXHAUSTED and "max_tokens 65 exceeds max_tokens_limit, 64" in refused.error
        assert refusals(node, "max_tokens") == 1 and shares.holders() == 0

        fails = make_frame("fails", 0, 5, torch.randn(3, 64), "fp32", params=pb.GenerationParams(max_tokens=4))
        hog.send(EDGE, fails)  # a first step that does not start at position 0 fails: no session, no share
        assert hog.receive()[0].error
        assert wait_until(lambda: shares.holders() == 0) and not node.relay.sessions

        hog.send(EDGE, first_frame("fast", 4, policy="fast"))  # the fast tail at the edge holds it
        result = hog.receive()[0]
        assert not result.error and path_name(result.path) == "fast" and shares.held("hog") == (1, 7)
        hog.send(EDGE, first_frame("second", 4))
        assert "device_max_sessions is 1" in hog.receive()[0].error
        assert wait_until(lambda: shares.holders() == 0 and not node.relay.sessions, timeout=10)  # idled out

        hog.send(EDGE, first_frame("again", 4))
        assert not hog.receive()[0].error
    finally:
        hog.close()


def test_queued_frames_and_bytes_and_frame_rate_per_device(edges, mosquitto):
    """The queue and rate shares, with a queue filled by hand (a frame waiting or running takes its place)."""
    import paho.mqtt.client as mqtt

    from protos import topics
    from protos.frames import frame_to_bytes

    node = edges.start(EDGE, mqtt_protocol="5", device_max_queued_frames=2, device_max_queued_bytes=8192,
                       max_frame_bytes=8192, device_frames_per_s=5)
    hog, other = MqttDevice(mosquitto.url, device_id="hog"), MqttDevice(mosquitto.url, device_id="other")
    relay = node.relay

    def deliver(device: MqttDevice, frame: pb.Frame) -> pb.StepResult:
        message = mqtt.MQTTMessage(topic=topics.frames_topic(EDGE, device.device_id).encode())
        message.payload = frame_to_bytes(frame)
        relay._accept(message)  # what paho's callback does
        return device.receive()[0]

    try:
        relay.queued.acquire("hog", ("held", 0), 100)
        relay.queued.acquire("hog", ("held", 1), 100)
        refused = deliver(hog, first_frame("q", 2))
        assert refused.status == EXHAUSTED and "device_max_queued_frames is 2 frames" in refused.error
        relay.queued.release(("held", 0))
        relay.queued.release(("held", 1))
        relay.queued.acquire("hog", ("held", 1), 8000)
        refused = deliver(hog, first_frame("q", 2))
        assert refused.status == EXHAUSTED and "device_max_queued_bytes is 8192 bytes" in refused.error
        assert not deliver(other, first_frame("o", 2)).error  # another device's queue is its own
        relay.queued.release(("held", 1))
        assert refusals(node, "queued_frames") == 1 and refusals(node, "queued_bytes") == 1
        assert relay.queued.holders() == 0

        flood = MqttDevice(mosquitto.url, device_id="flood")  # frames of no session: NOT_FOUND, then over the rate
        answers = [deliver(flood, make_frame("none", 1, 3, torch.randn(1, 64), "fp32")) for _ in range(12)]
        assert answers[0].status == 5 and refusals(node, "frames_rate") >= 1
        assert any(a.status == EXHAUSTED and "device_frames_per_s is 5 frames per second" in a.error for a in answers)
        assert not deliver(other, first_frame("o2", 2)).error  # another device's rate is its own
        assert relay.queued.holders() == 0
        flood.close()
    finally:
        hog.close()
        other.close()
