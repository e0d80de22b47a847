"""The edge's MQTT handler under bad frames: ``FrameRelay._accept`` (paho's callback) and its session lanes.

The relay runs as in an edge (its real segment [k1, k2), a real tail to the
cloud) with a ``RecordingClient`` in place of paho's, so every answer is seen.
Inputs are the messages devices could send: junk bytes, mutated frames, valid
new sessions and their next frames, mutated next frames, close frames, another
device's frames for a session, reply topics of another device, topics that are
not frames topics. Properties per input: ``_accept`` never raises; a frame
gets exactly one StepResult, on its sender's own steps topic, within
``HANG_S`` (a close frame or a bad topic: none); no answer is INTERNAL or
UNKNOWN; valid frames of live sessions succeed, whatever came between them;
another device's frame is PERMISSION_DENIED. At the end: once every session
is closed the relay holds none, and a healthy session gives the same tokens
as before the run.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protos import splitglm_pb2 as pb
from protos import topics
from protos.codecs import CODECS
from protos.errors import CodecError
from protos.frames import frame_to_bytes, make_frame, parse_frame
from protos.mqtt import V5

from . import HANG_S, FuzzFailure, expect, no_hang
from .frames import HEADER_EDITS, FrameInput, frame_bytes, hidden_values, mutate_header, scramble

DEVICES = ("fz-dev-a", "fz-dev-b")
BAD_STATUSES = {2: "UNKNOWN", 13: "INTERNAL"}  # an answer with these is a bug in a tier, not a refusal
KINDS = ("junk", "junk", "new", "mutant-new", "next", "next", "next", "mutant-next", "close", "foreign-session",
         "foreign-reply", "bad-topic")


class RecordingClient:
    """Stands in for paho's client: holds each publish (topic, StepResult) by its correlation data until taken."""

    def __init__(self):
        self.answers: dict[bytes, list[tuple[str, pb.StepResult]]] = {}  # not taken yet
        self.count = 0
        self._changed = threading.Condition()

    def publish(self, topic, payload, qos=0, properties=None):
        correlation = bytes(getattr(properties, "CorrelationData", b"") or b"")
        with self._changed:
            self.answers.setdefault(correlation, []).append((topic, pb.StepResult.FromString(payload)))
            self.count += 1
            self._changed.notify_all()

    def wait(self, correlation: bytes, timeout: float) -> tuple[str, pb.StepResult] | None:
        """Take the first answer with ``correlation`` (None if none comes within ``timeout``)."""
        with self._changed:
            if not self._changed.wait_for(lambda: correlation in self.answers, timeout):
                return None
            got = self.answers[correlation]
            if len(got) == 1:
                del self.answers[correlation]
            return got.pop(0)

    def disconnect(self):
        pass

    def loop_stop(self):
        pass


@dataclass(frozen=True)
class RelayInput:
    """One message to the relay: what kind, from which device, and the draws that make its frame."""

    kind: str
    device: int  # index into DEVICES
    pick: int  # which live session (modulo their number)
    rows: int
    seed: int
    codec: str
    max_tokens: int
    junk: FrameInput | None = None  # kind "junk": the payload
    topic: str = ""  # kind "bad-topic": the topic
    header: tuple = ("start_pos", 1)  # kind "mutant-new": the edit of its first frame (frames.HEADER_EDITS)

    def __repr__(self) -> str:
        extra = f", {self.junk!r}" if self.junk else (f", topic={self.topic!r}" if self.topic else "")
        return f"RelayInput({self.kind}, device {self.device}, pick {self.pick}, seed {self.seed}{extra})"


def relay_inputs(hidden_size: int):
    """The strategy of ``RelayInput``s for a relay of ``hidden_size``."""
    return st.builds(
        RelayInput,
        kind=st.sampled_from(KINDS),
        device=st.integers(0, len(DEVICES) - 1),
        pick=st.integers(0, 1 << 16),
        rows=st.integers(1, 4),
        seed=st.integers(0, 1 << 30),
        codec=st.sampled_from(CODECS),
        max_tokens=st.integers(1, 6),
        junk=st.none() | frame_bytes(hidden_size),
        topic=st.text(max_size=40),
        header=st.sampled_from(HEADER_EDITS),
    )


@dataclass
class Live:
    """A session the fuzzer opened and keeps stepping."""

    sid: str
    device: str
    seq: int
    pos: int


@dataclass
class Expected:
    answer: bool  # one StepResult is due
    ok: bool | None = None  # True: must succeed; False: must fail; None: either
    status: int | None = None  # the status a refusal must carry
    live: Live | None = None  # the session this input steps
    then_close: Live | None = None  # a session to close after the answer


@dataclass
class RelayTarget:
    """Fuzzes one ``FrameRelay`` (built, not started: no broker) whose client is a RecordingClient."""

    relay: object  # edge_node.relay.FrameRelay
    name: str = "relay"
    live: list[Live] = field(default_factory=list)
    expected_answers: int = 0
    served: int = 0  # valid steps of live sessions answered with a token
    healthy_tokens: list[int] | None = None

    def __post_init__(self):
        self.client = RecordingClient()
        self.relay.client, self.relay.protocol = self.client, V5
        self.relay.scheduler.start()
        self.hidden_size = self.relay.hidden_size
        self._ids = itertools.count()
        self.healthy_tokens = self.healthy()

    def strategy(self):
        return relay_inputs(self.hidden_size)

    # ---- one input -------------------------------------------------------------------------------

    def check(self, example: RelayInput) -> None:
        topic, sender, payload, reply, expected = self._message(example)
        with no_hang(f"the relay on {example!r}"):
            got = self._send(topic, payload, reply or topics.steps_topic(sender), expected.answer, example)
        if expected.answer:
            expect(got is not None, f"no answer within {HANG_S:g} s to {example!r}")
            self._judge(example, sender, expected, *got)
        if expected.then_close is not None:
            self._close(expected.then_close)

    def _send(self, topic: str, payload: bytes, reply: str, answered: bool, example=None):
        """Hand one message to ``_accept`` as paho would; the answer when one is due (None: none came)."""
        correlation = f"fz:{next(self._ids)}".encode()
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = payload
        message.properties = Properties(PacketTypes.PUBLISH)
        message.properties.ResponseTopic = reply
        message.properties.CorrelationData = correlation
        try:
            self.relay._accept(message)
        except Exception as e:  # noqa: BLE001 -- escaping into paho's thread is the bug we look for
            raise FuzzFailure(f"_accept raised {type(e).__name__}: {e} on {example!r}") from e
        if not answered:
            return None
        self.expected_answers += 1
        return self.client.wait(correlation, HANG_S)

    def _message(self, x: RelayInput) -> tuple[str, str, bytes, str, Expected]:
        """Topic, sending device, payload, reply topic and what must happen, for one input."""
        device = DEVICES[x.device]
        own = topics.frames_topic(self.relay.edge_id, device)
        live = self.live[x.pick % len(self.live)] if self.live else None
        if x.kind == "junk" and x.junk is not None:
            return own, device, x.junk.data, "", Expected(not is_close_frame(x.junk.data))
        if x.kind == "bad-topic":
            return f"splitglm/v1/edge/{x.topic}", device, x.junk.data if x.junk else b"", "", Expected(False)
        if x.kind == "mutant-new":  # a first frame with one field outside its tensor broken
            frame = self._new(f"fz-{next(self._ids)}", x)
            mutate_header(frame, x.header)
            return own, device, frame_to_bytes(frame), "", Expected(not frame.close)
        if x.kind == "new" or live is None:
            sid = f"fz-{next(self._ids)}"
            frame = frame_to_bytes(self._new(sid, x))
            return own, device, frame, "", Expected(True, ok=True, live=Live(sid, device, 0, 0))
        owner = topics.frames_topic(self.relay.edge_id, live.device)
        if x.kind == "close":
            self.live.remove(live)
            return owner, live.device, self._close_bytes(live), "", Expected(False)
        frame = self._frame(live.sid, live.seq, live.pos, x.rows, x.seed, x.codec)
        other = DEVICES[(DEVICES.index(live.device) + 1) % len(DEVICES)]
        if x.kind == "foreign-session":
            return topics.frames_topic(self.relay.edge_id, other), other, frame, "", Expected(True, False, 7)
        if x.kind == "foreign-reply":
            return owner, live.device, frame, topics.steps_topic(other), Expected(True, False, 7)
        if x.kind == "mutant-next":
            self.live.remove(live)  # whatever the mutant does to it, the session ends after its answer
            return owner, live.device, scramble(frame, x.seed), "", Expected(True, then_close=live)
        return owner, live.device, frame, "", Expected(True, ok=True, live=live)

    def _new(self, sid: str, x: RelayInput) -> pb.Frame:
        """A valid first frame of a new session."""
        params = pb.GenerationParams(max_tokens=x.max_tokens, seed=x.seed, policy="accurate",
                                     speculate=pb.SPECULATE_OFF)
        return make_frame(sid, 0, 0, hidden_values(x.rows, self.hidden_size, "normal", x.seed), x.codec, params=params)

    def _frame(self, sid: str, seq: int, pos: int, rows: int, seed: int, codec: str, params=None) -> bytes:
        hidden = hidden_values(rows, self.hidden_size, "normal", seed)  # (rows, C)
        return frame_to_bytes(make_frame(sid, seq, pos, hidden, codec, params=params))

    def _judge(self, x: RelayInput, device: str, expected: Expected, topic: str, result: pb.StepResult) -> None:
        """Check one answer against what the input must get; follow the live sessions."""
        expect(topic == topics.steps_topic(device), f"answered on {topic!r}, not the sender's own steps topic "
               f"({example_text(x, result)})")
        expect(result.status not in BAD_STATUSES, f"answered {BAD_STATUSES.get(result.status)}: "
               f"{example_text(x, result)}")
        expect(bool(result.error) == (result.status != 0), f"error and status disagree: {example_text(x, result)}")
        if expected.ok is False:
            expect(result.status == expected.status, f"expected status {expected.status}: {example_text(x, result)}")
        live = expected.live
        if result.error:
            refused_new = live is not None and live.seq == 0 and result.status == 8  # a limit: allowed
            expect(expected.ok is not True or refused_new, f"a valid frame failed: {example_text(x, result)}")
            return
        expect(expected.ok is not False, f"a frame that must be refused was served: {example_text(x, result)}")
        if live is None:  # a mutant or junk that made a valid frame (a new session): close it again
            if result.session_id:
                self._close(Live(result.session_id, device, 0, 0))
            return
        expect(len(result.tokens) >= 1, f"a valid step got no token: {example_text(x, result)}")
        self.served += 1
        if live.seq == 0:
            self.live.append(live)
        live.seq, live.pos = live.seq + 1, live.pos + x.rows
        if result.finished:
            self.live.remove(live)
            self._close(live)

    def _close_bytes(self, live: Live) -> bytes:
        return frame_to_bytes(make_frame(live.sid, live.seq, 0, None, close=True))

    def _close(self, live: Live) -> None:
        message = mqtt.MQTTMessage(topic=topics.frames_topic(self.relay.edge_id, live.device).encode())
        message.payload = self._close_bytes(live)
        self.relay._accept(message)

    # ---- the whole run ---------------------------------------------------------------------------

    def healthy(self) -> list[int]:
        """Tokens of a fixed greedy session of 6 steps through the relay (then closed)."""
        live = Live(f"fz-healthy-{next(self._ids)}", DEVICES[0], 0, 0)
        params = pb.GenerationParams(max_tokens=6, policy="accurate", speculate=pb.SPECULATE_OFF)
        topic = topics.frames_topic(self.relay.edge_id, live.device)
        tokens = []
        for step in range(6):
            rows = 3 if step == 0 else 1
            frame = self._frame(live.sid, step, live.pos, rows, 100 + step, "fp32", params if step == 0 else None)
            got = self._send(topic, frame, topics.steps_topic(live.device), True)
            expect(got is not None and not got[1].error, f"the healthy session failed at step {step}: {got}")
            tokens += list(got[1].tokens)
            live.pos += rows
        self._close(live)
        return tokens

    def finish(self) -> None:
        """Every answer counted once; every session closed leaves none behind; a healthy session still works."""
        for live in list(self.live):
            self._close(live)
        self.live.clear()
        done = threading.Event()
        for _ in range(int(HANG_S / 0.05)):
            if not self.relay.sessions:
                done.set()
                break
            done.wait(0.05)
        expect(not self.relay.sessions, f"the relay still holds {len(self.relay.sessions)} sessions after every "
               f"session was closed: {sorted(self.relay.sessions)[:5]}")
        with self.client._changed:
            extra, left = self.client.count - self.expected_answers, dict(self.client.answers)
        expect(extra == 0 and not left, f"{extra} answers more than frames that are answered: {list(left)[:5]}")
        again = self.healthy()
        expect(again == self.healthy_tokens, f"the healthy session's tokens changed: {self.healthy_tokens} -> {again}")

    def close(self) -> None:
        self.relay.stop()


def is_close_frame(data: bytes) -> bool:
    """Whether ``data`` parses as a close frame (which gets no answer)."""
    try:
        return parse_frame(data).close
    except CodecError:
        return False


def example_text(x: RelayInput, result: pb.StepResult) -> str:
    return f"{x!r} -> status {result.status} {result.error[:160]!r}"
