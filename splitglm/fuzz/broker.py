"""A secured broker (the embedded one, or Mosquitto from ``splitglm secrets``) under hostile clients.

Beside the attacks, honest traffic runs through the broker's ACL: a victim with
an edge's login and client id echoes every frame it receives to the sender's
steps topic, and an honest device's frames (on the edge's own topic and on the
pool, a shared subscription on MQTT v5) must be echoed back within
``ANSWER_S``. Inputs, one attack each, from a device login of its own (the
abuser: a persistent client; the stormer: a fresh connection per attack):

- ``foreign-id``: a valid device login with the edge's (or the honest
  device's) client id; ``wrong-password``: the edge's login and client id
  with a wrong password; ``unknown-user``: a login nobody has. All must be
  refused (``BrokerRefused``) without touching the victim's session;
- ``storm``: N connect/disconnect cycles of a valid login, wrong passwords
  between them;
- ``wildcard`` / ``share``: the abuser subscribes to a wildcard or a
  ``$share`` filter over other clients' topics; whatever the SUBACK says, no
  message outside its own topics may reach it (checked with a sentinel on its
  own steps topic, published after the honest traffic), and a ``$share``
  subscription in the edges' group must not steal the pool's frames;
- ``oversized``: a message over the broker's ``max_packet_size``: never
  delivered, its sender disconnected;
- ``retained``: a retained reading and a retained frame (cleared again);
  the consumers' side (a retained message is never replayed into a session)
  is fuzzed at the agent (``readings``) and the relay (``relay``);
- ``qos2``: a frame at QoS 2: completed, delivered exactly once.

After each: the honest device's frames are answered. At the end
(``finish``): the victim was never disconnected, the broker process is alive
and its resident memory grew by at most ``MAX_GROWTH_MIB``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from hypothesis import strategies as st

from protos import topics
from protos.mqtt import V5, BrokerRefused, MqttAuth, broker_address, probe_protocol

from ..processes import rss_mib
from . import FuzzFailure, expect, no_hang

ANSWER_S = 10.0  # an honest frame's echo, seconds
MAX_GROWTH_MIB = 64.0  # the broker's resident memory may grow by at most this over a run, MiB
KINDS = ("foreign-id", "wrong-password", "unknown-user", "storm", "wildcard", "share", "oversized", "retained", "qos2")
LOGINS = ("fz-honest", "fz-abuser", "fz-storm")  # the device logins the target needs (``splitglm secrets``)
EDGE = "fz-edge"
TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/+#"), min_size=1, max_size=12)


def wildcards(edge: str, honest: str) -> list[str]:
    """Filters over other clients' topics (a device's ACL allows none of them)."""
    return ["#", "+/#", "splitglm/#", "splitglm/v1/+/+/+/+", f"splitglm/v1/edge/{edge}/frames/+",
            f"splitglm/v1/edge/{topics.DEFAULT_POOL}/frames/#", "splitglm/v1/device/+/steps",
            f"splitglm/v1/device/{honest}/#", "sensors/#", f"sensors/{honest}/+", "$SYS/#", "+/+/+"]


def shares(edge: str) -> list[str]:
    """``$share`` filters: in the edges' own group (stealing the pool's frames) and in others."""
    pool = topics.frames_subscription(topics.DEFAULT_POOL)
    return [topics.pool_subscription(), f"$share/{topics.SHARE_GROUP}/{topics.frames_subscription(edge)}",
            f"$share/g/{pool}", "$share/g/#", "$share/x/splitglm/v1/device/+/steps", f"$share/{topics.SHARE_GROUP}/#"]


@dataclass(frozen=True)
class BrokerInput:
    kind: str
    text: str  # a wrong password, an unknown login, or a filter's variation
    count: int  # storm: connect cycles; oversized: bytes over the cap
    pick: int

    def __repr__(self) -> str:
        return f"BrokerInput({self.kind}, text={self.text!r}, count={self.count}, pick={self.pick})"


def broker_inputs():
    return st.builds(BrokerInput, kind=st.sampled_from(KINDS), text=TEXT, count=st.integers(1, 8),
                     pick=st.integers(0, 1 << 16))


class Client:
    """One logged-in paho client (its login's bound client id): SUBACKs, messages, disconnects."""

    def __init__(self, url: str, protocol: int, auth: MqttAuth, on_message=None, clean: bool = True):
        self.messages: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.disconnects: list = []
        connected = threading.Event()
        session = {} if protocol == V5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=auth.client_id, protocol=protocol,
                                  **session)
        if url.startswith("mqtts://"):
            self.client.tls_set(ca_certs=str(auth.ca_file))
        self.client.username_pw_set(auth.username, auth.password)
        self.client.on_connect = lambda c, u, f, rc, p=None: connected.set()
        self.client.on_disconnect = lambda c, u, f, rc, p=None: self.disconnects.append(str(rc))
        self.client.on_subscribe = lambda c, u, mid, codes, p=None: self.subacks.put(codes[0])
        self.client.on_message = on_message or (lambda c, u, m: self.messages.put((m.topic, bytes(m.payload),
                                                                                   m.retain)))
        self.client.connect(*broker_address(url), keepalive=60)
        self.client.loop_start()
        if not connected.wait(10):
            self.close()
            raise FuzzFailure(f"{auth.username} could not connect to {url}")

    def subscribe(self, topic: str, qos: int = 1):
        """The SUBACK's reason code."""
        self.client.subscribe(topic, qos=qos)
        return self.subacks.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class BrokerTarget:
    """Fuzzes a running secured broker at ``url`` (logins from the ``splitglm secrets`` folder ``secrets``)."""

    url: str
    protocol: int
    secrets: Path
    broker_pid: int
    max_packet: int  # the broker's max_packet_size, bytes
    name: str = "broker"
    refused_connects: int = 0
    refused_subscriptions: int = 0
    answered: int = 0
    rss_before_mib: float | None = None
    _seen: dict[bytes, int] = field(default_factory=dict)  # payloads the victim got (its own probes), times

    def __post_init__(self):
        self.honest, self.abuser_login, self.storm_login = LOGINS
        self.ca = self.secrets / "ca.crt"
        self._changed = threading.Condition()
        self._ids = iter(range(1 << 62))
        self.victim = Client(self.url, self.protocol, self.login(EDGE), self._echo, clean=False)
        pool = topics.pool_subscription() if self.protocol == V5 else topics.frames_subscription(topics.DEFAULT_POOL)
        for topic in (topics.frames_subscription(EDGE), pool):
            expect(not self.victim.subscribe(topic).is_failure, f"the victim edge could not subscribe to {topic}")
        self.device = Client(self.url, self.protocol, self.login(self.honest))
        expect(not self.device.subscribe(topics.steps_topic(self.honest)).is_failure, "the honest device's SUBACK")
        self.abuser = Client(self.url, self.protocol, self.login(self.abuser_login))
        expect(not self.abuser.subscribe(topics.steps_topic(self.abuser_login)).is_failure, "the abuser's SUBACK")
        self.exchange()
        self.rss_before_mib = rss_mib(self.broker_pid)

    def login(self, user: str, password: str | None = None, client_id: str | None = None) -> MqttAuth:
        """``user``'s login from the secrets folder (``password`` and ``client_id`` replaced where given)."""
        role = "edge" if user.startswith("fz-edge") else "device"
        folder = self.secrets / ("edges" if role == "edge" else "devices") / user
        auth = MqttAuth.from_files(user, folder / "password", self.ca, topics.client_id(role, user))
        return MqttAuth(user, auth.password if password is None else password, self.ca,
                        auth.client_id if client_id is None else client_id)

    def strategy(self):
        return broker_inputs()

    # ---- the honest traffic --------------------------------------------------------------------------

    def _echo(self, client, userdata, message) -> None:
        """The victim edge: every frame echoed to its sender's steps topic; its probes' deliveries counted."""
        payload = bytes(message.payload)
        with self._changed:
            if payload.startswith(b"fz-"):
                self._seen[payload[:64]] = self._seen.get(payload[:64], 0) + 1
            self._changed.notify_all()
        if len(payload) <= 256:  # (an over-size message that got through is counted above, never echoed)
            client.publish(topics.steps_topic(topics.frame_sender(message.topic)), payload, qos=1)

    def seen(self, payload: bytes, count: int = 1, timeout: float = ANSWER_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._seen.get(payload[:64], 0) >= count, timeout)

    def exchange(self) -> None:
        """One honest frame on the edge's own topic and one on the pool, each echoed back."""
        for edge in (EDGE, topics.DEFAULT_POOL):
            payload = f"ex-{next(self._ids)}".encode()
            self.device.client.publish(topics.frames_topic(edge, self.honest), payload, qos=1)
            deadline = time.monotonic() + ANSWER_S
            while True:
                try:
                    _, got, _ = self.device.messages.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise FuzzFailure(f"the honest device's frame on {edge!r} was not answered within "
                                      f"{ANSWER_S:g} s") from None
                if got == payload:
                    break
        self.answered += 1

    # ---- one input -----------------------------------------------------------------------------------

    def check(self, x: BrokerInput) -> None:
        with no_hang(f"the broker on {x!r}", 60.0):
            getattr(self, "_" + x.kind.replace("-", "_"))(x)
            self.exchange()

    def _refused(self, auth: MqttAuth, x: BrokerInput) -> None:
        try:
            probe_protocol(self.url, 10, auth)
        except BrokerRefused:
            self.refused_connects += 1
            return
        except ConnectionError as e:
            raise FuzzFailure(f"the broker did not answer a CONNECT ({e}) on {x!r}") from e
        raise FuzzFailure(f"the broker took the CONNECT of {auth.username!r} with client id {auth.client_id!r} "
                          f"({x!r})")

    def _foreign_id(self, x: BrokerInput) -> None:
        stolen = (topics.client_id("edge", EDGE), topics.client_id("device", self.honest))[x.pick % 2]
        self._refused(self.login(self.abuser_login, client_id=stolen), x)

    def _wrong_password(self, x: BrokerInput) -> None:
        self._refused(self.login(EDGE, password=x.text), x)

    def _unknown_user(self, x: BrokerInput) -> None:
        cid = (topics.client_id("edge", EDGE), f"fz-{x.text}")[x.pick % 2]
        self._refused(MqttAuth(f"nobody-{x.text}", x.text, self.ca, cid), x)

    def _storm(self, x: BrokerInput) -> None:
        """``count`` connect/disconnect cycles of a valid login, each followed by a wrong password."""
        for _ in range(x.count):
            try:
                probe_protocol(self.url, 10, self.login(self.storm_login))
            except ConnectionError as e:
                raise FuzzFailure(f"a valid login was refused during a reconnect storm: {e} ({x!r})") from e
            self._refused(self.login(self.storm_login, password=x.text + "!"), x)

    def _wildcard(self, x: BrokerInput) -> None:
        filters = wildcards(EDGE, self.honest)
        self._no_leak(filters[x.pick % len(filters)], x)

    def _share(self, x: BrokerInput) -> None:
        filters = shares(EDGE)
        self._no_leak(filters[x.pick % len(filters)], x)

    def _no_leak(self, wanted: str, x: BrokerInput) -> None:
        """The abuser subscribes to ``wanted``; the honest traffic goes on; nothing but its own steps reach it."""
        if self.abuser.subscribe(wanted).is_failure:
            self.refused_subscriptions += 1
        try:
            self.exchange()  # frames and steps of the honest device (and the pool's frames) pass by
            sentinel = f"sentinel-{next(self._ids)}".encode()
            self.victim.client.publish(topics.steps_topic(self.abuser_login), sentinel, qos=1)
            own = topics.steps_topic(self.abuser_login)
            while True:
                try:
                    topic, payload, _ = self.abuser.messages.get(timeout=ANSWER_S)
                except queue.Empty:
                    raise FuzzFailure(f"the abuser's own steps (a sentinel) did not come after {x!r}") from None
                expect(topic == own and payload.startswith(b"sentinel-"), f"subscribed to {wanted!r} by a device "
                       f"login, it received {payload[:40]!r} on {topic!r} ({x!r})")
                if payload == sentinel:
                    break
        finally:
            self.abuser.client.unsubscribe(wanted)

    def _oversized(self, x: BrokerInput) -> None:
        """A message over max_packet_size: never delivered; its sender disconnected."""
        probe = f"fz-big-{next(self._ids)}-".encode()
        sender = Client(self.url, self.protocol, self.login(self.storm_login))
        try:
            payload = probe + bytes(self.max_packet + x.count * 97 - len(probe) + 1)
            sender.client.publish(topics.frames_topic(EDGE, self.storm_login), payload, qos=1)
            deadline = time.monotonic() + ANSWER_S
            while not sender.disconnects and time.monotonic() < deadline:
                time.sleep(0.02)
            expect(bool(sender.disconnects), f"the broker kept the connection of a client that sent "
                   f"{len(payload)} bytes (max_packet_size {self.max_packet}) ({x!r})")
        finally:
            sender.close()
        self.exchange()  # (the victim's echo of anything before it has come)
        expect(not self.seen(probe, timeout=0.0), f"a {len(payload)}-byte message over max_packet_size "
               f"{self.max_packet} reached the edge ({x!r})")

    def _retained(self, x: BrokerInput) -> None:
        """A retained reading and a retained frame, then cleared (a retained empty message)."""
        sender = Client(self.url, self.protocol, self.login(self.storm_login))
        probe = f"fz-retained-{next(self._ids)}".encode()
        try:
            for topic in (topics.sensor_topic(self.storm_login, "fuzz"), topics.frames_topic(EDGE, self.storm_login)):
                sender.client.publish(topic, probe, qos=1, retain=True).wait_for_publish(10)
                sender.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        finally:
            sender.close()
        expect(self.seen(probe), f"the retained frame did not reach the edge ({x!r})")

    def _qos2(self, x: BrokerInput) -> None:
        """A frame at QoS 2: completed, delivered once."""
        sender = Client(self.url, self.protocol, self.login(self.storm_login))
        probe = f"fz-qos2-{next(self._ids)}".encode()
        try:
            info = sender.client.publish(topics.frames_topic(EDGE, self.storm_login), probe, qos=2)
            info.wait_for_publish(10)
            expect(info.is_published(), f"a QoS 2 publish was not completed within 10 s ({x!r})")
        finally:
            sender.close()
        expect(self.seen(probe), f"a QoS 2 frame did not reach the edge ({x!r})")
        self.exchange()
        with self._changed:
            times = self._seen.get(probe, 0)
        expect(times == 1, f"a QoS 2 frame reached the edge {times} times ({x!r})")

    # ---- the whole run -------------------------------------------------------------------------------

    def growth_mib(self) -> float | None:
        after = rss_mib(self.broker_pid)
        return None if after is None or self.rss_before_mib is None else round(after - self.rss_before_mib, 1)

    def finish(self) -> None:
        """The victim never lost its session, the broker lives, its memory stayed bounded, the honest traffic flows."""
        expect(rss_mib(self.broker_pid) is not None, f"the broker (pid {self.broker_pid}) died")
        self.exchange()
        expect(self.victim.disconnects == [], f"the victim edge was disconnected: {self.victim.disconnects}")
        growth = self.growth_mib()
        expect(growth is not None and growth <= MAX_GROWTH_MIB, f"the broker's resident memory grew by {growth} MiB "
               f"(at most {MAX_GROWTH_MIB:g})")
        with self._changed:
            expect(len(self._seen) < 1 << 20, "unbounded bookkeeping")

    def close(self) -> None:
        for client in (self.abuser, self.device, self.victim):
            client.close()


def secrets_for(folder: Path, mqtt_port: int, max_frame_bytes: int) -> Path:
    """The ``splitglm secrets`` folder this target needs (the logins in LOGINS and EDGE)."""
    from ..credentials import make_secrets

    return make_secrets(folder, list(LOGINS), [EDGE], mqtt_port=mqtt_port, max_frame_bytes=max_frame_bytes,
                        force=True)
