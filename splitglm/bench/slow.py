"""Slow consumers against the other sessions' per-token latency.

Two stallers, both real clients of a running topology (``splitglm.system.LocalSystem``):

- **HTTP**: a long streamed chat completion over a socket with a small receive buffer that is never read.
  (On loopback the kernel buffers megabytes for it, more than any answer, so its generation runs on; where
  the buffers do fill, the edge drops the client after ``stream_send_timeout_s``: ``edge_node.streaming``.)
- **MQTT**: a device that opens a session, then keeps republishing its first frame (each copy answered
  again by the edge, from the stored answer) and never reads its steps topic.

Victims (HTTP streams and devices simulated in this process, ``splitglm.bench.soak``) each run one
request, all at once, in rounds alternating between two conditions with the same load: the two clients
above reading their answers (the baseline), and not reading them (stalled). The report gives each round's
p99 of the gaps between the victims' tokens, the ratio of the two medians and whether it is within 1.5x.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from .stats import median, percentile, ratio

RCVBUF = 4096  # the stallers' socket receive buffers, bytes
QUIET_WAIT_S = 180.0  # longest wait for the edge to finish the last round's generations, seconds
UNDER_WAY_S = 60.0  # longest wait for both stallers to get under way, seconds
WARMUP_TOKENS = 8  # each victim's request in the warm-up round (first-request costs, not gaps), tokens
STRICT_RATIO = 1.5


class HttpStaller:
    """A long streamed chat completion whose answer is never read (``read``: read and dropped, the baseline)."""

    def __init__(self, url: str, prompt: str, max_tokens: int, key: str | None = None, ca_file: str | None = None,
                 read: bool = False):
        parts = urlsplit(url)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        raw.connect((parts.hostname, parts.port))
        if parts.scheme == "https":
            self.sock = ssl.create_default_context(cafile=ca_file).wrap_socket(raw, server_hostname=parts.hostname)
        else:
            self.sock = raw
        body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                           "stream": True, "temperature": 0}).encode()
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{auth}Connection: close\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        self.received = 0  # bytes read (with ``read``)
        self._reader = threading.Thread(target=self._read, name="http-reader", daemon=True) if read else None
        if self._reader is not None:
            self._reader.start()

    def answering(self) -> bool:
        """Whether the edge has begun to answer (bytes read, or waiting unread in the socket)."""
        return self.received > 0 or bool(select.select([self.sock], [], [], 0)[0])

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                self.received += len(chunk)
        except OSError:  # closed by close()
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._reader is not None:
            self._reader.join(10)


class MqttStaller:
    """A device that never reads its steps topic, republishing its session's first frame ``rate_hz`` times a
    second (QoS 0) from a thread of its own; paho's loop is driven by hand and never reads (``read``: it
    does, the baseline)."""

    def __init__(self, broker: str, device_id: str, tier: dict, prompt: str = "Hello.", auth=None,
                 rate_hz: float = 10.0, read: bool = False):
        import torch

        from protos.frames import frame_to_bytes, make_frame
        from protos.mqtt import V5, broker_address, resolve_protocol, uses_tls
        from protos.topics import DEFAULT_POOL, frames_topic, steps_topic
        from runtime.segment import SegmentInput

        protocol = resolve_protocol(broker, "auto", auth)
        own = auth.client_id if auth and auth.client_id else f"staller-{uuid.uuid4().hex[:8]}"  # a login's bound id
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=own, protocol=protocol)
        if uses_tls(broker):
            self.client.tls_set(ca_certs=str(auth.ca_file) if auth and auth.ca_file else None)
        if auth and auth.username:
            self.client.username_pw_set(auth.username, auth.password or None)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect(*broker_address(broker), keepalive=300)
        self.client.subscribe(steps_topic(device_id), qos=1)
        deadline = time.monotonic() + 30
        while not ready.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the MQTT staller could not subscribe at {broker}")
            self.client.loop(0.1)
        self.client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sid = uuid.uuid4().hex
        with tier["lock"]:
            ids = torch.tensor(tier["prompt"](prompt))  # (T,)
            hidden = tier["segment"]([SegmentInput(sid, 0, input_ids=ids)])[0]  # (T, C)
            tier["segment"].close_session(sid)
        frame = make_frame(sid, 0, 0, hidden, tier["codec"], params=tier["params"](256, {"temperature": 0}))
        frame.reply_to = steps_topic(device_id)
        self.topic, self.payload = frames_topic(DEFAULT_POOL, device_id), frame_to_bytes(frame)
        self.close_payload = frame_to_bytes(make_frame(sid, 1, 0, None, close=True))
        self.v5, self.period, self.read = protocol == V5, 1.0 / rate_hz, read
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, name="mqtt-staller", daemon=True)
        self._thread.start()

    def _flood(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= due:
                self.client.publish(self.topic, self.payload, qos=0)
                self.published += 1
                due += self.period
            wait = max(0.0, due - time.monotonic())
            if self.read:
                self.client.loop(wait)  # reads the answers, writes, pings
            else:
                self.client.loop_write()
                self._stop.wait(wait)

    def close(self) -> None:
        """Stop republishing, close the session at the edge, disconnect."""
        self._stop.set()
        self._thread.join()
        self.client.publish(self.topic, self.close_payload, qos=0)
        self.client.disconnect()
        self.client.loop_write()


class EdgeTokens:
    """The edge's generated-token count, from its /metrics."""

    def __init__(self, url: str, key: str | None = None, ca_file: str | None = None):
        self.url, self.key = f"{url}/metrics", key
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def read(self) -> float:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=30,
                                    context=self.context) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("splitglm_edge_tokens_total{"))

    def wait_still(self, quiet_s: float = 2.0, timeout_s: float = QUIET_WAIT_S) -> None:
        """Wait until the edge generates no token for ``quiet_s`` (the last round's clients are gone)."""
        deadline = time.monotonic() + timeout_s
        last, since = self.read(), time.monotonic()
        while time.monotonic() - since < quiet_s:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the edge kept generating for {timeout_s:g} s")
            time.sleep(0.5)
            now = self.read()
            if now != last:
                last, since = now, time.monotonic()


@contextmanager
def stallers(http_url: str, broker: str, tier: dict, prompt: str, staller_tokens: int, read: bool,
             key: str | None = None, ca_file: str | None = None, device_id: str = "staller", auth=None):
    """Both clients, reading their answers or not; yields facts about them (filled in on exit)."""
    http = HttpStaller(http_url, prompt, staller_tokens, key, ca_file, read)
    device = None
    facts = {"read": read}
    try:
        device = MqttStaller(broker, device_id, tier, auth=auth, read=read)
        deadline = time.monotonic() + UNDER_WAY_S
        while not (http.answering() and device.published >= 2):  # both under way: the long answer streaming,
            if time.monotonic() > deadline:  # the device republishing
                raise TimeoutError(f"the stallers were not under way after {UNDER_WAY_S:g} s")
            time.sleep(0.05)
        yield facts
        facts["mqtt_frames"] = device.published
        facts["http_bytes_read"] = http.received
    finally:
        http.close()
        if device is not None:
            device.close()


def victims_round(sessions: list, texts: list[str], max_tokens: int) -> list[float]:
    """One greedy request on every session at once; the gaps between tokens of all of them, ms."""
    gaps: list[list[float]] = [[] for _ in sessions]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            _, stamps = sessions[i].run(texts[i % len(texts)], max_tokens, {"temperature": 0.0})
            gaps[i] = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
        except Exception as e:  # noqa: BLE001 -- re-raised below, in this thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"victim-{i}") for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a victim's request failed: {errors[0]!r}") from errors[0]
    return [g for session_gaps in gaps for g in session_gaps]


def slow_consumers(sessions: list, texts: list[str], http_url: str, broker: str, tier: dict, repeats: int = 3,
                   max_tokens: int = 48, staller_tokens: int = 1500, key: str | None = None,
                   ca_file: str | None = None, staller_device: str = "staller", staller_auth=None) -> dict:
    """The victims' per-token p99 with the two clients reading and not reading, ``repeats`` rounds of each,
    alternating (the edge quiet before each round)."""
    edge = EdgeTokens(http_url, key, ca_file)
    p99s: dict[bool, list[float]] = {False: [], True: []}
    facts: list[dict] = []
    victims_round(sessions, texts, min(max_tokens, WARMUP_TOKENS))  # warm-up
    for r in range(repeats):
        for stalled in (False, True) if r % 2 == 0 else (True, False):
            edge.wait_still()
            with stallers(http_url, broker, tier, texts[0], staller_tokens, not stalled, key, ca_file,
                          staller_device, staller_auth) as fact:
                gaps = victims_round(sessions, texts, max_tokens)
            facts.append(fact)
            p99s[stalled].append(round(percentile(gaps, 0.99), 2))
    p99_ratio = ratio(median(p99s[True]), median(p99s[False]), 3)
    return {"victims": len(sessions), "repeats": repeats, "max_tokens": max_tokens,
            "baseline_p99_ms": p99s[False], "stalled_p99_ms": p99s[True],
            "p99_ratio": p99_ratio, f"within_{STRICT_RATIO:g}x": p99_ratio is not None and p99_ratio <= STRICT_RATIO,
            "rounds": facts}
