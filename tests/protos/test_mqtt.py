"""protos.mqtt against a real Mosquitto: protocol probing and the client sockets."""

from __future__ import annotations

import socket
import threading

from protos.mqtt import V5, connect, new_client, resolve_protocol


def test_clients_turn_nagle_off(mosquitto):
    """A decode step is a small PUBACK then the next frame: with Nagle on, the frame waits for a delayed ACK."""
    protocol = resolve_protocol(mosquitto.url, "auto")
    assert protocol == V5
    client, connected = new_client("nodelay-test", protocol), threading.Event()
    client.on_connect = lambda *a, **k: connected.set()
    connect(client, mosquitto.url, protocol)
    try:
        assert connected.wait(10)
        assert client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.disconnect()
        client.loop_stop()
