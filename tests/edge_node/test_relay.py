"""The edge's MQTT relay with a real Mosquitto broker, a real cloud process and device frames from a plain paho client.

The edges run in this process (``EdgeNode``, all of it: relay, cloud client,
HTTP app), so the tests can look at their sessions and metrics.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings
from protos import splitglm_pb2 as pb
from protos import topics
from protos.frames import frame_to_bytes, make_frame
from runtime.local import Chain, split_segments
from runtime.owner import Generation
from runtime.segment import SegmentInput
from tests.edge_node.test_cloud_client import Letters

PROMPTS = [[3, 17, 5, 9, 11, 40, 2], [7, 1, 8], [50, 60, 70, 80, 90], [12, 13]]


def expected(tiny_glm, prompt, n) -> list[int]:
    return [t for t, _ in Chain(split_segments(tiny_glm, 2, 4)).generate(prompt, n)]


class Edges:
    """Edge nodes in this process; all closed at the end of the test."""

    def __init__(self, plan, broker, cloud):
        self.plan, self.broker, self.cloud, self.nodes = plan, broker, cloud, []

    def start(self, edge_id: str, **settings) -> EdgeNode:
        settings = {"speculate": False, **settings}  # one frame a token here (test_speculative drafts)
        node = EdgeNode(EdgeSettings(plan=self.plan, broker=self.broker, cloud=self.cloud, edge_id=edge_id,
                                     http_host="127.0.0.1", http_port=0, connect_timeout_s=30, **settings))
        self.nodes.append(node)
        node.start()
        return node

    def close(self):
        for node in self.nodes:
            node.close()


@pytest.fixture()
def edges(tiny_plan, mosquitto, cloud):
    e = Edges(tiny_plan, mosquitto.url, cloud)
    yield e
    e.close()


class MqttDevice:
    """The MQTT side of a device agent, written with plain paho: frames out, StepResults in."""

    def __init__(self, url: str, protocol: int = mqtt.MQTTv5, device_id: str | None = None):
        self.v5 = protocol == mqtt.MQTTv5
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        self.reply_topic = topics.steps_topic(self.device_id)
        self.inbox: queue.Queue = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.client.on_connect = lambda c, *a: c.subscribe(self.reply_topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10), "the test device could not subscribe"

    def _on_message(self, client, userdata, message):
        props = getattr(message, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        correlation = bytes(getattr(props, "CorrelationData", b"")) if props is not None else b""
        self.inbox.put((message.payload, correlation, user))

    def send(self, edge: str, payload: bytes | pb.Frame, correlation: bytes | None = None,
             reply_topic: str | None = None) -> None:
        """Publish a frame to ``edge`` (an edge id or a pool) under this device's id; ``reply_topic`` overrides."""
        reply_topic = reply_topic or self.reply_topic
        topic = topics.frames_topic(edge, self.device_id)
        if isinstance(payload, pb.Frame):
            if not self.v5:
                payload.reply_to = reply_topic  # 3.1.1: the reply topic travels in the payload
            correlation = correlation or topics.correlation(payload.session_id, payload.seq)
            payload = frame_to_bytes(payload)
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = correlation or b"none"
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def receive(self, timeout: float = 10.0) -> tuple[pb.StepResult, bytes, dict]:
        payload, correlation, user = self.inbox.get(timeout=timeout)
        return pb.StepResult.FromString(payload), correlation, user

    def nothing_more(self, wait_s: float = 0.3) -> bool:
        time.sleep(wait_s)
        return self.inbox.empty()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class MqttDownstream:
    """A device agent's Downstream: seq 0 to the pool, later frames to the edge that answered (its edge_id)."""

    def __init__(self, device: MqttDevice, pool: str = topics.DEFAULT_POOL):
        self.device, self.pool = device, pool
        self.edge_id = ""
        self.answers: list[tuple[pb.StepResult, bytes, dict]] = []

    def step(self, frame: pb.Frame) -> pb.StepResult:
        self.device.send(self.edge_id or self.pool, frame)
        answer = self.device.receive()
        self.answers.append(answer)
        self.edge_id = answer[0].edge_id
        return answer[0]

    def close(self, frame: pb.Frame) -> None:
        self.device.send(self.edge_id or self.pool, frame)


def generate(device_segment, device: MqttDevice, prompt, n=12, lock=None) -> tuple[Generation, MqttDownstream]:
    downstream = MqttDownstream(device)
    gen = Generation(device_segment, downstream, prompt, pb.GenerationParams(max_tokens=n), "fp32", Letters(),
                     lock=lock or threading.Lock())
    list(gen)
    return gen, downstream


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def steps_done(node: EdgeNode) -> float:
    return node.metrics.registry.get_sample_value("splitglm_edge_steps_total", {"path": "accurate"}) or 0.0


def test_v5_sessions_spread_over_a_shared_pool(edges, mosquitto, device_segment, tiny_glm):
    a, b = edges.start("edge-a", mqtt_protocol="5"), edges.start("edge-b", mqtt_protocol="auto")
    assert a.health() == {"broker": True, "cloud": True, "fast_path": True}
    device = MqttDevice(mosquitto.url)
    used = set()
    try:
        for prompt in PROMPTS:
            gen, downstream = generate(device_segment, device, prompt)
            assert gen.tokens == expected(tiny_glm, prompt, 12)
            results = [r for r, _, _ in downstream.answers]
            assert len({r.edge_id for r in results}) == 1  # session affinity: one edge served every step
            assert [r.seq for r in results] == list(range(12))
            for result, correlation, user in downstream.answers:
                assert correlation == topics.correlation(gen.session_id, result.seq)
                assert user == {topics.EDGE_ID_PROPERTY: result.edge_id}
            used.add(results[0].edge_id)
        assert device.nothing_more()  # one answer per frame: the pool subscription is shared, not doubled
    finally:
        device.close()
    assert used == {"edge-a", "edge-b"}  # Mosquitto deals the shared subscription's messages round robin
    assert wait_until(lambda: not a.relay.sessions and not b.relay.sessions)  # close frames freed them
    assert a.device_segment.sessions == {} and b.device_segment.sessions == {}


def test_v311_session_with_reply_to_in_the_payload(edges, mosquitto, device_segment, tiny_glm):
    node = edges.start("edge-old", mqtt_protocol="3.1.1")
    device = MqttDevice(mosquitto.url, mqtt.MQTTv311)
    try:
        gen, downstream = generate(device_segment, device, PROMPTS[0], 8)
    finally:
        device.close()
    assert gen.tokens == expected(tiny_glm, PROMPTS[0], 8)
    assert {r.edge_id for r, _, _ in downstream.answers} == {"edge-old"}
    assert steps_done(node) == 8
    for result, _, _ in downstream.answers:  # the edge's share of each step, and the cloud's inside it
        t = result.timings_ms
        assert 0 <= t["edge_queue"] and 0 < t["edge_compute"] and t["queue"] + t["compute"] <= t["tail"]
        assert t["edge_total"] >= t["edge_queue"] + t["edge_compute"] + t["tail"] - 0.01
    stages = gen.stage_breakdown()
    assert set(stages) == {"owner", "owner_edge_link", "edge", "edge_cloud_link", "cloud"}
    assert all(ms >= 0 for ms in stages.values()) and stages["cloud"] > 0
    assert sum(stages.values()) <= gen.per_token_ms + 0.1  # sub-intervals of the device's steps
    assert wait_until(lambda: not node.relay.sessions)


def test_duplicate_frames_are_answered_again_without_a_second_step(edges, mosquitto, device_segment, tiny_glm):
    node = edges.start("edge-dup", mqtt_protocol="5")
    device = MqttDevice(mosquitto.url)
    prompt = PROMPTS[0]
    params = pb.GenerationParams(max_tokens=4)
    try:
        hidden = device_segment([SegmentInput("dup", 0, input_ids=torch.tensor(prompt))])[0]
        first = make_frame("dup", 0, 0, hidden, "fp32", params=params)
        device.send("pool", first)
        r0, _, _ = device.receive()
        device.send("edge-dup", first)  # a redelivery after the answer
        again, _, _ = device.receive()
        assert again == r0 and steps_done(node) == 1
        assert list(r0.tokens) == expected(tiny_glm, prompt, 1)

        hidden = device_segment([SegmentInput("dup", len(prompt), input_ids=torch.tensor(r0.tokens))])[0]
        second = make_frame("dup", 1, len(prompt), hidden, "fp32")
        for _ in range(3):  # redeliveries while the step may still be running
            device.send("edge-dup", second)
        answers = [device.receive()[0]]
        while not device.nothing_more():
            answers.append(device.receive()[0])
        assert 1 <= len(answers) <= 3 and all(a == answers[0] for a in answers)
        assert steps_done(node) == 2
        assert list(answers[0].tokens) == expected(tiny_glm, prompt, 2)[1:]
        assert node.device_segment.cached_length("dup") == len(prompt) + 1
    finally:
        device.close()
        device_segment.close_session("dup")


def test_bad_frames_get_error_statuses_and_spare_other_sessions(edges, mosquitto, device_segment, tiny_glm):
    node = edges.start("edge-err", mqtt_protocol="5")
    good, bad = MqttDevice(mosquitto.url), MqttDevice(mosquitto.url)
    outcome = {}

    def run_good():
        outcome["tokens"] = generate(device_segment, good, PROMPTS[2], 24)[0].tokens

    runner = threading.Thread(target=run_good)
    runner.start()
    edge_topic = "edge-err"
    try:
        bad.send("pool", b"\xff\x00 not a frame", correlation=b"junk")
        result, correlation, user = bad.receive()
        assert result.status == 3 and result.error and correlation == b"junk"
        assert user == {topics.EDGE_ID_PROPERTY: "edge-err"}

        wrong_width = make_frame("narrow", 0, 0, torch.randn(3, 32), "fp32", params=pb.GenerationParams(max_tokens=2))
        bad.send(edge_topic, wrong_width)
        result, correlation, _ = bad.receive()
        assert result.status == 3 and "64" in result.error and correlation == topics.correlation("narrow", 0)

        bad.send(edge_topic, make_frame("ghost", 5, 9, torch.randn(1, 64), "fp32"))
        result, _, _ = bad.receive()
        assert (result.status, result.session_id, result.seq) == (5, "ghost", 5)

        hidden = torch.randn(2, 64)
        bad.send(edge_topic, make_frame("skip", 0, 0, hidden, "fp32", params=pb.GenerationParams(max_tokens=4)))
        assert not bad.receive()[0].error
        bad.send(edge_topic, make_frame("skip", 2, 3, hidden[:1], "fp32"))
        assert bad.receive()[0].status == 9  # FAILED_PRECONDITION: seq 1 comes first

        bad.send(edge_topic, make_frame("refused", 0, 0, hidden, "fp32", params=pb.GenerationParams(max_tokens=0)))
        result, _, _ = bad.receive()  # the cloud's INVALID_ARGUMENT, passed on; the session is freed
        assert result.status == 3 and "cloud" in result.error
        assert wait_until(lambda: "refused" not in node.relay.sessions)
    finally:
        runner.join(60)
        good.close()
        bad.close()
    assert outcome["tokens"] == expected(tiny_glm, PROMPTS[2], 24)


def test_idle_sessions_are_freed(edges, mosquitto):
    node = edges.start("edge-ttl", mqtt_protocol="5", session_ttl_s=0.4)
    device = MqttDevice(mosquitto.url)
    edge_topic = "edge-ttl"
    try:
        device.send(edge_topic, make_frame("idle", 0, 0, torch.randn(2, 64), "fp32",
                                           params=pb.GenerationParams(max_tokens=4)))
        assert not device.receive()[0].error
        assert "idle" in node.relay.sessions
        assert wait_until(lambda: "idle" not in node.relay.sessions and node.device_segment.sessions == {})
        device.send(edge_topic, make_frame("idle", 1, 2, torch.randn(1, 64), "fp32"))
        assert device.receive()[0].status == 5
    finally:
        device.close()


def test_a_device_is_answered_only_on_its_own_topic_and_owns_its_sessions(edges, mosquitto):
    node = edges.start("edge-id", mqtt_protocol="5")
    owner, other = MqttDevice(mosquitto.url, device_id="owner"), MqttDevice(mosquitto.url, device_id="other")

    def refused(reason: str) -> float:
        return node.metrics.registry.get_sample_value("splitglm_edge_mqtt_refused_total", {"reason": reason}) or 0.0

    try:
        owner.send("edge-id", make_frame("mine", 0, 0, torch.randn(2, 64), "fp32",
                                         params=pb.GenerationParams(max_tokens=4)))
        assert not owner.receive()[0].error
        # another device's frame for that session: refused, answered on the sender's own topic
        other.send("edge-id", make_frame("mine", 1, 2, torch.randn(1, 64), "fp32"))
        result, _, _ = other.receive()
        assert result.status == 7 and "another device" in result.error  # PERMISSION_DENIED
        assert refused("foreign_session") == 1
        # a reply topic of another device, as a v5 ResponseTopic or in the payload: refused, nobody else hears
        other.send("edge-id", make_frame("theirs", 0, 0, torch.randn(2, 64), "fp32",
                                         params=pb.GenerationParams(max_tokens=4)), reply_topic=owner.reply_topic)
        in_payload = make_frame("theirs", 0, 0, torch.randn(2, 64), "fp32", params=pb.GenerationParams(max_tokens=4))
        in_payload.reply_to = owner.reply_topic
        other.send("edge-id", in_payload)
        for _ in range(2):
            result, _, _ = other.receive()
            assert result.status == 7 and topics.steps_topic("other") in result.error
        assert refused("reply_to") == 2 and "theirs" not in node.relay.sessions
        # another device cannot close it either
        other.send("edge-id", make_frame("mine", 1, 0, None, close=True))
        assert wait_until(lambda: refused("foreign_close") == 1)
        assert "mine" in node.relay.sessions and owner.nothing_more()
        owner.send("edge-id", make_frame("mine", 1, 2, torch.randn(1, 64), "fp32"))
        assert not owner.receive()[0].error  # the session went on untouched
        owner.send("edge-id", make_frame("mine", 2, 0, None, close=True))
        assert wait_until(lambda: "mine" not in node.relay.sessions)
        assert other.nothing_more()
    finally:
        owner.close()
        other.close()


def test_frames_and_sessions_beyond_the_relay_limits_are_refused(edges, mosquitto):
    node = edges.start("edge-limits", mqtt_protocol="5", max_frame_positions=4, max_positions=10, max_prompt_tokens=8,
                       relay_max_sessions=1)
    device = MqttDevice(mosquitto.url)
    params = pb.GenerationParams(max_tokens=4)
    try:
        device.send("edge-limits", make_frame("wide", 0, 0, torch.randn(5, 64), "fp32", params=params))
        result, _, _ = device.receive()
        assert result.status == 8 and "limit" in result.error  # RESOURCE_EXHAUSTED: 5 rows > max_frame_positions
        device.send("edge-limits", make_frame("a", 0, 0, torch.randn(3, 64), "fp32", params=params))
        assert not device.receive()[0].error
        device.send("edge-limits", make_frame("b", 0, 0, torch.randn(3, 64), "fp32", params=params))
        result, _, _ = device.receive()
        assert result.status == 8 and "relay_max_sessions" in result.error
        device.send("edge-limits", make_frame("a", 1, 3, torch.randn(4, 64), "fp32"))
        assert not device.receive()[0].error  # 7 positions
        device.send("edge-limits", make_frame("a", 2, 7, torch.randn(4, 64), "fp32"))
        result, _, _ = device.receive()
        assert result.status == 8 and "max_positions" in result.error  # 11 > 10
        assert set(node.relay.sessions) == {"a"}
    finally:
        device.close()


def test_a_session_lane_holds_at_most_depth_waiting_tasks():
    from edge_node.relay import SerialLanes

    lanes, started, release, ran = SerialLanes(2, depth=2), threading.Event(), threading.Event(), []
    try:
        assert lanes.submit("s", lambda: (started.set(), release.wait(10), ran.append(0)))
        assert started.wait(5)
        assert lanes.submit("s", lambda: ran.append(1)) and lanes.submit("s", lambda: ran.append(2))
        assert not lanes.submit("s", lambda: ran.append(3))  # two already wait
        assert lanes.submit("other", lambda: ran.append(9))  # other sessions are not held up
        assert wait_until(lambda: 9 in ran)
        release.set()
        assert wait_until(lambda: len(ran) == 4) and [r for r in ran if r != 9] == [0, 1, 2]
    finally:
        release.set()
        lanes.shutdown()


@pytest.fixture(scope="module")
def onnx_edge_plan(tiny_glm, tmp_path_factory) -> str:
    """The tiny plan with its edge tier on ONNX Runtime (fp32): the relay builds its own [k1, k2) segment."""
    from partitioner.plan.export import cached_plan, fixed_plan
    from partitioner.plan.measure import compression_entry
    from partitioner.plan.profiler_onnx import BACKEND

    plan = fixed_plan((2, 4), ("fp32", "fp32"), {"edge": compression_entry(BACKEND, "none")})
    return str(cached_plan(tiny_glm, plan, tmp_path_factory.mktemp("onnx-plans")))


@pytest.mark.slow  # exports the edge tier to ONNX at load
def test_onnx_edge_tier_serves_device_frames(onnx_edge_plan, mosquitto, cloud, device_segment, tiny_glm):
    edges = Edges(onnx_edge_plan, mosquitto.url, cloud)  # the cloud tier is the same torch one as tiny_plan's
    device = MqttDevice(mosquitto.url)
    try:
        node = edges.start("edge-onnx")
        assert not hasattr(node.segment, "view")  # an ONNX session: [k1, k2) is a segment of its own
        for prompt in PROMPTS[:2]:
            gen, _ = generate(device_segment, device, prompt, 8)
            assert gen.tokens == expected(tiny_glm, prompt, 8)
        # a session the edge owns (as for HTTP): the embedding and [0, k2) on ONNX Runtime
        own = Generation(node.owner, node.tail("http"), PROMPTS[2], pb.GenerationParams(max_tokens=8), node.codec,
                         Letters())  # fmt: skip
        list(own)
        assert own.tokens == expected(tiny_glm, PROMPTS[2], 8)
    finally:
        device.close()
        edges.close()


def test_concurrent_sessions_share_forward_passes(edges, mosquitto, device_segment, tiny_glm):
    node = edges.start("edge-batch")
    devices = [MqttDevice(mosquitto.url) for _ in PROMPTS]
    gens: dict[int, Generation] = {}
    device_lock = threading.Lock()  # the devices here share one segment

    def run(i: int) -> None:
        gens[i] = generate(device_segment, devices[i], PROMPTS[i], 10, device_lock)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    try:
        with node.segment_lock:  # hold the edge's layers until every session's first frame waits for them
            for t in threads:
                t.start()
            assert wait_until(lambda: node.relay.scheduler.queued() == len(PROMPTS), 20)
        for t in threads:
            t.join(60)
    finally:
        for device in devices:
            device.close()
    for i, prompt in enumerate(PROMPTS):  # batched with others or not, each session gets its own tokens
        assert gens[i].tokens == expected(tiny_glm, prompt, 10)
    stats = node.relay.scheduler.stats
    assert stats["largest"] == len(PROMPTS) and stats["items"] == 10 * len(PROMPTS) > stats["steps"]
    batches = node.metrics.registry.get_sample_value("splitglm_edge_relay_batch_size_count")
    assert batches == stats["steps"]


def test_a_retained_frame_is_never_replayed_into_a_session(edges, mosquitto, device_segment):
    """A device publishes a seq-0 frame retained; an edge that subscribes later gets it with the retain flag (the
    broker's replay of an old message) and drops it: no session, no answer, one count."""
    device = MqttDevice(mosquitto.url)
    hidden = device_segment([SegmentInput("r", 0, input_ids=torch.tensor(PROMPTS[0]))])[0]
    device_segment.close_session("r")
    frame = make_frame("retained-1", 0, 0, hidden, "fp32", params=pb.GenerationParams(max_tokens=2))
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = device.reply_topic, b"r0"
    topic = topics.frames_topic("edge-r", device.device_id)
    device.client.publish(topic, frame_to_bytes(frame), qos=1, retain=True, properties=props).wait_for_publish(5)
    try:
        node = edges.start("edge-r", mqtt_protocol="5")
        assert wait_until(lambda: node.metrics.registry.get_sample_value(
            "splitglm_edge_mqtt_refused_total", {"reason": "retained"}) == 1.0)
        assert device.nothing_more(0.5) and steps_done(node) == 0.0
    finally:
        device.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear it on the broker
        device.close()
