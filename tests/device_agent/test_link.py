"""EdgeLink over a real Mosquitto broker, against a small real responder that answers frames like an edge.

The responder runs the tiny model's edge and cloud segments with
``TailSessions`` (idempotent answers), so a generation through the link must
give exactly the tokens of the chained segments in one process, whatever is
lost or repeated on the way.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from device_agent.link import EdgeLink, LinkError
from protos import splitglm_pb2 as pb
from protos.frames import frame_from_bytes, make_frame
from protos.mqtt import PROTOCOLS, V5, connect, new_client, publish_properties
from protos.topics import EDGE_ID_PROPERTY, correlation, frames_subscription, frames_topic
from runtime.local import Chain, split_segments
from runtime.owner import Generation
from runtime.segment import SegmentInput
from runtime.terminal import TailSessions

SPLITS = (2, 4)
PROMPT = [3, 17, 5, 9, 11, 40, 2]
MAX_TOKENS = 12


class Letters:
    """The tiny model has no tokenizer: decode ids as letters."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


class Responder:
    """A minimal edge: takes frames on the pool topic and its own, answers to ``reply_to`` / ResponseTopic.

    ``drop(frame, delivery)`` says whether to ignore a delivery (1 = the first of that seq);
    ``repeat`` is a set of seqs whose answer is published twice.
    """

    def __init__(self, url, protocol, model, edge_id="edge-a", drop=lambda frame, delivery: False, repeat=()):
        _, self.edge, self.cloud = split_segments(model, *SPLITS)
        self.tails, self.edge_id, self.v5 = TailSessions(), edge_id, protocol == V5
        self.drop, self.repeat = drop, set(repeat)
        self.deliveries: Counter = Counter()  # (session, seq) -> frames received
        self.received: list[tuple[str, int, str]] = []  # (topic, seq, session)
        self.closed: list[str] = []
        self.subscribed = threading.Event()
        self.client = new_client(f"responder-{uuid.uuid4().hex[:8]}", protocol)
        subscriptions = [(frames_subscription("pool"), 1), (frames_subscription(edge_id), 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(subscriptions)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self.on_message
        connect(self.client, url, protocol)
        assert self.subscribed.wait(20), "the responder could not subscribe"

    def on_message(self, client, userdata, message):
        received = frame_from_bytes(message.payload, self.edge.spec.hidden_size)
        frame = received.frame
        if frame.close:
            self.closed.append(frame.session_id)
            for part in (self.edge, self.cloud):
                part.close_session(frame.session_id)
            self.tails.close(frame.session_id)
            return
        key = (frame.session_id, frame.seq)
        self.deliveries[key] += 1
        self.received.append((message.topic, frame.seq, frame.session_id))
        if self.drop(frame, self.deliveries[key]):
            return
        result = self.tails.accept(frame)
        if result is None:
            item = SegmentInput(frame.session_id, frame.start_pos, hidden=received.hidden)
            mid = self.edge([item])[0]  # (T, C)
            result = self.tails.answer(frame, self.cloud([self.tails.work(frame, mid)])[0])
        answer = pb.StepResult()
        answer.CopyFrom(result)
        answer.edge_id = self.edge_id
        props = getattr(message, "properties", None)
        reply = getattr(props, "ResponseTopic", "") or frame.reply_to
        if self.v5:
            assert props.CorrelationData == correlation(frame.session_id, frame.seq)
            props = publish_properties("", correlation(*key), {EDGE_ID_PROPERTY: self.edge_id})
        else:
            props = None
        for _ in range(2 if frame.seq in self.repeat else 1):
            client.publish(reply, answer.SerializeToString(), qos=1, properties=props)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """The device side: an MQTT client carrying an EdgeLink, and the tiny model's device segment."""

    def __init__(self, url, protocol, model, **link_options):
        self.segment = split_segments(model, *SPLITS)[0]
        self.client = new_client(f"device-{uuid.uuid4().hex[:8]}", protocol)
        self.link = EdgeLink(self.client, protocol, "dev-1", **link_options)
        self.client.on_connect = self.link.on_connect
        self.client.on_disconnect = self.link.on_disconnect
        connect(self.client, url, protocol)

    def generate(self) -> Generation:
        params = pb.GenerationParams(max_tokens=MAX_TOKENS)
        generation = Generation(self.segment, self.link, PROMPT, params, "fp32", Letters())
        for _ in generation:
            pass
        return generation

    def stop(self):
        self.link.shutdown()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def expected(tiny_glm) -> list[int]:
    return [t for t, _ in Chain(split_segments(tiny_glm, *SPLITS)).generate(PROMPT, MAX_TOKENS)]


@pytest.fixture(params=["5", "3.1.1"])
def protocol(request) -> int:
    return PROTOCOLS[request.param]


def test_lost_and_repeated_answers(mosquitto, tiny_glm, protocol, expected):
    """Seq 2's first delivery is lost (-> republished, same seq); seq 3 is answered twice (-> one answer used)."""
    responder = Responder(mosquitto.url, protocol, tiny_glm, drop=lambda f, n: f.seq == 2 and n == 1, repeat={3})
    device = Device(mosquitto.url, protocol, tiny_glm, step_timeout_s=1.0, max_attempts=5, backoff_s=0.1)
    try:
        generation = device.generate()
        assert generation.tokens == expected
        assert responder.deliveries[(generation.session_id, 2)] == 2
        assert all(n == 1 for (_, seq), n in responder.deliveries.items() if seq != 2)
        assert device.link.stats["republished"] == 1 and device.link.stats["published"] == MAX_TOKENS
        assert device.link.stats["answers"] == MAX_TOKENS and device.link.stats["ignored"] >= 1
        # session affinity: seq 0 went to the pool, every later frame to the edge that answered it
        topics = [topic for topic, seq, _ in responder.received]
        assert topics[0] == frames_topic("pool", "dev-1") and set(topics[1:]) == {frames_topic("edge-a", "dev-1")}
        assert _wait(lambda: responder.closed == [generation.session_id])
    finally:
        device.stop()
        responder.stop()


def test_broker_restart_during_a_step(mosquitto, tiny_glm, expected):
    """The broker goes down while seq 4 waits for its answer: the same frame is republished after reconnecting."""
    reached = threading.Event()

    def drop(frame, delivery):
        if frame.seq == 4 and delivery == 1:
            reached.set()
            return True
        return False

    responder = Responder(mosquitto.url, V5, tiny_glm, drop=drop)
    device = Device(mosquitto.url, V5, tiny_glm, step_timeout_s=5.0, max_attempts=10, backoff_s=0.2)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(generation=device.generate()))
    try:
        worker.start()
        assert reached.wait(30)
        mosquitto.restart()
        worker.join(60)
        assert not worker.is_alive()
        generation = outcome["generation"]
        assert generation.tokens == expected
        assert device.link.stats["republished"] >= 1
        sessions = {session for _, _, session in responder.received}
        assert sessions == {generation.session_id}
        assert responder.deliveries[(generation.session_id, 4)] >= 2
    finally:
        device.stop()
        responder.stop()
        worker.join(10)


def test_gives_up_after_max_attempts(mosquitto, tiny_glm):
    """Nobody answers: the same frame is published max_attempts times, then a clear error."""
    device = Device(mosquitto.url, V5, tiny_glm, step_timeout_s=0.3, max_attempts=3, backoff_s=0.05)
    try:
        frame = make_frame("lonely", 0, 0, None, params=pb.GenerationParams(max_tokens=1))
        with pytest.raises(LinkError, match="step 0 of session lonely: no answer after 3 attempts"):
            device.link.step(frame)
        assert device.link.stats["published"] == 1 and device.link.stats["republished"] == 2
    finally:
        device.stop()


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    """True once ``predicate()`` holds (checked every 50 ms), False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
