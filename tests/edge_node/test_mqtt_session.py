"""The broker link of the edge and of the device agent, with a real Mosquitto, a real cloud process, and an edge
node and a device agent in this process (the tiny plan with a character tokenizer):

- another client that takes the edge's and the device's client ids (an open broker lets it) knocks both off;
  each reconnects, subscribes again and counts it, /readyz and the ready file say so in between, and a reading
  is answered afterwards;
- the device's INFO log holds neither the reading nor the prompt nor the answer, and the results carry no
  prompt, unless the settings ask for them;
- a frame over the edge's size limit is refused with RESOURCE_EXHAUSTED naming the limit, before it is parsed.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import paho.mqtt.client as mqtt
import pytest

from device_agent.agent import DeviceAgent
from device_agent.settings import DeviceSettings
from edge_node.node import EdgeNode
from edge_node.relay import FRAME_METADATA_BYTES
from edge_node.settings import EdgeSettings
from protos.mqtt import broker_address
from protos.topics import client_id, sensor_topic
from splitglm.system import ResultListener
from tests.edge_node.test_relay import MqttDevice, edges  # noqa: F401 -- the fixture
from tests.protos.test_mqtt_session import publish

DEVICE, EDGE = "box-kicked", "edge-kicked"


class Samples:
    """Samples ``probe()`` every few milliseconds in a thread until ``stop()``: the values seen, in order."""

    def __init__(self, probe):
        self.values: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(probe,), daemon=True)
        self._thread.start()

    def _run(self, probe) -> None:
        while not self._stop.wait(0.01):
            self.values.append(probe())

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.values


def take_client_id(url: str, client: str) -> mqtt.Client:
    """Connect (clean start) with someone else's client id: the broker drops that client and its session."""
    thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client, protocol=mqtt.MQTTv5,
                        reconnect_on_failure=False)  # once the owner takes its id back, it stays off
    connected = threading.Event()
    thief.on_connect = lambda *a: connected.set()
    thief.connect(*broker_address(url))
    thief.loop_start()
    assert connected.wait(10)
    return thief


def counter(node: EdgeNode, name: str) -> float:
    return node.metrics.registry.get_sample_value(f"splitglm_edge_{name}_total") or 0.0


@pytest.fixture()
def system(talking_plan, mosquitto, cloud, tmp_path):
    node = EdgeNode(EdgeSettings(plan=talking_plan, broker=mosquitto.url, cloud=cloud, edge_id=EDGE, speculate=False,
                                 http_host="127.0.0.1", http_port=0, connect_timeout_s=30, mqtt_protocol="5"))
    agent = listener = None
    try:
        node.start()
        agent = DeviceAgent(DeviceSettings(plan=talking_plan, device_id=DEVICE, broker=mosquitto.url, max_tokens=16,
                                           ready_file=tmp_path / "device.ready")).start()
        assert agent.ready.wait(30)
        listener = ResultListener(mosquitto.url, DEVICE)
        yield node, agent, listener
    finally:
        for part in (listener, agent, node):
            if part is not None:
                (part.close if part is not agent else part.stop)()


def test_edge_and_device_whose_client_ids_are_taken_subscribe_again(system, mosquitto):
    node, agent, listener = system
    assert node.health()["broker"] and agent.settings.ready_file.exists()
    health = Samples(lambda: httpx.get(f"{node.url}/readyz", timeout=5))
    ready = Samples(agent.settings.ready_file.exists)
    thieves = [take_client_id(mosquitto.url, client_id("edge", EDGE)),
               take_client_id(mosquitto.url, client_id("device", DEVICE))]
    try:
        deadline = time.monotonic() + 20  # paho reconnects after 1 s, taking the ids back
        while not (node.relay.subscribed() and agent.links.subscribed()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # a few samples after
        health, ready = health.stop(), ready.stop()
        assert node.relay.subscribed() and agent.links.subscribed() and agent.settings.ready_file.exists()
    finally:
        for thief in thieves:
            thief.loop_stop()
    down = [r for r in health if r.status_code == 503]
    assert down and all(r.json()["reasons"] == ["broker_subscription_lost"] for r in down)
    assert health[-1].json()["status"] == "ready"
    assert False in ready and ready[-1] is True  # the ready file went away while the device was not subscribed
    assert counter(node, "mqtt_reconnects") == 1 and counter(node, "mqtt_resubscribes") == 1
    assert agent.links.stats == {"reconnects": 1, "resubscribes": 1}

    publish(mosquitto.url, mqtt.MQTTv5, sensor_topic(DEVICE, "temperature"), b'{"value": 21.4375, "unit": "C"}')
    [answer] = listener.wait_for_readings(1, 60)
    assert answer["error"] is None and answer["tokens"] == 16 and answer["path"] == "accurate"


def test_the_info_log_holds_no_reading_prompt_or_answer_unless_asked(system, mosquitto, caplog):
    node, agent, listener = system
    caplog.set_level(logging.INFO, logger="device_agent")
    publish(mosquitto.url, mqtt.MQTTv5, sensor_topic(DEVICE, "temperature"), b'{"value": 21.4375, "unit": "C"}')
    [answer] = listener.wait_for_readings(1, 60)
    assert answer["error"] is None and len(answer["text"].strip()) >= 8  # 16 random characters
    assert "prompt" not in answer
    logged = caplog.text
    assert f"answer {answer['request_id']} for 1 reading(s): 16 tokens" in logged  # ids, counts, timings: yes
    assert "21.4375" not in logged and answer["text"] not in logged and "Recent readings" not in logged

    agent.settings.log_content = agent.settings.results_include_prompt = True  # the debug settings
    publish(mosquitto.url, mqtt.MQTTv5, sensor_topic(DEVICE, "humidity"), b'{"value": 47.0625}')
    second = listener.wait_for_readings(2, 60)[-1]
    assert "humidity: 47.0625" in second["prompt"] and "Recent readings" in second["prompt"]
    assert "humidity: 47.0625" in caplog.text and repr(second["text"]) in caplog.text


def test_a_frame_over_the_limit_is_refused_before_it_is_parsed(edges, mosquitto):  # noqa: F811 -- the fixture
    node = edges.start("edge-small", mqtt_protocol="5", max_frame_positions=4)
    limit = 4 * node.spec.hidden_size * 4 + FRAME_METADATA_BYTES
    assert node.relay.frame_limit == limit
    device = MqttDevice(mosquitto.url)
    try:
        device.send("edge-small", b"\xff" * (limit + 1), correlation=b"too-big")  # not even a protobuf
        result, correlation, _ = device.receive()
        assert correlation == b"too-big" and result.status == 8  # RESOURCE_EXHAUSTED
        assert f"{limit + 1} bytes exceeds the limit of {limit} bytes" in result.error
        assert "max_frame_positions 4" in result.error and result.edge_id == "edge-small"
        device.send("edge-small", b"\xff" * limit, correlation=b"at-limit")  # parsed: not a frame
        result, correlation, _ = device.receive()
        assert correlation == b"at-limit" and result.status == 3  # INVALID_ARGUMENT
    finally:
        device.close()
    refused = node.metrics.registry.get_sample_value("splitglm_edge_mqtt_refused_total", {"reason": "too_large"})
    assert refused == 1
