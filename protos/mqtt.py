"""MQTT clients for the agents: broker URLs, protocol choice and persistent sessions (paho-mqtt 2).

Agents speak MQTT v5 (QoS 1, ResponseTopic + CorrelationData, shared
subscriptions). The embedded demo broker (amqtt) speaks only 3.1.1, so with
``protocol="auto"`` a client probes the broker once and falls back to 3.1.1;
everything a reply needs also travels in the payload (``Frame.reply_to``,
``StepResult.edge_id``), so the agents work over both. Sessions are
persistent (v5: ``clean_start=False`` + a session expiry; 3.1.1:
``clean_session=False``) so QoS 1 messages survive a reconnect, and paho
reconnects on its own; subscribe inside ``on_connect`` so reconnects renew them.

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
LOGIN_REFUSED = {0x86, 0x87, 0x8A, 0x8C}  # CONNACK: bad user name or password, not authorized, banned, bad auth method


class BrokerRefused(ConnectionError):
    """The broker answered but will not take us (login refused, certificate not trusted): retrying cannot help."""


@dataclass(frozen=True)
class MqttAuth:
    """Who a client is to the broker: a login (empty username = anonymous) and, for mqtts://, the CA to trust."""

    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None  # PEM CA bundle that signed the broker's certificate; None = the system CAs

    @classmethod
    def from_files(cls, username: str = "", password_file: Path | None = None, ca_file: Path | None = None):
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
        return cls(username, password, Path(ca_file) if ca_file is not None else None)

    @classmethod
    def from_settings(cls, settings) -> MqttAuth:
        """From an agent's ``mqtt_username``, ``mqtt_password_file`` and ``mqtt_ca_file`` settings."""
        return cls.from_files(settings.mqtt_username, settings.mqtt_password_file, settings.mqtt_ca_file)

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

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol, reconnect_on_failure=False)
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    _authenticate(client, url, auth)
    try:
        client.connect(host, port, keepalive=KEEPALIVE_S)
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

