"""The real topology as processes: Mosquitto, ``cloud_service``, ``edge_node``, ``device_agent`` on the demo model.

A reading published with a plain paho client must come back as one JSON
answer on ``results/<device>`` that covers it, also when the broker restarts
while the device is generating.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from protos.mqtt import V5, broker_address
from protos.topics import frames_subscription, sensor_topic
from splitglm.system import ResultListener
from tests.procs import Mosquitto, Proc, free_port

pytestmark = pytest.mark.slow

DEVICE, EDGE = "box-e2e", "edge-e2e"
START_S = 300.0  # loading a tier on a busy 2-core machine takes a while
ANSWER_S = 180.0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from partitioner.plan.demo import demo_plan

    plan = str(demo_plan())
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    procs: list[Proc] = []

    def start(name: str, module: str, *args: str) -> Proc:
        proc = Proc.python(name, module, *args)
        procs.append(proc)
        proc.ready(START_S)
        return proc

    try:
        threads = ("--threads", "1")
        cloud = start("cloud", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", str(free_port()),
                      *threads)
        edge = start("edge", "edge_node", "--plan", plan, "--broker", broker.url, "--cloud",
                     cloud.ready().removeprefix("grpc://"), "--edge-id", EDGE, "--http-host", "127.0.0.1",
                     "--http-port", str(free_port()), *threads)
        device = start("device", "device_agent", "--plan", plan, "--broker", broker.url, "--device-id", DEVICE,
                       "--max-tokens", "12", *threads)
        listener = ResultListener(broker.url, DEVICE)
        yield SimpleNamespace(broker=broker, cloud=cloud, edge=edge, device=device, listener=listener)
        listener.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
        broker.stop()


def publish_reading(url: str, sensor: str, reading: dict) -> None:
    """One reading, QoS 1, from a plain paho client; returns once the broker acknowledged it."""
    host, port = broker_address(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(sensor_topic(DEVICE, sensor), json.dumps(reading), qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def answers_for(listener: ResultListener, value: float) -> list[dict]:
    return [a for a in listener.answers if any(r.get("value") == value for r in a.get("readings", []))]


def check_answer(answer: dict, value: float) -> None:
    assert answer["error"] is None, answer
    assert answer["device_id"] == DEVICE and answer["request_id"]
    assert {"sensor": "temperature", "value": value, "unit": "C"}.items() <= answer["readings"][-1].items()
    assert "prompt" not in answer  # only with --results-include-prompt
    assert answer["text"].strip() and 0 < answer["tokens"] <= 12
    assert answer["path"] == "accurate" and answer["paths"] == ["accurate"] * answer["tokens"]
    assert answer["finish_reason"] in ("stop", "length") and answer["degraded"] is False
    assert answer["frame_bytes"] > 0 and answer["timings_ms"]["total"] >= answer["timings_ms"]["ttft"] > 0


def test_reading_gets_an_answer(system):
    publish_reading(system.broker.url, "temperature", {"value": 21.5, "unit": "C", "ts": time.time()})
    system.listener.wait_for_readings(1, ANSWER_S)
    [answer] = answers_for(system.listener, 21.5)
    check_answer(answer, 21.5)
    # its INFO log: the answer's id and counts, neither the reading nor the prompt nor the answer's text
    assert f"answer {answer['request_id']} for 1 reading(s)" in system.device.output
    for content in ("temperature: 21.5 C", "Recent readings", answer["text"].strip()):
        assert content not in system.device.output


def test_broker_restart_while_generating(system):
    """The broker restarts as soon as the device sends its second frame: exactly one answer still arrives."""
    covered = system.listener.covered()
    second_frame = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=V5)
    watcher.on_message = lambda *a: second_frame.set()  # seq >= 1 goes to the edge's own topic
    watcher.on_connect = lambda client, *a: client.subscribe(frames_subscription(EDGE), qos=0)
    watcher.connect(*broker_address(system.broker.url))
    watcher.loop_start()
    try:
        time.sleep(0.5)  # let the watcher's subscription take effect
        publish_reading(system.broker.url, "temperature", {"value": 38.9, "unit": "C", "ts": time.time()})
        assert second_frame.wait(ANSWER_S), "the device never sent a second frame"
    finally:
        watcher.disconnect()
        watcher.loop_stop()
    system.broker.restart()
    system.listener.wait_for_readings(covered + 1, ANSWER_S)
    time.sleep(3)  # a duplicate answer would arrive by now
    [answer] = answers_for(system.listener, 38.9)
    check_answer(answer, 38.9)
    assert "disconnected from" in system.device.output


def test_device_stops_cleanly(system):
    assert system.device.stop() == 0
    assert "stopped" in system.device.output
