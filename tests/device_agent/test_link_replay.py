"""EdgeLink replays a session to a new edge when its edge restarts (NOT_FOUND) or goes silent.

Over a real Mosquitto broker, against small in-process edges that run the tiny model's [k1, L) in a
``LocalTail``: the generation through the link must give exactly the tokens of the chained segments,
greedy and seeded, whatever edge answers which step.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from device_agent.link import EdgeLink
from protos import splitglm_pb2 as pb
from protos.frames import frame_from_bytes
from protos.mqtt import V5, connect, new_client
from protos.topics import frames_subscription, frames_topic
from runtime.local import Chain, LocalTail, split_segments
from runtime.owner import Generation
from runtime.sampling import SamplingParams

SPLITS = (2, 4)
PROMPT = [3, 17, 5, 9, 11, 40, 2]
MAX_TOKENS = 12
SAMPLINGS = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.9, seed=7)}


class Edge:
    """A minimal edge: the tiny model's [k1, L) in a LocalTail, answering frames on the pool and its own topic.

    ``on_frame(edge, frame)`` runs before each frame is served: it may ``restart()`` the edge (every
    session forgotten, as a new process would) or set ``silent`` (frames are dropped from then on).
    """

    def __init__(self, url, model, edge_id, on_frame=lambda edge, frame: None):
        self.model, self.edge_id, self.on_frame = model, edge_id, on_frame
        self.tail = self._new_tail()
        self.silent = False
        self.received: list[pb.Frame] = []  # frames (without their tensors) in arrival order
        self.topics: list[str] = []
        self.subscribed = threading.Event()
        self.client = new_client(f"edge-{uuid.uuid4().hex[:8]}", V5)
        subscriptions = [(frames_subscription("pool"), 1), (frames_subscription(edge_id), 1)]
        self.client.on_connect = lambda c, *a: c.subscribe(subscriptions)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self.on_message
        connect(self.client, url, V5)
        assert self.subscribed.wait(20), "the edge could not subscribe"

    def _new_tail(self) -> LocalTail:
        return LocalTail(split_segments(self.model, *SPLITS)[1:])

    def restart(self) -> None:
        self.tail = self._new_tail()

    def on_message(self, client, userdata, message):
        frame = frame_from_bytes(message.payload, 64).frame
        self.on_frame(self, frame)
        if self.silent:
            return
        if frame.close:
            self.tail.close(frame)
            return
        head = pb.Frame()
        head.CopyFrom(frame)
        head.ClearField("hidden")
        head.hidden.shape[:] = frame.hidden.shape
        self.received.append(head)
        self.topics.append(message.topic)
        result = self.tail.step(frame)
        result.edge_id = self.edge_id
        client.publish(frame.reply_to, result.SerializeToString(), qos=1)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    def __init__(self, url, model, **link_options):
        self.segment = split_segments(model, *SPLITS)[0]
        self.client = new_client(f"device-{uuid.uuid4().hex[:8]}", V5)
        self.link = EdgeLink(self.client, V5, "dev-1", **link_options)
        self.client.on_connect = self.link.on_connect
        self.client.on_disconnect = self.link.on_disconnect
        connect(self.client, url, V5)

    def generate(self, sampling: SamplingParams) -> Generation:
        params = pb.GenerationParams(max_tokens=MAX_TOKENS, temperature=sampling.temperature, seed=sampling.seed or 0)
        generation = Generation(self.segment, self.link, PROMPT, params, "fp32", None)
        for _ in generation:
            pass
        return generation

    def stop(self):
        self.link.shutdown()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(params=sorted(SAMPLINGS))
def sampling(request) -> SamplingParams:
    return SAMPLINGS[request.param]


def expected(model, sampling: SamplingParams) -> list[int]:
    return [t for t, _ in Chain(split_segments(model, *SPLITS)).generate(PROMPT, MAX_TOKENS, sampling)]


def test_restarted_edge_gets_the_history_replayed(mosquitto, tiny_glm, sampling):
    """The edge restarts as seq 4 arrives: NOT_FOUND, one replay of 7 + 4 rows, then seqs 1, 2, ... anew."""
    def restart_at_4(edge, frame):
        if frame.seq == 4 and not frame.session_id.endswith("-r1"):
            edge.restart()

    edge = Edge(mosquitto.url, tiny_glm, "edge-a", restart_at_4)
    device = Device(mosquitto.url, tiny_glm, step_timeout_s=5.0, max_attempts=5, backoff_s=0.1)
    try:
        generation = device.generate(sampling)
        assert generation.tokens == expected(tiny_glm, sampling)
        assert device.link.stats["replays"] == 1
        sid = generation.session_id
        [replay] = [f for f in edge.received if f.session_id == f"{sid}-r1" and f.seq == 0]
        assert replay.start_pos == 0 and replay.hidden.shape[0] == len(PROMPT) + 4
        assert replay.params.max_tokens == MAX_TOKENS - 4 and replay.params.seed == (sampling.seed or 0)
        later = [f.seq for f in edge.received if f.session_id == f"{sid}-r1"]
        assert later == list(range(MAX_TOKENS - 4))  # the replay answers seq 4; seq 5 is the new seq 1, ...
        assert [f.seq for f in edge.received if f.session_id == sid] == [0, 1, 2, 3, 4]
    finally:
        device.stop()
        edge.stop()


def test_silent_edge_is_replaced_through_the_pool(mosquitto, tiny_glm):
    """Edge a goes silent at seq 3; after replay_after unanswered attempts edge b, new, takes the session."""
    others: list[Edge] = []

    def fall_silent(edge, frame):
        if frame.seq == 3 and not edge.silent:
            edge.silent = True
            others.append(Edge(mosquitto.url, tiny_glm, "edge-b"))

    edge_a = Edge(mosquitto.url, tiny_glm, "edge-a", fall_silent)
    device = Device(mosquitto.url, tiny_glm, step_timeout_s=1.0, max_attempts=10, backoff_s=0.1, replay_after=2)
    try:
        generation = device.generate(SAMPLINGS["greedy"])
        assert generation.tokens == expected(tiny_glm, SAMPLINGS["greedy"])
        assert device.link.stats["replays"] == 1
        [edge_b] = others
        sid = f"{generation.session_id}-r1"
        assert [f.seq for f in edge_b.received if f.session_id == sid] == list(range(MAX_TOKENS - 3))
        assert edge_b.topics[0] == frames_topic("pool", "dev-1")
        assert set(edge_b.topics[1:]) == {frames_topic("edge-b", "dev-1")}
    finally:
        device.stop()
        edge_a.stop()
        for edge in others:
            edge.stop()
