"""MQTT clients for the agents: broker URLs, protocol choice and persistent sessions (paho-mqtt 2).

Agents speak MQTT v5 (QoS 1, ResponseTopic + CorrelationData, shared
subscriptions). The embedded demo broker (amqtt) speaks only 3.1.1, so with
``protocol="auto"`` a client probes the broker once and falls back to 3.1.1;
everything a reply needs also travels in the payload (``Frame.reply_to``,
``StepResult.edge_id``), so the agents work over both. Sessions are
persistent (v5: ``clean_start=False`` + a session expiry; 3.1.1:
``clean_session=False``) so QoS 1 messages survive a reconnect, and paho
reconnects on its own; subscribe inside ``on_connect`` so reconnects renew them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

logger = logging.getLogger(__name__)

V5, V311 = mqtt.MQTTv5, mqtt.MQTTv311
PROTOCOLS = {"5": V5, "3.1.1": V311}
SESSION_EXPIRY_S = 600  # how long the broker keeps a disconnected client's session and QoS 1 queue
KEEPALIVE_S = 15


def broker_address(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` (default port 1883) -> (host, port); ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host[:port]")
    try:
        port = parts.port or 1883
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return parts.hostname, port


def probe_protocol(url: str, timeout_s: float = 10.0) -> int:
    """The newest protocol the broker accepts: V5, else V311. Raises ConnectionError if it cannot be reached."""
    host, port = broker_address(url)
    answered, result = threading.Event(), {}

    def on_connect(client, userdata, flags, reason_code, properties=None):
        result["rc"] = reason_code
        answered.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=V5, reconnect_on_failure=False)
    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=KEEPALIVE_S)
    except OSError as e:
        raise ConnectionError(f"MQTT broker {url} unreachable: {e}") from e
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            raise ConnectionError(f"MQTT broker {url} did not answer CONNECT within {timeout_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    rc = result["rc"]
    if not rc.is_failure:
        return V5
    if "protocol" in str(rc).lower():
        logger.info("broker %s speaks MQTT 3.1.1 only: no shared subscriptions or v5 properties", url)
        return V311
    raise ConnectionError(f"MQTT broker {url} refused the connection: {rc}")


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


def connect(client: mqtt.Client, url: str, protocol: int) -> None:
    """Connect asynchronously with a persistent session and start the network thread."""
    host, port = broker_address(url)
    if protocol == V5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(host, port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)
    else:
        client.connect_async(host, port, keepalive=KEEPALIVE_S)
    client.loop_start()


def resolve_protocol(url: str, setting: str) -> int:
    """``setting`` is "auto", "5" or "3.1.1"."""
    if setting == "auto":
        return probe_protocol(url)
    if setting not in PROTOCOLS:
        raise ValueError(f"MQTT protocol {setting!r} must be auto, 5 or 3.1.1")
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


def wait_for_broker(url: str, setting: str, timeout_s: float) -> int:
    """``resolve_protocol``, retrying with backoff (0.5 s ... 5 s) while the broker is down, up to ``timeout_s``."""
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return resolve_protocol(url, setting)
        except ConnectionError as e:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("MQTT broker not reachable (%r); retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
