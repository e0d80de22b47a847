"""One answered sensor reading, seen in the device agent's /metrics (served on its metrics port) and the
edge's: a real Mosquitto, a real cloud process, an edge and a device agent in this process."""

from __future__ import annotations

import httpx
import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from device_agent.settings import DeviceSettings
from edge_node.metrics import TIMINGS
from protos.topics import sensor_topic
from tests.edge_node.test_mqtt_session import DEVICE, system  # noqa: F401 -- the fixture
from tests.protos.test_mqtt_session import publish


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted label items) -> value, from a /metrics page."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_one_answered_reading_in_the_device_and_edge_metrics(system, mosquitto):  # noqa: F811 -- the fixture
    node, agent, listener = system
    port = agent.metrics.serve("127.0.0.1", 0)  # what start() does with metrics_port set (stop() ends it)
    publish(mosquitto.url, mqtt.MQTTv5, sensor_topic(DEVICE, "temperature"), b'{"value": 21.5, "unit": "C"}')
    [answer] = listener.wait_for_readings(1, 60)
    assert answer["error"] is None and answer["tokens"] == 16

    device = scrape(f"http://127.0.0.1:{port}/metrics")
    value = lambda name, **labels: device.get((name, tuple(sorted(labels.items()))))  # noqa: E731
    assert value("splitglm_device_readings_total", outcome="queued") == 1
    assert value("splitglm_device_readings_total", outcome="invalid") == 0
    assert value("splitglm_device_answers_total", outcome="ok") == 1
    assert value("splitglm_device_answers_total", outcome="error") == 0
    assert value("splitglm_device_answer_latency_seconds_count") == 1
    assert 0 < value("splitglm_device_answer_latency_seconds_sum") < 60
    assert value("splitglm_device_tokens_total") == 16
    sent = value("splitglm_device_frames_sent_total")
    assert sent >= 1 and value("splitglm_device_step_answers_total") == sent
    assert value("splitglm_device_replays_total") == 0 and value("splitglm_device_mqtt_reconnects_total") == 0
    assert value("splitglm_device_ready") == 1 and value("process_cpu_seconds_total") > 0

    edge = scrape(f"{node.url}/metrics")
    assert edge[("splitglm_edge_device_frames_total", (("code", "OK"),))] == sent
    timings = {dict(labels)["timing"] for name, labels in edge if name == "splitglm_edge_step_timing_seconds_count"}
    assert timings and timings <= TIMINGS, timings
    assert edge[("process_cpu_seconds_total", ())] > 0


def test_the_device_metrics_port_is_off_by_default(talking_plan):
    settings = DeviceSettings(plan=talking_plan, device_id="d")
    assert settings.metrics_port is None and settings.metrics_host == "127.0.0.1"
