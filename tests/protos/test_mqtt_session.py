"""protos.mqtt.Subscriptions: a client that loses its session or its subscriptions notices, subscribes again and
counts it, against real brokers (Mosquitto, MQTT v5; the embedded amqtt broker, 3.1.1); a refusing SUBACK."""

from __future__ import annotations

import queue
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from protos.mqtt import V5, V311, Subscriptions, broker_address, connect, new_client, resolve_protocol
from tests.procs import Proc, free_port

TOPICS = ["t/a", "t/b"]


class Watched:
    """A client whose subscriptions a ``Subscriptions`` keeps; its flips of ``subscribed()`` and its messages."""

    def __init__(self, url: str, client_id: str):
        self.protocol = resolve_protocol(url, "auto")
        self.changes: queue.Queue[bool] = queue.Queue()
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.subs = Subscriptions("test", lambda: TOPICS, on_change=self.changes.put)
        self.client = new_client(client_id, self.protocol)
        self.client.on_connect = lambda client, userdata, flags, rc, props=None: self.subs.on_connect(client, flags, rc)
        self.client.on_subscribe = lambda client, userdata, mid, rcs, props=None: self.subs.on_subscribe(mid, rcs)
        self.client.on_disconnect = lambda *a: self.subs.on_disconnect()
        self.client.on_message = lambda client, userdata, message: self.messages.put(message.payload)
        connect(self.client, url, self.protocol)
        assert self.changes.get(timeout=10) is True and self.subs.subscribed()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def plain_client(url: str, protocol: int, client_id: str = "", **options) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **options)
    client.connect(*broker_address(url))
    client.loop_start()
    return client


def publish(url: str, protocol: int, topic: str, payload: bytes) -> None:
    client = plain_client(url, protocol)
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker_url(request, tmp_path):
    if request.param == "mosquitto":
        from tests.procs import Mosquitto

        broker = Mosquitto(tmp_path / "mosquitto")
        yield broker.url
        broker.stop()
    else:
        proc = Proc("broker", [sys.executable, "-m", "splitglm.broker", "--port", str(free_port())])
        yield proc.ready(60)
        proc.stop()


def test_a_client_whose_client_id_is_taken_reconnects_and_subscribes_again(broker_url):
    """Another client connects with our client id (an open broker lets it): the broker drops our connection and
    session; paho reconnects (taking the id back), the subscriptions are made anew, and it is counted."""
    watched = Watched(broker_url, "taken-id")
    protocol = watched.protocol
    # a clean-session CONNECT too: the embedded broker closes the earlier connection (GuardedBroker._take_over)
    thief = plain_client(broker_url, protocol, "taken-id")
    try:
        assert watched.changes.get(timeout=10) is False  # dropped: not subscribed, whatever the socket does next
        assert watched.changes.get(timeout=15) is True  # reconnected (after paho's 1 s backoff) and subscribed
        assert watched.subs.stats == {"reconnects": 1, "resubscribes": 1}
        publish(broker_url, protocol, "t/b", b"after")
        assert watched.messages.get(timeout=10) == b"after"
    finally:
        thief.loop_stop()
        watched.close()


def test_a_broker_restart_that_kept_the_session_is_a_reconnect_only(mosquitto):
    """Mosquitto persists sessions here: after its restart the CONNACK says session present, nothing was lost."""
    watched = Watched(mosquitto.url, "kept-session")
    try:
        mosquitto.restart()
        assert watched.changes.get(timeout=10) is False
        assert watched.changes.get(timeout=20) is True
        assert watched.subs.stats == {"reconnects": 1}
        publish(mosquitto.url, V5, "t/a", b"kept")
        assert watched.messages.get(timeout=10) == b"kept"
    finally:
        watched.close()


class FakeClient:
    """Records SUBSCRIBE calls like paho's client: (result, mid)."""

    def __init__(self):
        self.calls: list[list[tuple[str, int]]] = []

    def subscribe(self, topics):
        self.calls.append(topics)
        return mqtt.MQTT_ERR_SUCCESS, len(self.calls)


def suback(*codes: int) -> list[ReasonCode]:
    return [ReasonCode(PacketTypes.SUBACK, identifier=code) for code in codes]


@pytest.mark.parametrize("protocol", [V5, V311])
def test_a_suback_that_refuses_one_topic_means_not_subscribed(protocol):
    events, changes = [], []
    subs = Subscriptions("test", lambda: TOPICS, on_change=changes.append, on_event=events.append)
    client = FakeClient()
    assert subs.on_connect(client, mqtt.ConnectFlags(session_present=False), ReasonCode(PacketTypes.CONNACK))
    assert client.calls == [[("t/a", 1), ("t/b", 1)]]
    assert not subs.on_subscribe(99, suback(1, 1))  # not our SUBSCRIBE: ignored
    assert subs.on_subscribe(1, suback(1, 0x87 if protocol == V5 else 0x80))
    assert not subs.subscribed() and subs.stats == {"refused": 1} and events == ["refused"] and changes == []
    assert "t/b" in subs.refusal and "t/a" not in subs.refusal
    # the next connection asks again; granted this time, and a session the broker kept is no resubscribe
    assert subs.on_connect(client, mqtt.ConnectFlags(session_present=True), ReasonCode(PacketTypes.CONNACK))
    assert subs.on_subscribe(2, suback(1, 1))
    assert subs.subscribed() and subs.refusal == "" and changes == [True]
    assert events == ["refused", "reconnects"]
    subs.on_disconnect()
    assert not subs.subscribed() and changes == [True, False]
    refused = ReasonCode(PacketTypes.CONNACK, identifier=0x86)
    assert not subs.on_connect(client, mqtt.ConnectFlags(session_present=False), refused)  # nothing subscribed
    assert len(client.calls) == 2 and not subs.subscribed()
