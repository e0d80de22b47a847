"""The edge's MQTT handler fuzzed: ``FrameRelay`` with the real tiny edge segment and a real cloud process.

``splitglm.fuzz.relay.RelayTarget`` hands each message to ``_accept`` as paho would and records what the
relay publishes; one test sends junk through a real Mosquitto too, beside a device generating correctly.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from edge_node.node import EdgeNode
from edge_node.relay import FrameRelay
from edge_node.settings import EdgeSettings
from protos import splitglm_pb2 as pb
from protos import topics
from protos.errors import CodecError
from protos.frames import frame_to_bytes, make_frame, parse_frame
from splitglm.fuzz.frames import frame_bytes
from splitglm.fuzz.relay import DEVICES, RelayTarget, is_close_frame
from tests.edge_node.test_relay import PROMPTS, Edges, MqttDevice, expected, generate


def frame_key(data: bytes) -> tuple[str, int] | None:
    """The (session, seq) of a frame that parses, else None."""
    try:
        frame = parse_frame(data)
    except CodecError:
        return None
    return frame.session_id, frame.seq


FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


# first: Mosquitto is forked before this module's in-process edge node has gRPC threads (a fork then can abort)
def test_junk_over_mosquitto_is_answered_beside_a_correct_generation(tiny_plan, cloud, mosquitto, device_segment,
                                                                     tiny_glm):
    edges = Edges(tiny_plan, mosquitto.url, cloud)
    edges.start("edge-junk", mqtt_protocol="5")
    good, bad = MqttDevice(mosquitto.url), MqttDevice(mosquitto.url)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(tokens=generate(device_segment, good, PROMPTS[0], 16)[0]
                                                             .tokens))
    runner.start()
    sent = []

    @settings(FUZZ, max_examples=40)
    @given(frame_bytes(64))
    def send(example):
        sent.append(example)
        bad.send("edge-junk", example.data, correlation=f"junk-{len(sent)}".encode())

    try:
        send()
        answers = {}
        with contextlib.suppress(queue.Empty):  # until none comes for 3 s
            while True:
                result, correlation, _ = bad.receive(3.0)
                assert correlation.decode() not in answers, "a frame answered twice"
                answers[correlation.decode()] = result
        # a frame repeating the (session, seq) of an earlier one may be dropped, as a duplicate delivery of one
        # still in flight; every other frame (undecodable ones too) but a close gets exactly one answer
        seen, due = set(), []
        for i, example in enumerate(sent, 1):
            key = frame_key(example.data)
            if key is not None and key in seen or is_close_frame(example.data):
                continue
            seen.add(key)
            due.append(f"junk-{i}")
        assert set(due) <= set(answers), f"unanswered: {sorted(set(due) - set(answers))}"
        assert set(answers) <= {f"junk-{i}" for i in range(1, len(sent) + 1)}
        assert all(r.status not in (2, 13) for r in answers.values())  # never UNKNOWN or INTERNAL
    finally:
        runner.join(60)
        good.close()
        bad.close()
        edges.close()
    assert outcome["tokens"] == expected(tiny_glm, PROMPTS[0], 16)


@pytest.fixture(scope="module")
def node(tiny_plan, cloud):
    """An edge node in this process (no broker, no HTTP), stepping the real cloud process."""
    node = EdgeNode(EdgeSettings(plan=tiny_plan, broker="", cloud=cloud, edge_id="edge-fuzz", http_host="127.0.0.1",
                                 http_port=0, speculate=False, connect_timeout_s=60))
    node.cloud.wait_ready(60)
    yield node
    node.close()


@pytest.fixture()
def target(node):
    """A relay of the node's segment and tails, with a recording client in place of paho's."""
    relay = FrameRelay(node.settings, node.device_segment, node.segment_lock, node.codec, lambda: node.tail("mqtt"),
                       node.metrics)
    target = RelayTarget(relay)
    yield target
    target.close()


def test_bad_frames_get_errors_on_the_senders_topic_and_live_sessions_go_on(target):
    @settings(FUZZ, max_examples=400)
    @given(target.strategy())
    def fuzz(example):
        target.check(example)

    fuzz()
    assert target.served >= 80  # valid steps of live sessions, between the bad frames, were served
    target.finish()  # nothing leaked, every answer counted once, the healthy session's tokens unchanged


def test_a_refused_first_frame_leaves_no_session_behind(target):
    """Regression: a first frame the edge's layers refused (it starts at position 5) kept its session open until
    the TTL, so a device could fill relay_max_sessions with junk sessions."""
    hidden = torch.randn(2, target.hidden_size)
    frame = make_frame("late-start", 0, 5, hidden, "fp32", params=pb.GenerationParams(max_tokens=2))
    topic = topics.frames_topic(target.relay.edge_id, DEVICES[0])
    _, result = target._send(topic, frame_to_bytes(frame), topics.steps_topic(DEVICES[0]), True)
    assert result.status == 9 and "position" in result.error  # FAILED_PRECONDITION
    assert "late-start" not in target.relay.sessions
