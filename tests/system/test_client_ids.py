"""Issue 22's acceptance on the embedded broker, with real agents: CONNECTs with the edge's client id (a wrong
password; another device's valid login) are refused, and the device's readings are still answered.

(The same on Mosquitto with the dynamic-security plugin runs in ``test_compose_run.py``; the broker-level
checks on both brokers in ``tests/protos/test_mqtt_tls.py``.)
"""

from __future__ import annotations

import time

import pytest

from protos.mqtt import BrokerRefused, MqttAuth, probe_protocol
from protos.topics import client_id
from splitglm.credentials import make_secrets
from splitglm.system import LocalSystem, ResultListener

pytestmark = pytest.mark.slow

DEVICE, OTHER, EDGE = "box-1", "box-2", "edge-demo"
ANSWER_S = 60.0  # a reading's answer on the tiny plan, with 2 shared cores, seconds


def test_readings_are_answered_after_connects_with_the_edges_client_id(talking_plan, tmp_path):
    secrets = make_secrets(tmp_path / "secrets", [DEVICE, OTHER], [EDGE])
    with LocalSystem(talking_plan, secrets=str(secrets), device_id=DEVICE, edge_id=EDGE, device_max_tokens=2) as system:
        listener = ResultListener(system.broker, DEVICE, system.device_auth)
        try:
            assert system.publish_readings(1, 0).popen.wait(60) == 0
            listener.wait_for_readings(1, ANSWER_S)
            edge_id, ca = client_id("edge", EDGE), secrets / "ca.crt"
            attacks = [MqttAuth(EDGE, "not-the-password", ca, edge_id),
                       MqttAuth.from_files(OTHER, secrets / "devices" / OTHER / "password", ca, edge_id),
                       MqttAuth.from_files(DEVICE, secrets / "devices" / DEVICE / "password", ca, edge_id)]
            for auth in attacks * 3:
                with pytest.raises(BrokerRefused):
                    probe_protocol(system.broker, 10, auth)
            t0 = time.monotonic()
            assert system.publish_readings(1, 0).popen.wait(60) == 0
            listener.wait_for_readings(2, ANSWER_S)
            assert time.monotonic() - t0 < ANSWER_S
        finally:
            listener.close()
        broker = next(p for p in system.procs if p.name == "broker")
        assert "refused the CONNECT of login 'box-2' with client id 'splitglm-edge-edge-demo'" in broker.output
        assert "not-the-password" not in broker.output  # never the password
