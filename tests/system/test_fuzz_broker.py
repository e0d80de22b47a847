"""The secured brokers (Mosquitto from ``splitglm secrets`` and the embedded one) fuzzed with hostile clients:
client-id collisions, failed CONNECTs, reconnect storms, wildcard and ``$share`` subscriptions, over-size,
retained and QoS 2 messages (``splitglm.fuzz.broker``), honest frames answered after each."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from protos.mqtt import V5, V311
from splitglm.credentials import find_dynsec_plugin
from splitglm.fuzz import FuzzFailure
from splitglm.fuzz.broker import KINDS, BrokerInput, BrokerTarget, secrets_for
from splitglm.mqtt_access import max_packet_bytes
from tests.procs import Proc, free_port, mosquitto_binary

MAX_FRAME_BYTES = 64 << 10  # small: an over-size message is cheap to send


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def target(request, tmp_path_factory):
    port = free_port()
    folder = secrets_for(tmp_path_factory.mktemp("fuzz-broker") / "secrets", port, MAX_FRAME_BYTES)
    if request.param == "mosquitto":
        assert find_dynsec_plugin(), "Mosquitto's dynamic-security plugin (Debian's mosquitto package ships it)"
        proc = Proc("mosquitto", [mosquitto_binary(), "-c", str(folder / "mosquitto" / "mosquitto.conf")])
        proc.wait_for(r"mosquitto version .* running", timeout=20)
        url, protocol = f"mqtts://127.0.0.1:{port}", V5
    else:
        proc = Proc.python("amqtt", "splitglm.broker", "--secrets", str(folder), "--port", str(free_port()))
        url, protocol = proc.ready(60), V311
    target = BrokerTarget(url, protocol, folder, proc.popen.pid, max_packet_bytes(MAX_FRAME_BYTES))
    yield target
    target.close()
    proc.stop()


def test_every_attack_once_then_the_victim_is_untouched(target):
    for kind in KINDS:
        for pick in range(2):
            target.check(BrokerInput(kind, "wrong", 3, pick))
    assert target.refused_connects >= 2 * 3 + 2 * 3  # foreign ids, wrong passwords, unknown users; the storms'
    target.finish()


def test_random_attacks_leave_the_honest_traffic_answered(target):
    @settings(derandomize=True, database=None, deadline=None, max_examples=40, suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def fuzz(example):
        target.check(example)

    fuzz()
    assert target.answered > 40
    target.finish()


def test_a_leak_would_be_caught(target):
    """The harness fails where a property breaks: a login the broker takes is reported as such."""
    with pytest.raises(FuzzFailure, match="took the CONNECT"):
        target._refused(target.login(target.storm_login), BrokerInput("storm", "x", 1, 0))
