"""The soak's abusers (``splitglm bench soak --abusers``): clients that take more than their share, beside the
honest sessions, each counting what it was refused, by kind.

- ``AbusiveDevice``: a device login that opens a new session every ``period_s`` (a first frame asking for
  ``max_tokens`` positions, never closed) and floods ``burst`` more first frames of new sessions with it, so
  it runs into its fair share (``device_max_sessions``, ``device_max_kv_positions``, frames per second...);
  every StepResult refused is counted by the limit it names.
- ``Impostor``: once a ``period_s``, a CONNECT with the edge's login and client id and a wrong password, then
  one with the abusive device's valid login and the edge's client id: both must be refused.
- ``AbusiveKey``: ``workers`` threads of one API key sending small chat completions back to back (more at once
  than ``max_concurrent_per_key``, faster than ``rate_per_key_per_min``); answers counted by HTTP status and
  error code. A refused worker waits ``backoff_s`` (the abusers share the bench process with the simulated
  honest devices: a spinning loop would measure Python's lock, not the edge).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

LIMIT = re.compile(r"quota reached: (\w+)")


class Counts:
    """Outcomes by kind (thread-safe)."""

    def __init__(self):
        self.counter: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self._lock:
            self.counter[kind] += 1

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counter.items()))


class AbusiveDevice:
    """A device that holds sessions up to and beyond its quota and floods first frames (a thread of its own)."""

    def __init__(self, broker: str, device_id: str, tier: dict, auth, max_tokens: int = 512, period_s: float = 0.5,
                 burst: int = 10):
        import paho.mqtt.client as mqtt
        import torch

        from protos import splitglm_pb2 as pb
        from protos.mqtt import broker_address, resolve_protocol, uses_tls
        from protos.topics import DEFAULT_POOL, frames_topic, steps_topic
        from runtime.segment import SegmentInput

        self.counts, self.pb = Counts(), pb
        protocol = resolve_protocol(broker, "auto", auth)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=auth.client_id, protocol=protocol)
        if uses_tls(broker):
            self.client.tls_set(ca_certs=str(auth.ca_file))
        self.client.username_pw_set(auth.username, auth.password)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(steps_topic(device_id), qos=1)
        self.client.on_message = self._on_step
        self.client.connect(*broker_address(broker), keepalive=60)
        self.client.loop_start()
        if not subscribed.wait(30):
            raise TimeoutError(f"the abusive device could not subscribe at {broker}")
        sid = uuid.uuid4().hex
        with tier["lock"]:
            ids = torch.tensor(tier["prompt"]("Hello."))  # (T,)
            self.hidden = tier["segment"]([SegmentInput(sid, 0, input_ids=ids)])[0]  # (T, C)
            tier["segment"].close_session(sid)
        self.tier, self.max_tokens, self.period, self.burst = tier, max_tokens, period_s, burst
        self.topic, self.reply = frames_topic(DEFAULT_POOL, device_id), steps_topic(device_id)
        self.opened: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, name="abusive-device", daemon=True)
        self._thread.start()

    def _frame(self, sid: str) -> bytes:
        from protos.frames import frame_to_bytes, make_frame

        frame = make_frame(sid, 0, 0, self.hidden, self.tier["codec"],
                           params=self.tier["params"](self.max_tokens, {"temperature": 0}))
        frame.reply_to = self.reply
        return frame_to_bytes(frame)

    def _flood(self) -> None:
        while not self._stop.wait(self.period):
            for _ in range(1 + self.burst):
                sid = uuid.uuid4().hex
                self.opened.append(sid)
                self.client.publish(self.topic, self._frame(sid), qos=0)
                self.counts.add("frames sent")

    def _on_step(self, client, userdata, message) -> None:
        try:
            result = self.pb.StepResult.FromString(message.payload)
        except Exception:  # noqa: BLE001 -- counted, never raised into paho's thread
            self.counts.add("undecodable answer")
            return
        if not result.error:
            self.counts.add("served")
        elif found := LIMIT.search(result.error):
            self.counts.add(found.group(1))
        else:
            self.counts.add(f"status {result.status}")

    def close(self) -> dict[str, int]:
        """Stop, close every session it opened, disconnect; its counts."""
        from protos.frames import frame_to_bytes, make_frame

        self._stop.set()
        self._thread.join()
        for sid in self.opened:
            self.client.publish(self.topic, frame_to_bytes(make_frame(sid, 1, 0, None, close=True)), qos=0)
        time.sleep(0.5)
        self.client.disconnect()
        self.client.loop_stop()
        return self.counts.as_dict()


class Impostor:
    """Reconnects with a wrong password and with a foreign client id, once a ``period_s`` each (a thread)."""

    def __init__(self, broker: str, edge_auth, device_auth, period_s: float = 1.0):
        from protos.mqtt import MqttAuth

        self.broker, self.counts, self.period = broker, Counts(), period_s
        self.attempts = [("mqtt wrong password", MqttAuth(edge_auth.username, "not-the-password",
                                                          edge_auth.ca_file, edge_auth.client_id)),
                         ("mqtt foreign client id", MqttAuth(device_auth.username, device_auth.password,
                                                             device_auth.ca_file, edge_auth.client_id))]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impostor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from protos.mqtt import BrokerRefused, probe_protocol

        while not self._stop.wait(self.period):
            for kind, auth in self.attempts:
                try:
                    probe_protocol(self.broker, 10, auth)
                    self.counts.add(f"{kind}: ACCEPTED")
                except BrokerRefused:
                    self.counts.add(f"{kind}: refused")
                except ConnectionError:
                    self.counts.add(f"{kind}: no answer")

    def close(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(30)
        return self.counts.as_dict()


class AbusiveKey:
    """``workers`` threads of one API key, small chat completions back to back."""

    def __init__(self, url: str, key: str, ca_file: str | None = None, workers: int = 24, max_tokens: int = 4,
                 backoff_s: float = 0.2):
        self.url, self.key, self.max_tokens, self.backoff = url, key, max_tokens, backoff_s
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.counts = Counts()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"abusive-key-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _one(self) -> str:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi."}], "max_tokens": self.max_tokens}).encode()
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", body,
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=120, context=self.context) as response:
                response.read()
                return f"http {response.status}"
        except urllib.error.HTTPError as e:
            try:
                code = json.loads(e.read()).get("error", {}).get("code")
            except ValueError:
                code = None
            return f"http {e.code} {code}" if code else f"http {e.code}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind = self._one()
            except OSError as e:
                kind = f"connection error {type(e).__name__}"
            self.counts.add(kind)
            if kind != "http 200":
                self._stop.wait(self.backoff)

    def close(self) -> dict[str, int]:
        self._stop.set()
        for t in self._threads:
            t.join(150)
        return self.counts.as_dict()


def refusals(counts: dict[str, int]) -> int:
    """How many of ``counts`` were refusals (not served, not sent, not a wrongly accepted login)."""
    good = ("frames sent", "served", "http 200")
    return sum(n for kind, n in counts.items() if kind not in good and "ACCEPTED" not in kind
               and "no answer" not in kind and "connection error" not in kind)
