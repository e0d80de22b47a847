"""protos.mqtt over TLS with logins, against real brokers started from ``splitglm secrets``.

Each test runs against Mosquitto (DIR/mosquitto/mosquitto.conf as written, MQTT
v5) and against the embedded amqtt broker (``--secrets DIR``, MQTT 3.1.1).
Negative delivery checks use a sentinel instead of a sleep: a message the
receiver may get is published after the forbidden one, so a forbidden message
that got through would arrive first.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from protos.mqtt import V5, V311, BrokerRefused, MqttAuth, connect, new_client, probe_protocol, wait_for_broker
from splitglm.credentials import make_secrets
from tests.procs import Proc, free_port, mosquitto_binary

DEVICE_A, DEVICE_B, EDGE = "dev-a", "dev-b", "edge-a"
STEPS = "splitglm/v1/device/{}/steps"
FRAMES = "splitglm/v1/edge/{}/frames/{}"
_ids = itertools.count()


@dataclass
class Broker:
    kind: str
    url: str
    protocol: int
    secrets: Path

    def auth(self, user: str, password_of: str | None = None) -> MqttAuth:
        """``user``'s login, with the password of ``password_of`` (default: its own)."""
        owner = password_of or user
        kind = "edges" if owner.startswith("edge") else "devices"
        return MqttAuth.from_files(user, self.secrets / kind / owner / "password", self.secrets / "ca.crt")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> tuple[Path, int]:
    port = free_port()
    return make_secrets(tmp_path_factory.mktemp("tls") / "secrets", [DEVICE_A, DEVICE_B], [EDGE], mqtt_port=port), port


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def broker(request, secrets):
    folder, port = secrets
    if request.param == "mosquitto":
        proc = Proc("mosquitto", [mosquitto_binary(), "-c", str(folder / "mosquitto" / "mosquitto.conf"), "-v"])
        proc.wait_for(r"mosquitto version .* running", timeout=20)
        yield Broker("mosquitto", f"mqtts://127.0.0.1:{port}", V5, folder)
    else:
        proc = Proc.python("amqtt", "splitglm.broker", "--secrets", str(folder), "--port", str(free_port()))
        yield Broker("amqtt", proc.ready(60), V311, folder)
    proc.stop()


class Peer:
    """One logged-in client: its SUBACK reason codes and the messages it receives, in order."""

    def __init__(self, broker: Broker, auth: MqttAuth):
        self.messages: queue.Queue = queue.Queue()
        self._subacks: queue.Queue = queue.Queue()
        connected = threading.Event()
        self.client = new_client(f"test-{auth.username}-{next(_ids)}-{time.monotonic_ns()}", broker.protocol)
        self.client.on_connect = lambda client, userdata, flags, rc, props=None: connected.set()
        self.client.on_subscribe = lambda client, userdata, mid, codes, props=None: self._subacks.put(codes[0])
        self.client.on_message = lambda client, userdata, m: self.messages.put((m.topic, bytes(m.payload)))
        connect(self.client, broker.url, broker.protocol, auth)
        assert connected.wait(10), f"{auth.username} did not connect to {broker.url}"

    def subscribe(self, topic: str):
        self.client.subscribe(topic, qos=1)
        return self._subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def until(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message up to and including the first with ``payload``."""
        got = []
        while not got or got[-1][1] != payload:
            got.append(self.messages.get(timeout=10))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def peers(broker):
    opened = []

    def open_peer(user: str) -> Peer:
        opened.append(Peer(broker, broker.auth(user)))
        return opened[-1]

    yield open_peer
    for peer in opened:
        peer.close()


def test_a_device_logs_in_over_tls(broker, peers):
    assert probe_protocol(broker.url, 10, broker.auth(DEVICE_A)) == broker.protocol
    device = peers(DEVICE_A)
    assert not device.subscribe(STEPS.format(DEVICE_A)).is_failure
    assert device.client.socket().version().startswith("TLSv1.")  # an ssl.SSLSocket: the session is encrypted


@pytest.mark.parametrize("user,password_of,who", [
    ("", None, "an anonymous client"),
    (DEVICE_A, DEVICE_B, f"'{DEVICE_A}'"),  # another login's password
    ("nobody", DEVICE_A, "'nobody'"),
])
def test_refused_logins_fail_at_once_with_the_name(broker, user, password_of, who):
    auth = MqttAuth(ca_file=broker.secrets / "ca.crt") if not user else broker.auth(user, password_of)
    t0 = time.monotonic()
    with pytest.raises(BrokerRefused, match=f"refused the login of {who}"):
        wait_for_broker(broker.url, "auto", 30, auth)  # not retried: waiting does not fix a password
    assert time.monotonic() - t0 < 10


def test_the_tls_port_needs_tls_and_the_right_ca(broker):
    plain = broker.url.replace("mqtts://", "mqtt://")
    with pytest.raises(ConnectionError, match="closed the connection before answering CONNECT") as e:
        probe_protocol(plain, 5, broker.auth(DEVICE_A))
    assert not isinstance(e.value, BrokerRefused)
    with pytest.raises(BrokerRefused, match="certificate does not verify"):  # the system CAs do not know ours
        probe_protocol(broker.url, 5, MqttAuth(DEVICE_A, "x"))


def test_a_device_cannot_read_another_devices_steps_or_the_frames(broker, peers):
    spy, edge, other = peers(DEVICE_A), peers(EDGE), peers(DEVICE_B)
    foreign = [STEPS.format(DEVICE_B), "splitglm/v1/device/#", "splitglm/v1/edge/+/frames/+", FRAMES.format(EDGE, "+"),
               "$share/g/" + STEPS.format(DEVICE_B), "$share/g/" + FRAMES.format(EDGE, "+")]
    codes = [spy.subscribe(topic) for topic in foreign]
    assert all(code.is_failure for code in codes), codes  # Mosquitto: its dynamic-security plugin refuses them
    assert not spy.subscribe(STEPS.format(DEVICE_A)).is_failure
    edge.publish(STEPS.format(DEVICE_B), b"steps for b")
    other.publish(FRAMES.format(EDGE, DEVICE_B), b"frame of b")
    edge.publish(STEPS.format(DEVICE_A), b"sentinel")
    assert [payload for _, payload in spy.until(b"sentinel")] == [b"sentinel"]


def test_what_a_device_publishes_outside_its_acl_reaches_nobody(broker, peers):
    forger, edge, victim = peers(DEVICE_A), peers(EDGE), peers(DEVICE_B)
    assert not edge.subscribe(FRAMES.format("+", "+")).is_failure  # the edge login reads every frame
    assert not edge.subscribe("$share/edges/" + FRAMES.format("pool", "+")).is_failure  # also as a shared group
    for topic in (STEPS.format(DEVICE_B), f"sensors/{DEVICE_B}/#"):
        assert not victim.subscribe(topic).is_failure
    forger.publish(FRAMES.format(EDGE, DEVICE_B), b"forged frame")  # frames under another device's id
    forger.publish(STEPS.format(DEVICE_B), b"forged step")  # only edges write steps
    forger.publish(f"sensors/{DEVICE_B}/temperature", b"forged reading")
    forger.publish(FRAMES.format(EDGE, DEVICE_A), b"own frame")
    assert edge.until(b"own frame") == [(FRAMES.format(EDGE, DEVICE_A), b"own frame")]
    edge.publish(STEPS.format(DEVICE_B), b"real step")  # the edge login writes steps
    assert victim.until(b"real step") == [(STEPS.format(DEVICE_B), b"real step")]


def test_the_sensor_simulator_logs_in_with_its_settings(broker, peers):
    device = peers(DEVICE_A)
    assert not device.subscribe(f"sensors/{DEVICE_A}/#").is_failure
    flags = ["--broker", broker.url, "--device-id", DEVICE_A, "--count", "1", "--interval-s", "0",
             "--mqtt-username", DEVICE_A, "--mqtt-ca-file", str(broker.secrets / "ca.crt")]
    own = str(broker.secrets / "devices" / DEVICE_A / "password")
    sim = Proc.python("sensors", "device_agent.simulator", *flags, "--mqtt-password-file", own)
    assert sim.popen.wait(60) == 0, sim.output
    topic, _ = device.messages.get(timeout=10)
    assert topic == f"sensors/{DEVICE_A}/temperature"
    wrong = str(broker.secrets / "devices" / DEVICE_B / "password")
    sim = Proc.python("sensors", "device_agent.simulator", *flags, "--mqtt-password-file", wrong)
    assert sim.popen.wait(60) == 1
    assert f"refused the login of '{DEVICE_A}'" in sim.output
