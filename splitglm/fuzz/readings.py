"""The device agent's sensor handler under bad readings, and its dead-letter topic ``results/{device_id}/errors``.

Inputs are sensor messages: well-formed readings (which must be taken),
payloads no reading can be (not UTF-8, not JSON, wrong types, NaN and
infinities, numbers out of range, integers of thousands of digits, nesting
thousands deep, escaped lone surrogates, payloads over the size limit, empty
sensor names; all must be refused) and random JSON and bytes (either), on
sensor names of odd Unicode. Each is handed to ``DeviceAgent.take``, what
paho's callback calls. Properties: it never raises; a taken reading renders
into a prompt and an answer; every refusal publishes exactly one dead letter
(checked on the broker: the JSON names the topic and the error); the agent's
queue stays within ``max_queued_readings``; and at the end a bad and a good
reading sent through the broker get their dead letter and their answer.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

from hypothesis import strategies as st

from protos.mqtt import connect, new_client, resolve_protocol
from protos.topics import errors_topic, results_topic, sensor_topic

from . import HANG_S, FuzzFailure, expect, no_hang

SYNC_EVERY = 200  # inputs between checks that the dead letters arrived
SENSOR_TEXT = st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",))
FINITE = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**30), 10**30)
CLEAN_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(2**200), 2**200) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@dataclass(frozen=True)
class ReadingInput:
    sensor: str
    payload: bytes
    expect: str  # "good" (must be taken), "bad" (must be refused) or "any"

    def __repr__(self) -> str:
        return f"ReadingInput({self.expect}, sensor={self.sensor!r}, {len(self.payload)} bytes: {self.payload[:60]!r})"


def _dumps(value) -> bytes:
    return json.dumps(value).encode()


def good_payloads():
    reading = st.fixed_dictionaries({"value": FINITE | CLEAN_TEXT}, optional={"unit": CLEAN_TEXT, "ts": FINITE})
    return reading.map(_dumps) | FINITE.map(lambda v: str(v).encode())


def bad_payloads(max_bytes: int):
    nested = st.tuples(st.integers(9, 5000), st.sampled_from(("[", '{"a":'))).map(
        lambda d: (d[1] * d[0]).encode() + b"1" + (b"]" if d[1] == "[" else b"}") * d[0])
    return st.one_of(
        st.binary(max_size=64).map(lambda b: b"\xff" + b),  # not UTF-8
        st.text(max_size=32).filter(lambda t: "}" not in t).map(lambda t: ("{" + t).encode()),  # not JSON
        st.sampled_from((b"", b"[1, 2]", b'"hot"', b"true", b"null", b"{}", b"NaN", b'{"value": NaN}',
                         b'{"value": -Infinity}', b'{"value": 1e999}', b"-1e400")),
        st.lists(JSON_ANY, max_size=3).map(_dumps),  # a list is no reading
        nested,  # deeper than MAX_DEPTH, up to deeper than Python's recursion limit
        st.integers(0xD800, 0xDFFF).map(lambda c: f'{{"value": "\\u{c:04x}"}}'.encode()),  # a lone surrogate
        st.integers(4301, 6000).map(lambda n: b"9" * n),  # more digits than Python converts
        st.integers(max_bytes + 1, max_bytes + 4096).map(lambda n: b" " * n + b"1"),  # too large
    )


@st.composite
def reading_inputs(draw, max_bytes: int) -> ReadingInput:
    sensor = draw(st.text(SENSOR_TEXT, min_size=1, max_size=16) | st.sampled_from(("temperature", "imu/accel")))
    kind = draw(st.sampled_from(("good", "bad", "bad", "any", "any")))
    if kind == "good":
        return ReadingInput(sensor, draw(good_payloads()), "good")
    if kind == "bad":
        return ReadingInput(sensor, draw(bad_payloads(max_bytes)), "bad")
    payload = draw(JSON_ANY.map(_dumps) | st.dictionaries(st.text(max_size=6), JSON_ANY, max_size=4).map(_dumps)
                   | st.binary(max_size=64))
    return ReadingInput(sensor, payload, "any")


class Listener:
    """A paho client on the device's results and dead-letter topics: counts, and the latest messages of each."""

    def __init__(self, broker: str, device_id: str, keep: int = SYNC_EVERY):
        self.topics = {"results": results_topic(device_id), "errors": errors_topic(device_id)}
        self.got: dict[str, deque[dict]] = {"results": deque(maxlen=keep), "errors": deque(maxlen=keep)}
        self.counts = {"results": 0, "errors": 0}
        self._changed = threading.Condition()
        subscribed = threading.Event()
        protocol = resolve_protocol(broker, "auto")
        self.client = new_client(f"fuzz-listener-{uuid.uuid4().hex[:8]}", protocol)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in self.topics.values()])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        connect(self.client, broker, protocol)
        expect(subscribed.wait(30), f"the fuzz listener could not subscribe on {broker}")

    def _on_message(self, client, userdata, message):
        kind = "errors" if message.topic == self.topics["errors"] else "results"
        with self._changed:
            self.got[kind].append(json.loads(message.payload))
            self.counts[kind] += 1
            self._changed.notify_all()

    def wait(self, kind: str, count: int, timeout: float = HANG_S) -> bool:
        """Until ``count`` messages of ``kind`` have come."""
        with self._changed:
            return self._changed.wait_for(lambda: self.counts[kind] >= count, timeout)

    def wait_for(self, kind: str, found, timeout: float) -> bool:
        """Until a message of ``kind`` satisfies ``found(message)``."""
        with self._changed:
            return self._changed.wait_for(lambda: any(found(m) for m in self.got[kind]), timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class ReadingsTarget:
    """Fuzzes a started ``DeviceAgent``'s ``take`` (what its paho callback calls), checking the broker's side."""

    name = "readings"

    def __init__(self, agent, broker: str):
        self.agent, self.broker = agent, broker
        self.max_bytes = agent.settings.max_reading_bytes
        self.most = agent.settings.max_queued_readings
        self.listener = Listener(broker, agent.device_id)
        self.refused = self.inputs = 0

    def strategy(self):
        return reading_inputs(self.max_bytes)

    def check(self, example: ReadingInput) -> None:
        topic = f"sensors/{self.agent.device_id}/{example.sensor}"
        waiting = self.agent.inbox.qsize()
        with no_hang(f"the agent on {example!r}", 5.0):
            try:
                reading = self.agent.take(topic, example.payload)
            except Exception as e:  # noqa: BLE001 -- escaping into paho's thread is the bug we look for
                raise FuzzFailure(f"take raised {type(e).__name__}: {e} on {example!r}") from e
        self.inputs += 1
        if reading is None:
            self.refused += 1
            expect(example.expect != "good" or waiting >= self.most, f"a good reading was refused: {example!r}")
        else:
            expect(example.expect != "bad", f"a bad reading was taken: {example!r} -> {reading!r}")
            try:
                json.dumps(reading.as_json()), reading.line()  # what its answer and the prompt will hold
            except Exception as e:  # noqa: BLE001
                raise FuzzFailure(f"a taken reading cannot be rendered: {type(e).__name__} {e} ({example!r})") from e
        expect(self.agent.inbox.qsize() <= self.most, f"{self.agent.inbox.qsize()} readings queued, "
               f"beyond max_queued_readings {self.most}")
        if self.inputs % SYNC_EVERY == 0:
            self.sync()

    def sync(self) -> None:
        """Every refusal so far has its one dead letter on the broker, each a clear error."""
        self.listener.wait("errors", self.refused)
        count = self.listener.counts["errors"]
        expect(count == self.refused, f"{count} dead letters for {self.refused} refusals")
        for letter in list(self.listener.got["errors"]):
            expect(letter.get("device_id") == self.agent.device_id and letter.get("error")
                   and str(letter.get("topic", "")).startswith("sensors/"), f"an unclear dead letter: {letter}")

    def finish(self) -> None:
        """The dead letters all came; through the broker a bad reading is refused and a good one answered."""
        self.sync()
        deadline = time.monotonic() + HANG_S * 3
        while self.agent.inbox.qsize() and time.monotonic() < deadline:  # the backlog answered first
            time.sleep(0.05)
        expect(not self.agent.inbox.qsize(), f"{self.agent.inbox.qsize()} readings still wait for an answer")
        probe = sensor_topic(self.agent.device_id, "probe")
        self.listener.publish(probe, b"[" * 5000)
        self.listener.publish(probe, b'{"value": 1, "unit": "fuzz"}')
        self.refused += 1
        expect(self.listener.wait("errors", self.refused), "no dead letter for a bad reading sent through the broker")
        answered = self.listener.wait_for("results", lambda answer: {"sensor": "probe", "value": 1, "unit": "fuzz"}
                                          in answer.get("readings", []), 120)
        letters = [m["error"] for m in self.listener.got["errors"]][-3:]
        expect(answered, f"no answer to a good reading sent through the broker after the fuzzing (dead letters "
               f"since: {letters}): the agent stopped serving")

    def close(self) -> None:
        self.listener.close()
