"""The sensor simulator as a process against a real Mosquitto broker."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt

from device_agent.readings import parse_reading
from device_agent.simulator import MODELS, Signal
from protos.mqtt import broker_address
from tests.procs import Proc


class Collector:
    """Every message on ``sensors/#``."""

    def __init__(self, url: str):
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda client, *a: client.subscribe("sensors/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda client, userdata, m: self.messages.append((m.topic, m.payload))
        self.client.connect(*broker_address(url))
        self.client.loop_start()
        assert self.subscribed.wait(20)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_publishes_count_readings_and_exits(mosquitto):
    collector = Collector(mosquitto.url)
    try:
        sim = Proc.python("sensors", "device_agent.simulator", "--broker", mosquitto.url, "--device-id", "a,b",
                          "--count", "4", "--interval-s", "0.05", "--seed", "7", "--mqtt-protocol", "3.1.1")
        assert sim.popen.wait(60) == 0, sim.output
    finally:
        collector.close()
    assert len(collector.messages) == 8  # 4 rounds x 2 devices, every one acknowledged before the exit
    for device in ("a", "b"):
        topics = [t for t, _ in collector.messages if t.startswith(f"sensors/{device}/")]
        assert [t.rsplit("/", 1)[1] for t in topics] == ["temperature", "humidity", "vibration", "temperature"]
    for topic, payload in collector.messages:
        reading = parse_reading(topic, payload, topic.split("/")[1], 4096)
        assert set(reading.fields) == {"value", "unit", "ts"}
        assert reading.fields["unit"] == MODELS[reading.sensor].unit
    assert sim.output.count("sensors/") == 8


def test_runs_until_sigterm(mosquitto):
    sim = Proc.python("sensors", "device_agent.simulator", "--broker", mosquitto.url, "--device-id", "c",
                      "--interval-s", "0.1")
    sim.wait_for(r"sensors/c/humidity", timeout=60)
    assert sim.stop() == 0
    readings = [json.loads(line.split(" ", 5)[-1].split("  (")[0]) for line in sim.lines if "sensors/c/" in line]
    assert readings and all(isinstance(r["value"], float) for r in readings)


def test_signal_is_plausible_with_occasional_anomalies():
    import random

    signal = Signal(MODELS["temperature"], random.Random(1), anomaly_rate=0.1)
    values = [signal.next() for _ in range(2000)]
    normal = [v for v, anomaly in values if not anomaly]
    spikes = [v for v, anomaly in values if anomaly]
    assert 100 < len(spikes) < 300
    assert all(18 < v < 24 for v in normal)
    assert min(spikes) > max(normal)
    humidity = Signal(MODELS["humidity"], random.Random(2), anomaly_rate=0.5)
    assert all(0 <= humidity.next()[0] <= 100 for _ in range(500))
