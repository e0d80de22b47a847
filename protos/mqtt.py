"""MQTT clients for the agents: broker URLs, protocol choice and persistent sessions (paho-mqtt 2).

Agents speak MQTT v5 (QoS 1, ResponseTopic + CorrelationData, shared
subscriptions). The embedded demo broker (amqtt) speaks only 3.1.1, so with
``protocol="auto"`` a client probes the broker once and falls back to 3.1.1;
everything a reply needs also travels in the payload (``Frame.reply_to``,
``StepResult.edge_id``), so the agents work over both. Sessions are
persistent (v5: ``clean_start=False`` + a session expiry; 3.1.1:
``clean_session=False``) so QoS 1 messages survive a reconnect, and paho
reconnects on its own; subscribe inside ``on_connect`` so reconnects renew them.

``Subscriptions`` is that habit written once: an agent forwards its client's
connect, subscribe and disconnect callbacks to it; it subscribes on every
connection, counts reconnects and the ones where the broker had lost our
session (CONNACK ``session_present`` = 0: a broker restart without
persistence, or another client that took our client id), and knows whether
every subscription is acknowledged right now (a SUBACK reason code >= 0x80
refuses one), which is what an agent's readiness reports.

``mqtts://`` URLs (default port 8883) use TLS; ``MqttAuth`` carries the login
and the CA to check the broker against. A broker that refuses the login (or
whose certificate does not verify) raises ``BrokerRefused``, which
``wait_for_broker`` does not retry: waiting does not fix a password.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

logger = logging.getLogger(__name__)

V5, V311 = mqtt.MQTTv5, mqtt.MQTTv311
PROTOCOLS = {"5": V5, "3.1.1": V311}
SESSION_EXPIRY_S = 600  # how long the broker keeps a disconnected client's session and QoS 1 queue
KEEPALIVE_S = 15
PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883}  # URL scheme -> default port
LOGIN_REFUSED = {0x85, 0x86, 0x87, 0x8A, 0x8C}  # CONNACK: client id not valid (not this login's), bad user name or
# password, not authorized, banned, bad auth method


class BrokerRefused(ConnectionError):
    """The broker answered but will not take us (login refused, certificate not trusted): retrying cannot help."""


@dataclass(frozen=True)
class MqttAuth:
    """Who a client is to the broker: a login (empty username = anonymous) and, for mqtts://, the CA to trust."""

    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None  # PEM CA bundle that signed the broker's certificate; None = the system CAs
    client_id: str = ""  # the client id bound to this login (``protos.topics.client_id``); "" = any

    @classmethod
    def from_files(cls, username: str = "", password_file: Path | None = None, ca_file: Path | None = None,
                   client_id: str = ""):
        """The password is the first line of ``password_file``; ValueError if it cannot be used."""
        password = ""
        if password_file is not None:
            if not username:
                raise ValueError(f"an MQTT password file ({password_file}) needs a username too")
            try:
                password = Path(password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as e:
                raise ValueError(f"cannot read the MQTT password from {password_file}: {e!r}") from None
        if ca_file is not None and not Path(ca_file).is_file():
            raise ValueError(f"MQTT CA file {ca_file} does not exist")
        return cls(username, password, Path(ca_file) if ca_file is not None else None, client_id)

    @classmethod
    def from_settings(cls, settings, client_id: str = "") -> MqttAuth:
        """From an agent's ``mqtt_username``, ``mqtt_password_file`` and ``mqtt_ca_file`` settings."""
        return cls.from_files(settings.mqtt_username, settings.mqtt_password_file, settings.mqtt_ca_file, client_id)

    def who(self) -> str:
        return repr(self.username) if self.username else "an anonymous client"


def broker_address(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (8883) -> (host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in PORTS or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host[:port] or mqtts://host[:port]")
    try:
        port = parts.port or PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return parts.hostname, port


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == "mqtts"


def _authenticate(client: mqtt.Client, url: str, auth: MqttAuth | None) -> None:
    """TLS for mqtts:// (the broker's certificate checked against ``auth.ca_file``), the login if any."""
    auth = auth or MqttAuth()
    if uses_tls(url):
        client.tls_set(ca_certs=str(auth.ca_file) if auth.ca_file else None)
    if auth.username:
        client.username_pw_set(auth.username, auth.password or None)


def _refusal(url: str, rc, auth: MqttAuth | None) -> ConnectionError:
    if rc.value in LOGIN_REFUSED:
        return BrokerRefused(f"the broker {url} refused the login of {(auth or MqttAuth()).who()}: {rc}")
    return ConnectionError(f"MQTT broker {url} refused the connection: {rc}")


def _try_connect(url: str, protocol: int, timeout_s: float, auth: MqttAuth | None):
    """The CONNACK reason code of one throw-away connection; ConnectionError if none comes."""
    host, port = broker_address(url)
    answered, result = threading.Event(), {}

    def on_connect(client, userdata, flags, reason_code, properties=None):
        result["rc"] = reason_code
        answered.set()

    def on_disconnect(client, userdata, flags, reason_code, properties=None):
        answered.set()  # closed before any CONNACK: e.g. plain MQTT to a TLS port

    # A login bound to a client id probes with that id, keeping its session (no clean start, the same expiry) and
    # acknowledging nothing (manual_ack): what the broker queued for it is redelivered to the real connection.
    bound = auth.client_id if auth and auth.username else ""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=bound, protocol=protocol,
                         clean_session=False if bound and protocol != V5 else None, reconnect_on_failure=False,
                         manual_ack=True)
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    _authenticate(client, url, auth)
    options = {}
    if bound and protocol == V5:
        options["properties"] = Properties(PacketTypes.CONNECT)
        options["properties"].SessionExpiryInterval = SESSION_EXPIRY_S
        options["clean_start"] = False
    try:
        client.connect(host, port, keepalive=KEEPALIVE_S, **options)
    except ssl.SSLCertVerificationError as e:
        raise BrokerRefused(f"MQTT broker {url}: its TLS certificate does not verify: {e}") from e
    except OSError as e:
        raise ConnectionError(f"MQTT broker {url} unreachable: {e}") from e
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            raise ConnectionError(f"MQTT broker {url} did not answer CONNECT within {timeout_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    if "rc" not in result:
        hint = "" if uses_tls(url) else " (a TLS port? use mqtts://)"
        raise ConnectionError(f"MQTT broker {url} closed the connection before answering CONNECT{hint}")
    return result["rc"]


def probe_protocol(url: str, timeout_s: float = 10.0, auth: MqttAuth | None = None) -> int:
    """The newest protocol the broker accepts (V5, else V311), logging in with ``auth``.

    Raises ConnectionError if the broker cannot be reached, BrokerRefused if it refuses the login.
    """
    # The version probe goes without the login: amqtt (3.1.1 only) misreads a v5 CONNECT that carries one.
    bare = MqttAuth(ca_file=auth.ca_file) if auth else None
    rc = _try_connect(url, V5, timeout_s, bare)
    protocol = V311 if rc.is_failure and "protocol" in str(rc).lower() else V5
    if protocol == V311:
        logger.info("broker %s speaks MQTT 3.1.1 only: no shared subscriptions or v5 properties", url)
    if protocol == V311 or (auth and auth.username):
        rc = _try_connect(url, protocol, timeout_s, auth)
    if rc.is_failure:
        raise _refusal(url, rc, auth)
    return protocol


def new_client(client_id: str, protocol: int) -> mqtt.Client:
    """A paho client (callback API v2) for ``protocol``, reconnecting with backoff from 1 s... 5 s.

    Its socket gets TCP_NODELAY: a step is a small write (a PUBACK) followed by
    the next frame within the peer's delayed-ACK window, and Nagle's algorithm
    would hold that frame back until the ACK (up to 40 ms on Linux).
    """
    if protocol == V5:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=V311)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: mqtt.Client, userdata, sock) -> None:
    """Turn Nagle's algorithm off on a freshly opened broker connection (TCP only)."""
    raw = getattr(sock, "_socket", sock)  # under TLS / websockets: the TCP socket underneath
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as e:
        logger.debug("TCP_NODELAY not set on the MQTT socket: %r", e)


def connect(client: mqtt.Client, url: str, protocol: int, auth: MqttAuth | None = None) -> None:
    """Connect asynchronously with a persistent session (TLS and login from ``auth``); start the network thread."""
    host, port = broker_address(url)
    _authenticate(client, url, auth)
    if protocol == V5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(host, port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)
    else:
        client.connect_async(host, port, keepalive=KEEPALIVE_S)
    client.loop_start()


def resolve_protocol(url: str, setting: str, auth: MqttAuth | None = None) -> int:
    """``setting`` is "auto" (probe the broker), "5" or "3.1.1"; with a login, the broker must accept it."""
    if setting == "auto":
        return probe_protocol(url, auth=auth)
    if setting not in PROTOCOLS:
        raise ValueError(f"MQTT protocol {setting!r} must be auto, 5 or 3.1.1")
    if auth and auth.username and (rc := _try_connect(url, PROTOCOLS[setting], 10.0, auth)).is_failure:
        raise _refusal(url, rc, auth)
    return PROTOCOLS[setting]


def publish_properties(response_topic: str, correlation_data: bytes, user: dict[str, str] | None = None):
    """PUBLISH properties for a v5 request or reply."""
    props = Properties(PacketTypes.PUBLISH)
    if response_topic:
        props.ResponseTopic = response_topic
    props.CorrelationData = correlation_data
    if user:
        props.UserProperty = list(user.items())
    return props


def user_property(message, name: str) -> str:
    """The value of a received message's v5 user property ``name`` ("" when it has none: MQTT 3.1.1 too)."""
    pairs = getattr(getattr(message, "properties", None), "UserProperty", None) or []
    return next((value for key, value in pairs if key == name), "")


def wait_for_broker(url: str, setting: str, timeout_s: float, auth: MqttAuth | None = None) -> int:
    """``resolve_protocol``, retrying with backoff (0.5 s ... 5 s) while the broker is down, up to ``timeout_s``.

    A refused login (``BrokerRefused``) is raised at once.
    """
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return resolve_protocol(url, setting, auth)
        except BrokerRefused:
            raise
        except ConnectionError as e:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("MQTT broker not reachable (%r); retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)



class Subscriptions:
    """The subscriptions one client needs: made on every connection, counted, and whether all hold now.

    Forward the client's ``on_connect`` / ``on_subscribe`` / ``on_disconnect`` to the methods of the same
    name. ``stats`` counts ``reconnects`` (a connection after the first), ``resubscribes`` (a reconnection
    whose CONNACK says the broker kept no session: our subscriptions were gone, made anew) and ``refused``
    (a SUBACK refusing one of them); each is also passed to ``on_event``, and logged once at WARNING.
    ``on_change(subscribed)`` runs (on paho's thread) whenever ``subscribed()`` flips.
    """

    def __init__(self, name: str, topics: Callable[[], list[str]], qos: int = 1,
                 on_change: Callable[[bool], None] | None = None, on_event: Callable[[str], None] | None = None):
        self.name, self.topics, self.qos = name, topics, qos
        self.on_change, self.on_event = on_change, on_event
        self.stats: Counter[str] = Counter()  # reconnects, resubscribes, refused
        self.refusal = ""  # what the latest refusing SUBACK said ("" = none)
        self._lock = threading.Lock()
        self._connections = 0
        self._pending: tuple[int, list[str]] | None = None  # (mid, topics) of this connection's SUBSCRIBE
        self._subscribed = threading.Event()

    def subscribed(self) -> bool:
        """Connected, and the broker acknowledged every subscription on this connection."""
        return self._subscribed.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Until subscribed (True) or ``timeout_s`` passed (False)."""
        return self._subscribed.wait(timeout_s)

    def on_connect(self, client: mqtt.Client, flags, reason_code) -> bool:
        """Subscribe on this new connection; count a reconnect and a lost session. False: the CONNACK refused us."""
        if reason_code.is_failure:
            return False
        topics = list(self.topics())
        with self._lock:
            self._connections += 1
            again, lost = self._connections > 1, self._connections > 1 and not flags.session_present
        if again:
            self._count("reconnects")
            if lost:
                self._count("resubscribes")
            logger.warning("%s: reconnected to the MQTT broker (reconnect %d)%s", self.name, self.stats["reconnects"],
                           ": the broker had lost our session, subscribing again" if lost else "")
        result, mid = client.subscribe([(topic, self.qos) for topic in topics])
        with self._lock:  # a failed SUBSCRIBE (the connection just dropped) waits for the next connection
            self._pending = (mid, topics) if result == mqtt.MQTT_ERR_SUCCESS else None
        return True

    def on_subscribe(self, mid: int, reason_codes) -> bool:
        """A SUBACK: True if it answered our SUBSCRIBE (and then whether every topic was granted decides)."""
        with self._lock:
            if self._pending is None or self._pending[0] != mid:
                return False
            topics, self._pending = self._pending[1], None
        refused = [f"{topic} ({rc})" for topic, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
        if refused:
            self.refusal = f"the broker refused the subscription to {', '.join(refused)}"
            self._count("refused")
            logger.error("%s: %s: not subscribed", self.name, self.refusal)
            self._set(False)
        else:
            self.refusal = ""
            self._set(True)
        return True

    def on_disconnect(self) -> None:
        """The connection is gone, and with it (for now) every subscription."""
        with self._lock:
            self._pending = None
        self._set(False)

    def _count(self, event: str) -> None:
        self.stats[event] += 1
        if self.on_event is not None:
            self.on_event(event)

    def _set(self, subscribed: bool) -> None:
        if subscribed == self._subscribed.is_set():
            return
        (self._subscribed.set if subscribed else self._subscribed.clear)()
        if self.on_change is not None:
            self.on_change(subscribed)
