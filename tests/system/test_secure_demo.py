"""The security issue's acceptance paths: ``splitglm demo --serve --secure`` and what it must refuse."""

from __future__ import annotations

import json
import ssl
import sys
import threading
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import paho.mqtt.client as mqtt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.cloud import ChannelTls, open_channel
from protos.mqtt import BrokerRefused, MqttAuth, broker_address, probe_protocol
from protos.topics import client_id, frames_subscription, results_topic, sensor_topic, steps_topic
from splitglm.credentials import make_secrets
from tests.procs import Proc

pytestmark = pytest.mark.slow

DEVICE = "secure-box"


def _login(secrets: Path, role: str, folder: str) -> MqttAuth:
    """The device's ``sensors`` or ``app`` login, bound to its client id."""
    path = secrets / folder / DEVICE
    return MqttAuth.from_files((path / "username").read_text().strip(), path / "password", secrets / "ca.crt",
                               client_id(role, DEVICE))


def _client(url: str, auth: MqttAuth) -> tuple[mqtt.Client, dict]:
    """A 3.1.1 client (the embedded broker) logged in with ``auth`` over TLS; returns it and its inbox."""
    host, port = broker_address(url)
    state: dict = {"connected": threading.Event(), "subacks": {}, "messages": [], "got": threading.Event()}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=auth.client_id or f"t-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(auth.ca_file))
    client.username_pw_set(auth.username, auth.password)
    client.on_connect = lambda *a, **k: state["connected"].set()

    def on_subscribe(client, userdata, mid, reason_codes, properties=None):
        state["subacks"][mid] = [rc.is_failure for rc in reason_codes]

    def on_message(client, userdata, message):
        state["messages"].append((message.topic, message.payload))
        state["got"].set()

    client.on_subscribe, client.on_message = on_subscribe, on_message
    client.connect(host, port)
    client.loop_start()
    assert state["connected"].wait(20)
    return client, state


def _suback(client: mqtt.Client, state: dict, topic: str) -> bool:
    """Whether the broker granted the subscription."""
    _, mid = client.subscribe(topic, qos=1)
    for _ in range(200):
        if mid in state["subacks"]:
            return not any(state["subacks"][mid])
        threading.Event().wait(0.05)
    raise AssertionError(f"no SUBACK for {topic}")


def test_secure_demo_serves_only_authenticated_clients(demo_checkpoint, tmp_path):
    secrets = make_secrets(tmp_path / "secrets", devices=[DEVICE, "other-box"], edges=["edge-demo"])
    proc = Proc("demo", [sys.executable, "-m", "splitglm.cli", "demo", "--serve", "--secure", "--secrets",
                         str(secrets), "--device-id", DEVICE])
    try:
        http = proc.wait_for(r"^http: (\S+)", timeout=600).group(1)
        broker = proc.wait_for(r"^mqtt: (\S+)").group(1)
        assert proc.wait_for(r"^device: (\S+)").group(1) == DEVICE
        cloud = proc.wait_for(r"^cloud: (\S+)").group(1)
        assert Path(proc.wait_for(r"^secrets: (\S+)").group(1)) == secrets
        assert http.startswith("https://") and broker.startswith("mqtts://")
        ca = secrets / "ca.crt"
        key = (secrets / "api-key").read_text().split()[0]

        # HTTPS with the key: served; without it or with a wrong one: 401, OpenAI's error body
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as web:
            client = openai.OpenAI(base_url=f"{http}/v1", api_key=key, http_client=web)
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            reply = client.chat.completions.create(model="splitglm", messages=messages, max_tokens=8, temperature=0)
            assert "Paris" in reply.choices[0].message.content
            body = {"messages": messages, "max_tokens": 4}
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
                refused = web.post(f"{http}/v1/chat/completions", json=body, headers=headers)
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert web.get(f"{http}/readyz").status_code == 200

        # MQTT: no login, a wrong password, or no TLS: refused
        with pytest.raises(ConnectionError):
            probe_protocol(broker, 10, MqttAuth(ca_file=ca))
        with pytest.raises(ConnectionError):
            probe_protocol(broker, 10, MqttAuth(DEVICE, "not-the-password", ca))
        with pytest.raises(ConnectionError):
            probe_protocol(broker.replace("mqtts://", "mqtt://"), 10, MqttAuth.from_files(
                DEVICE, secrets / "devices" / DEVICE / "password"))

        # a device login cannot take another login's client id (the device agent's is bound to its own)
        with pytest.raises(BrokerRefused):
            probe_protocol(broker, 10, MqttAuth.from_files("other-box", secrets / "devices" / "other-box" / "password",
                                                            ca, client_id("device", DEVICE)))
        # the device's app login reads its own answers only; its sensors login publishes its readings
        device, state = _client(broker, _login(secrets, "app", "apps"))
        sensors, _ = _client(broker, _login(secrets, "sensors", "sensors"))
        try:
            assert not _suback(device, state, steps_topic("other-box"))
            assert not _suback(device, state, results_topic("other-box"))
            assert not _suback(device, state, frames_subscription("pool"))
            assert not _suback(device, state, "splitglm/v1/device/#")
            assert _suback(device, state, results_topic(DEVICE))
            # and the whole secure path: a reading in, the device's answer out
            sensors.publish(sensor_topic(DEVICE, "pressure"), json.dumps({"value": 1234.5, "unit": "hPa"}), qos=1)
            deadline = threading.Event()
            answer = None
            for _ in range(600):
                state["got"].wait(0.5)
                answers = [json.loads(p) for t, p in state["messages"] if t == results_topic(DEVICE)]
                answer = next((a for a in answers if any(r.get("value") == 1234.5 for r in a["readings"])), None)
                if answer is not None:
                    break
                deadline.wait(0.1)
            assert answer is not None, proc.output
            assert answer["error"] is None and answer["tokens"] > 0 and answer["path"] == "accurate"
        finally:
            for client in (device, sensors):
                client.loop_stop()
                client.disconnect()

        # gRPC to the cloud: the edge's client certificate is the only way in
        host = cloud.rsplit(":", 1)[0]
        with open_channel(cloud, ChannelTls(ca, secrets / "edge" / "client.crt", secrets / "edge" / "client.key",
                                            host)) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        with open_channel(cloud, ChannelTls(ca, server_name=host)) as channel:
            with pytest.raises(grpc.RpcError) as failed:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(cloud) as channel:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.output
