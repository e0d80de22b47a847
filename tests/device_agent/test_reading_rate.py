"""A flood of readings is dropped over ``max_readings_per_s``: counted, told on the dead-letter topic at most once a
second, and the readings within the rate are still taken."""

from __future__ import annotations

import json
import time

import pytest

from device_agent.agent import DeviceAgent
from device_agent.readings import ReadingRate
from device_agent.settings import DeviceSettings
from protos.topics import errors_topic, sensor_topic

DEVICE = "box-flood"


def test_rate_drops_over_the_limit_and_notices_once_a_second():
    now = [0.0]
    rate = ReadingRate(3, clock=lambda: now[0])
    assert [rate.admit() for _ in range(3)] == [True] * 3
    assert not rate.admit() and rate.dropped == 1
    notice = rate.notice()
    assert "max_readings_per_s, 3 readings per second: 1 reading(s) dropped" in notice
    assert not rate.admit() and rate.notice() is None  # the next notice waits a second
    now[0] = 0.4  # 1.2 readings back
    assert rate.admit() and not rate.admit() and rate.notice() is None
    now[0] = 1.0
    assert "2 reading(s) dropped since the last notice, 3 in all" in rate.notice()
    unlimited = ReadingRate(0)
    assert all(unlimited.admit() for _ in range(1000)) and unlimited.dropped == 0


@pytest.fixture(scope="module")
def plan(talking_plan) -> str:
    return talking_plan


def test_a_flood_is_dropped_with_one_dead_letter_and_the_agent_keeps_taking(plan, mosquitto, monkeypatch):
    agent = DeviceAgent(DeviceSettings(plan=plan, device_id=DEVICE, broker=mosquitto.url, max_readings_per_s=5))
    published = []
    monkeypatch.setattr(agent.client, "publish", lambda topic, payload, qos=0: published.append((topic, payload)))
    try:  # not started: what paho's callback hands over is what take sees
        taken = [agent.take(sensor_topic(DEVICE, "t"), str(i).encode()) for i in range(40)]
        assert sum(r is not None for r in taken) in (5, 6)  # the burst (and at most one refilled meanwhile)
        assert agent.inbox.qsize() == sum(r is not None for r in taken)
        assert agent.rate.dropped == 40 - agent.inbox.qsize()
        [(topic, payload)] = published  # one dead letter for the whole flood
        letter = json.loads(payload)
        assert topic == errors_topic(DEVICE) and "max_readings_per_s, 5 readings per second" in letter["error"]
        assert letter["topic"] == sensor_topic(DEVICE, "t")
        time.sleep(0.4)  # two readings' worth back
        assert agent.take(sensor_topic(DEVICE, "t"), b"41") is not None and len(published) == 1
    finally:
        agent.client.loop_stop()
