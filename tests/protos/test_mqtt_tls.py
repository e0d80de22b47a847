"""protos.mqtt over TLS with logins, against real brokers started from ``splitglm secrets``.

Each test runs against Mosquitto (DIR/mosquitto/mosquitto.conf as written, MQTT
v5) and against the embedded amqtt broker (``--secrets DIR``, MQTT 3.1.1).
Negative delivery checks use a sentinel instead of a sleep: a message the
receiver may get is published after the forbidden one, so a forbidden message
that got through would arrive first. Every client uses its login's bound
client id (``DIR/mosquitto/clientids``), as the agents do.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from protos.mqtt import V5, V311, BrokerRefused, MqttAuth, broker_address, probe_protocol, wait_for_broker
from splitglm.credentials import find_dynsec_plugin, make_secrets
from splitglm.mqtt_access import load_clientids, max_packet_bytes
from tests.procs import Proc, free_port, mosquitto_binary

DEVICE_A, DEVICE_B, EDGE, EDGE_B = "dev-a", "dev-b", "edge-a", "edge-b"
SENSORS_A = f"{DEVICE_A}$sensors"
STEPS = "splitglm/v1/device/{}/steps"
FRAMES = "splitglm/v1/edge/{}/frames/{}"
MAX_FRAME_BYTES = 64 << 10  # small, so an over-size message is cheap to send
ROLE_FOLDERS = {"sensors": "sensors", "app": "apps"}


def login_folder(secrets: Path, login: str) -> Path:
    """Where ``splitglm secrets`` wrote a login's files."""
    device, _, role = login.partition("$")
    if role:
        return secrets / ROLE_FOLDERS[role] / device
    return secrets / ("edges" if login.startswith("edge") else "devices") / login


@dataclass
class Broker:
    kind: str
    url: str
    protocol: int
    secrets: Path

    def auth(self, user: str, password_of: str | None = None, client_id: str | None = None) -> MqttAuth:
        """``user``'s login, with the password of ``password_of`` (default: its own), and the client id
        ``client_id`` (default: the one bound to ``user``)."""
        bound = load_clientids(self.secrets / "mosquitto" / "clientids").get(user, "")
        return MqttAuth.from_files(user, login_folder(self.secrets, password_of or user) / "password",
                                   self.secrets / "ca.crt", bound if client_id is None else client_id)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> tuple[Path, int]:
    port = free_port()
    folder = make_secrets(tmp_path_factory.mktemp("tls") / "secrets", [DEVICE_A, DEVICE_B], [EDGE, EDGE_B],
                          mqtt_port=port, serves={EDGE_B: [DEVICE_B]}, max_frame_bytes=MAX_FRAME_BYTES)
    return folder, port


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def broker(request, secrets):
    folder, port = secrets
    if request.param == "mosquitto":
        assert find_dynsec_plugin(), "Mosquitto's dynamic-security plugin (Debian's mosquitto package ships it)"
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
        self.disconnects: list = []  # reason codes of every lost connection
        connected = threading.Event()
        self.client_id = auth.client_id
        # a clean session (not the agents' persistent one): nothing carries over from an earlier test's peer
        clean = {} if broker.protocol == V5 else {"clean_session": True}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=auth.client_id,
                                  protocol=broker.protocol, **clean)
        self.client.tls_set(ca_certs=str(auth.ca_file))
        self.client.username_pw_set(auth.username, auth.password)
        self.client.on_connect = lambda client, userdata, flags, rc, props=None: connected.set()
        self.client.on_disconnect = lambda client, userdata, flags, rc, props=None: self.disconnects.append(rc)
        self.client.on_subscribe = lambda client, userdata, mid, codes, props=None: self._subacks.put(codes[0])
        self.client.on_message = lambda client, userdata, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(*broker_address(broker.url))
        self.client.loop_start()
        assert connected.wait(10), f"{auth.username} did not connect to {broker.url}"

    def subscribe(self, topic: str):
        self.client.subscribe(topic, qos=1)
        return self._subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if wait:
            info.wait_for_publish(10)

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
    assert not edge.subscribe(FRAMES.format(EDGE, "+")).is_failure  # the edge login reads its own frames
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


def test_the_sensor_simulator_logs_in_with_its_own_login(broker, peers):
    device = peers(DEVICE_A)
    assert not device.subscribe(f"sensors/{DEVICE_A}/#").is_failure
    flags = ["--broker", broker.url, "--device-id", DEVICE_A, "--count", "1", "--interval-s", "0",
             "--mqtt-username", SENSORS_A, "--mqtt-ca-file", str(broker.secrets / "ca.crt")]
    own = str(login_folder(broker.secrets, SENSORS_A) / "password")
    sim = Proc.python("sensors", "device_agent.simulator", *flags, "--mqtt-password-file", own)
    assert sim.popen.wait(60) == 0, sim.output
    topic, _ = device.messages.get(timeout=10)
    assert topic == f"sensors/{DEVICE_A}/temperature"
    wrong = str(login_folder(broker.secrets, DEVICE_B) / "password")
    sim = Proc.python("sensors", "device_agent.simulator", *flags, "--mqtt-password-file", wrong)
    assert sim.popen.wait(60) == 1
    assert f"refused the login of '{SENSORS_A}'" in sim.output
    both = [f"{DEVICE_A},{DEVICE_B}" if f == DEVICE_A else f for f in flags]  # one login, one device
    sim = Proc.python("sensors", "device_agent.simulator", *both, "--mqtt-password-file", own)
    assert sim.popen.wait(60) == 2 and "one simulator per device" in sim.output


# ---- client ids bound to logins (issue 22) ------------------------------------------------------


def test_a_refused_connect_never_touches_the_edges_session(broker, peers):
    """A wrong password, or a valid device login, with the edge's client id: refused; the edge stays connected."""
    edge, device = peers(EDGE), peers(DEVICE_A)
    assert not edge.subscribe(FRAMES.format(EDGE, "+")).is_failure
    edge_id = edge.client_id
    attacks = [broker.auth(EDGE, password_of=DEVICE_A), broker.auth(DEVICE_A, client_id=edge_id),
               broker.auth(SENSORS_A, client_id=edge_id), broker.auth(DEVICE_B, client_id="anything-else")]
    for auth in attacks:
        with pytest.raises(BrokerRefused, match=re.escape(f"refused the login of '{auth.username}'")):
            probe_protocol(broker.url, 10, auth)
    device.publish(FRAMES.format(EDGE, DEVICE_A), b"still served")
    assert edge.until(b"still served") == [(FRAMES.format(EDGE, DEVICE_A), b"still served")]
    assert edge.disconnects == []  # never knocked off, not even for a reconnect


def test_each_login_connects_with_its_own_client_id(broker):
    for login in (DEVICE_A, SENSORS_A, EDGE):
        assert probe_protocol(broker.url, 10, broker.auth(login)) == broker.protocol


def test_sensors_publish_only_their_devices_readings(broker, peers):
    sensors, device_b = peers(SENSORS_A), peers(DEVICE_B)
    assert not device_b.subscribe(f"sensors/{DEVICE_B}/#").is_failure
    assert sensors.subscribe(f"sensors/{DEVICE_A}/#").is_failure  # it writes; it reads nothing
    sensors.publish(f"sensors/{DEVICE_B}/temperature", b"forged reading")
    sensors.publish(FRAMES.format("pool", DEVICE_A), b"forged frame")
    device_b.publish(f"sensors/{DEVICE_B}/temperature", b"sentinel")
    assert [payload for _, payload in device_b.until(b"sentinel")] == [b"sentinel"]


def test_an_edge_reads_its_own_frames_and_writes_only_its_devices_steps(broker, peers):
    edge_b, victim, other = peers(EDGE_B), peers(DEVICE_A), peers(DEVICE_B)
    assert edge_b.subscribe(FRAMES.format(EDGE, "+")).is_failure  # another edge's frames
    assert edge_b.subscribe(FRAMES.format("+", "+")).is_failure
    assert not edge_b.subscribe(FRAMES.format(EDGE_B, "+")).is_failure
    assert not edge_b.subscribe(FRAMES.format("pool", "+")).is_failure
    assert not victim.subscribe(STEPS.format(DEVICE_A)).is_failure
    assert not other.subscribe(STEPS.format(DEVICE_B)).is_failure
    edge_b.publish(STEPS.format(DEVICE_A), b"forged step")  # edge-b serves dev-b only
    edge_b.publish(STEPS.format(DEVICE_B), b"served step")
    assert other.until(b"served step") == [(STEPS.format(DEVICE_B), b"served step")]
    peers(EDGE).publish(STEPS.format(DEVICE_A), b"sentinel")  # edge-a serves every device
    assert [payload for _, payload in victim.until(b"sentinel")] == [b"sentinel"]


def test_a_message_over_the_frame_cap_is_refused_by_the_broker(broker, peers):
    edge, sender, other = peers(EDGE), peers(DEVICE_A), peers(DEVICE_B)
    assert not edge.subscribe(FRAMES.format(EDGE, "+")).is_failure
    sender.publish(FRAMES.format(EDGE, DEVICE_A), bytes(max_packet_bytes(MAX_FRAME_BYTES) + 1), wait=False)
    other.publish(FRAMES.format(EDGE, DEVICE_B), bytes(MAX_FRAME_BYTES))  # the largest legal frame passes
    got = edge.until(bytes(MAX_FRAME_BYTES))
    assert [topic for topic, _ in got] == [FRAMES.format(EDGE, DEVICE_B)]
    deadline = time.monotonic() + 10
    while not sender.disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.disconnects  # the broker closed the over-size sender's connection
