"""The device agent as a process with no edge behind the broker: every valid reading still gets one answer.

Uses the demo plan (the agent needs a tokenizer; only the device tier loads).
"""

from __future__ import annotations

import json
import re
import time

import paho.mqtt.client as mqtt
import pytest

from protos.mqtt import broker_address
from protos.topics import sensor_topic
from splitglm.system import ResultListener
from tests.procs import Proc

pytestmark = pytest.mark.slow
DEVICE = "box-alone"


class Sensors:
    """A plain paho publisher of raw payloads (QoS 1, waits for the broker's acknowledgement)."""

    def __init__(self, url: str):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(*broker_address(url))
        self.client.loop_start()

    def send(self, sensor: str, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(sensor_topic(DEVICE, sensor), data, qos=1).wait_for_publish(20)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_new(proc: Proc, pattern: str, since: int, timeout_s: float = 60.0) -> re.Match:
    """The first output line after line ``since`` that matches."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in proc.lines[since:]:
            if m := re.search(pattern, line):
                return m
        time.sleep(0.05)
    raise TimeoutError(f"no {pattern!r} after line {since}:\n{proc.output}")


def test_every_reading_is_answered_once_even_without_an_edge(mosquitto, tmp_path):
    from partitioner.plan.demo import demo_plan

    ready_file = tmp_path / "device.ready"
    device = Proc.python("device", "device_agent", "--plan", str(demo_plan()), "--broker", mosquitto.url,
                         "--device-id", DEVICE, "--step-timeout-s", "0.5", "--max-attempts", "4",
                         "--max-reading-bytes", "200", "--window", "4", "--threads", "1",
                         env={"SPLITGLM_DEVICE_READY_FILE": str(ready_file),
                              "SPLITGLM_DEVICE_RESULTS_INCLUDE_PROMPT": "true"})  # checked below
    listener = sensors = None
    try:
        assert device.ready(300) == f"device/{DEVICE}" and ready_file.exists()
        listener, sensors = ResultListener(mosquitto.url, DEVICE), Sensors(mosquitto.url)
        sensors.send("temperature", {"value": 1.5, "unit": "C"})
        wait_new(device, r"generating for 1 reading", 0)
        # while the first generation retries, invalid payloads (dead-lettered) and two valid readings (queued) arrive
        sensors.send("temperature", b"{not json")
        sensors.send("temperature", {"value": 1, "pad": "x" * 300})
        sensors.send("temperature", b"[1, 2]")
        sensors.send("humidity", b"47.25")
        sensors.send("vibration", {"value": 3.5, "unit": "mm/s"})
        first, second = listener.wait_for_readings(3, 120)[:2]
        assert [r["value"] for r in first["readings"]] == [1.5]
        assert first["error"] and "no answer after 4 attempts" in first["error"]
        assert first["tokens"] == 0 and first["finish_reason"] == "error"
        assert [(r["sensor"], r["value"]) for r in second["readings"]] == [("humidity", 47.25), ("vibration", 3.5)]
        assert second["error"] and second["request_id"] != first["request_id"]
        # the failed reading stays in the window: the next prompt still shows it
        assert "temperature: 1.5 C\nhumidity: 47.25\nvibration: 3.5 mm/s" in second["prompt"]
        assert len(listener.answers) == 2
        assert device.output.count("refusing a sensor message") == 3  # on results/<device>/errors

        # stopping while a generation retries: it is abandoned, its reading answered with an error, exit 0
        since = len(device.lines)
        sensors.send("temperature", {"value": 2.5, "unit": "C"})
        wait_new(device, r"generating for 1 reading", since)
        started = time.monotonic()
        assert device.stop() == 0
        assert time.monotonic() - started < 10
        last = listener.wait_for_readings(4, 30)[-1]
        assert [r["value"] for r in last["readings"]] == [2.5] and "stopped" in last["error"]
        assert not ready_file.exists()
    finally:
        for part in (sensors, listener):
            if part is not None:
                part.close()
        device.stop()
