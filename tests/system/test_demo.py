"""The issue's acceptance paths: ``splitglm demo`` and ``splitglm demo --serve`` against a real Mosquitto."""

from __future__ import annotations

import json
import sys
import threading
import time

import openai
import paho.mqtt.client as mqtt
import psutil
import pytest

from tests.procs import Proc

pytestmark = pytest.mark.slow


def test_demo_prints_sensor_answers_and_an_http_completion(demo_checkpoint):
    proc = Proc("demo", [sys.executable, "-m", "splitglm.cli", "demo", "--readings", "2", "--max-tokens", "12"])
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 600
    while proc.alive() and time.monotonic() < deadline:
        try:
            children = list({*children, *psutil.Process(proc.popen.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    assert proc.popen.wait(10) == 0, proc.output
    out = proc.output
    assert "embedded amqtt broker" in out
    assert "sensor answers" in out and out.count("    -> ") >= 1
    assert "HTTP completion" in out and "  answer: " in out and "path accurate" in out
    assert "stopped 5 processes cleanly" in out
    assert len(children) >= 5  # broker, cloud, edge, device, sensors were separate processes
    time.sleep(1)
    assert [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []


def test_demo_serve_with_mosquitto(demo_checkpoint, mosquitto):
    proc = Proc("demo", [sys.executable, "-m", "splitglm.cli", "demo", "--serve", "--broker", mosquitto.url])
    try:
        http = proc.wait_for(r"^http: (\S+)", timeout=600).group(1)
        assert proc.wait_for(r"^mqtt: (\S+)").group(1) == mosquitto.url
        device = proc.wait_for(r"^device: (\S+)").group(1)

        client = openai.OpenAI(base_url=f"{http}/v1", api_key="none")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="splitglm", messages=messages, max_tokens=8, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        chunks = client.chat.completions.create(
            model="splitglm", messages=messages, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content

        answers: list[dict] = []
        got = threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_message(client, userdata, message):
            answer = json.loads(message.payload)
            if any(r.get("value") == 1234.5 for r in answer.get("readings", [])):
                answers.append(answer)
                got.set()

        sub.on_message = on_message
        sub.connect("127.0.0.1", mosquitto.port)
        sub.subscribe(f"results/{device}", qos=1)
        sub.loop_start()
        time.sleep(1)
        sub.publish(f"sensors/{device}/pressure", json.dumps({"value": 1234.5, "unit": "hPa"}), qos=1)
        assert got.wait(300), proc.output
        answer = answers[0]
        assert answer["device_id"] == device and answer["text"] and answer["tokens"] > 0
        assert answer["error"] is None and answer["path"] == "accurate"
        sub.loop_stop()
        sub.disconnect()
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.output
