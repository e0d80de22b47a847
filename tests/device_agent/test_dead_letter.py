"""Bad sensor readings get a JSON error on ``results/{device_id}/errors`` and the agent keeps serving.

A real Mosquitto, a device agent in this process on the tiny plan (a character tokenizer in its device
tier), no edge: a good reading's answer is an error answer after one short attempt, which still shows the
worker and paho's network thread alive.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from device_agent.agent import DeviceAgent
from device_agent.readings import MAX_DEPTH
from device_agent.settings import DeviceSettings
from protos.topics import errors_topic, sensor_topic
from splitglm.fuzz.readings import Listener, ReadingsTarget

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
DEVICE = "box-fuzz"


@pytest.fixture(scope="module")
def plan(talking_plan) -> str:
    return talking_plan


@pytest.fixture()
def agent(plan, mosquitto):
    agent = DeviceAgent(DeviceSettings(plan=plan, device_id=DEVICE, broker=mosquitto.url, step_timeout_s=0.2,
                                       max_attempts=1, max_tokens=2, max_reading_bytes=16384, max_queued_readings=16,
                                       max_readings_per_s=0))  # fuzzing the parser: no rate limit
    agent.start()
    assert agent.ready.wait(30)
    yield agent
    agent.stop()


def test_fuzzed_readings_are_taken_or_dead_lettered(agent, mosquitto):
    target = ReadingsTarget(agent, mosquitto.url)
    try:
        @settings(FUZZ, max_examples=800)
        @given(target.strategy())
        def fuzz(example):
            target.check(example)

        fuzz()
        assert 200 <= target.refused < target.inputs  # both outcomes were exercised
        target.finish()  # every dead letter arrived; a bad and a good reading through the broker still handled
    finally:
        target.close()


@pytest.mark.parametrize("payload, words", [
    (b"[" * 5000, "deeper than"),  # RecursionError out of the callback: paho's network thread died, the agent deaf
    (b"7" * 5000, "too many digits"),  # ValueError (not a JSONDecodeError) out of the callback: the same
    (b'{"value": "\\udc80"}', "not a Unicode character"),  # taken, then the tokenizer failed on every prompt
    (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),  # the limit now
])
def test_readings_that_broke_the_agent_are_dead_lettered_and_it_keeps_serving(agent, mosquitto, payload, words):
    """Regressions: the first two escaped ``parse_reading`` as exceptions other than ReadingError and killed the
    MQTT loop; the lone surrogate was taken into the window, so the next ``window`` answers failed."""
    listener = Listener(mosquitto.url, DEVICE)
    try:
        listener.publish(sensor_topic(DEVICE, "t"), payload)
        assert listener.wait("errors", 1)
        letter = listener.got["errors"][0]
        assert letter["topic"] == sensor_topic(DEVICE, "t") and words in letter["error"]
        assert letter["payload_bytes"] == len(payload) and letter["device_id"] == DEVICE
        listener.publish(sensor_topic(DEVICE, "t"), b'{"value": 2.5, "unit": "C"}')
        assert listener.wait("results", 1, 60)  # still answering
        answer = listener.got["results"][0]
        assert answer["readings"] == [{"sensor": "t", "value": 2.5, "unit": "C"}]
    finally:
        listener.close()


def test_readings_beyond_the_queue_are_refused(plan, mosquitto, monkeypatch):
    agent = DeviceAgent(DeviceSettings(plan=plan, device_id=DEVICE, broker=mosquitto.url, max_queued_readings=2))
    published = []
    monkeypatch.setattr(agent.client, "publish", lambda topic, payload, qos=0: published.append((topic, payload)))
    try:  # not started: nothing takes readings off the queue
        assert agent.take(sensor_topic(DEVICE, "t"), b"1") and agent.take(sensor_topic(DEVICE, "t"), b"2")
        assert agent.take(sensor_topic(DEVICE, "t"), b"3") is None
        assert agent.inbox.qsize() == 2
        [(topic, payload)] = published
        assert topic == errors_topic(DEVICE) and "max_queued_readings" in json.loads(payload)["error"]
    finally:
        agent.client.loop_stop()
