"""The device agent: sensor readings in over MQTT, the device segment run locally, answers out.

Raw readings never leave the device: it renders them into a prompt, runs the
embedding and its layers, and sends only encoded hidden states to an edge
(``EdgeLink``); the tokens come back one round trip per step. One worker
thread takes every queued reading (up to ``window`` at a time), answers them
in one generation and publishes one JSON answer on ``results/{device_id}``;
a failure still publishes an answer, with ``error`` set, so every reading is
covered by exactly one answer. A sensor message that is not a valid reading
(``readings.parse_reading``), or that arrives while ``max_queued_readings``
readings already wait, is refused with a JSON error on the dead-letter topic
``results/{device_id}/errors`` (``readings.dead_letter``); nothing a sensor
sends reaches paho's network thread as an exception.

The sensors and steps subscriptions are made on every connection
(``protos.mqtt.Subscriptions``): a reconnect, a session the broker lost and a
refused subscription are counted (``links.stats``) and logged; the agent is
ready (``ready``, the ready file) only while both are acknowledged. At INFO
the log holds ids, counts, timings and topics, never a reading, prompt or
answer (``log_content`` turns them on); the results carry the prompt only
with ``results_include_prompt``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protos import splitglm_pb2 as pb
from protos.mqtt import MqttAuth, Subscriptions, connect, new_client, wait_for_broker
from protos.topics import client_id, errors_topic, results_topic, sensors_subscription
from runtime import tracing
from runtime.artifacts import load_plan, load_tier
from runtime.checkpoint import load_spec, load_tokenizer
from runtime.cpu_decode import CpuDecode
from runtime.logs import bound
from runtime.owner import Generation
from runtime.report import report

from .link import EdgeLink, LinkClosed
from .metrics import DeviceMetrics
from .readings import Reading, ReadingError, ReadingRate, dead_letter, parse_reading, prompt_token_ids, render_prompt
from .settings import DeviceSettings

logger = logging.getLogger(__name__)
ZERO_TIMINGS = {"ttft": 0.0, "per_token": 0.0, "total": 0.0}
BROKER_WAIT_S = 60.0  # how long a starting agent waits for the broker to come up, seconds
SHUTDOWN_PUBLISH_S = 5.0  # how long a stopping agent waits for its last answers to be acknowledged, seconds


@dataclass
class DeviceTier:
    """A plan's loaded device tier; agents in one process may share one (``lock`` serialises its use)."""

    segment: Any
    tokenizer: Any
    stop_token_ids: list[int]
    codec: str  # the device-edge frame codec of the plan
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, plan: Path | str, cpu_decode: CpuDecode | None = None) -> DeviceTier:
        folder = Path(plan) / "device"
        return cls(load_tier(plan, "device", cpu_decode=cpu_decode), load_tokenizer(folder),
                   list(load_spec(folder).eos_token_ids), load_plan(plan)["codecs"]["device_edge"])


class DeviceAgent:
    def __init__(self, settings: DeviceSettings, tier: DeviceTier | None = None):
        """``tier``: an already loaded device tier of ``settings.plan`` to share (None: load one)."""
        self.settings, self.device_id = settings, settings.device_id
        torch.set_num_threads(settings.threads)
        self.tier = tier or DeviceTier.load(settings.plan, CpuDecode.of(settings))
        self.codec, self.segment, self.tokenizer = self.tier.codec, self.tier.segment, self.tier.tokenizer
        self.stop_token_ids = self.tier.stop_token_ids
        self.window: deque[Reading] = deque(maxlen=settings.window)
        self.inbox: queue.SimpleQueue[Reading | None] = queue.SimpleQueue()
        self.rate = ReadingRate(settings.max_readings_per_s)  # a flood is dropped unread (rate.dropped)
        self.results_topic = results_topic(self.device_id)
        self.errors_topic = errors_topic(self.device_id)
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._last_publish: Any = None  # MQTTMessageInfo of the latest answer
        self._was_ready = False
        self._worker = threading.Thread(target=self._work, name=f"device-{self.device_id}", daemon=True)
        self.metrics = DeviceMetrics()  # counted always; served on metrics_port when set (``start``)

        self.auth = MqttAuth.from_settings(settings, client_id("device", self.device_id))  # bound to the login
        self.protocol = wait_for_broker(settings.broker, settings.mqtt_protocol, BROKER_WAIT_S, self.auth)
        self.client = new_client(self.auth.client_id, self.protocol)
        self.link = EdgeLink(
            self.client, self.protocol, self.device_id, settings.pool, settings.step_timeout_s, settings.max_attempts
        )
        self.links = Subscriptions(f"device {self.device_id}",
                                   lambda: [self.link.reply_to, sensors_subscription(self.device_id)],
                                   on_change=self._on_subscribed)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.message_callback_add(sensors_subscription(self.device_id), self._on_reading)
        self.metrics.watch(self)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> DeviceAgent:
        """Serve the metrics (when ``metrics_port`` is set: OSError if it cannot), take readings, connect."""
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        self._worker.start()
        connect(self.client, self.settings.broker, self.protocol, self.auth)
        return self

    def stop(self) -> None:
        """Abandon the current generation, answer the queued readings with an error, disconnect."""
        self._stopping.set()
        self.link.shutdown()
        self.inbox.put(None)
        if self._worker.is_alive():
            self._worker.join()
        if late := self._drain_inbox():  # queued after the worker took its last batch
            self._publish({**self._request(late, ""), **failed("the device agent stopped before answering")})
        if self._last_publish is not None:
            try:
                self._last_publish.wait_for_publish(SHUTDOWN_PUBLISH_S)
            except (RuntimeError, ValueError) as e:
                logger.warning("the last answer may not have reached the broker: %r", e)
        self.client.disconnect()
        self.client.loop_stop()
        if self.settings.ready_file is not None:
            self.settings.ready_file.unlink(missing_ok=True)
        self.metrics.stop()

    # ---- MQTT callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if not self.links.on_connect(client, flags, reason_code):  # subscribes the steps and sensors topics
            logger.error("the broker %s refused the connection: %s", self.settings.broker, reason_code)
            return
        self.link.connected()
        logger.info("connected to %s (MQTT %s)", self.settings.broker, "5" if self.link.v5 else "3.1.1")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.links.on_disconnect()
        self.link.on_disconnect(client, userdata, flags, reason_code, properties)
        if not self._stopping.is_set():
            logger.warning("disconnected from %s (%s); reconnecting", self.settings.broker, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        self.links.on_subscribe(mid, reason_codes)

    def _on_subscribed(self, subscribed: bool) -> None:
        """Ready (the event, the ready file) exactly while the broker holds both subscriptions."""
        ready_file = self.settings.ready_file
        if not subscribed:
            self.ready.clear()
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)
            return
        self.ready.set()
        if ready_file is not None:
            ready_file.touch()
        if self._was_ready:
            logger.info("subscribed again: device/%s", self.device_id)
        else:
            self._was_ready = True
            logger.info("ready: device/%s", self.device_id)

    def _on_reading(self, client, userdata, message) -> None:
        if message.retain:  # replayed at subscribe time: stale, or answered in an earlier run
            logger.info("skipping a retained reading on %s", message.topic)
            return
        try:
            self.take(message.topic, message.payload)
        except Exception:  # noqa: BLE001 -- paho's network thread must survive anything a sensor sends
            logger.exception("dropping a sensor message on %s", message.topic)

    def take(self, topic: str, payload: bytes) -> Reading | None:
        """Validate one sensor message and queue it for an answer; a refused one gets a dead letter (None)."""
        if not self.rate.admit():  # over max_readings_per_s: dropped, a dead letter at most once a second
            self.metrics.reading("rate_limited")
            if notice := self.rate.notice():
                self._refuse(topic, payload, notice)
            return None
        try:
            reading = parse_reading(topic, payload, self.device_id, self.settings.max_reading_bytes)
        except ReadingError as e:
            self.metrics.reading("invalid")
            self._refuse(topic, payload, str(e))
            return None
        if self._stopping.is_set():  # too late for a generation, but it is ours now: answer it
            self._publish({**self._request([reading], ""), **failed("the device agent is stopping")})
            return reading
        if self.inbox.qsize() >= self.settings.max_queued_readings:
            self.metrics.reading("queue_full")
            self._refuse(topic, payload, f"{self.settings.max_queued_readings} readings already wait for an "
                         "answer (max_queued_readings)")
            return None
        if self.settings.log_content:
            logger.info("reading %s", reading.line())
        else:
            logger.info("reading on %s queued", topic)
        self.metrics.reading("queued")
        self.inbox.put(reading)
        return reading

    def _refuse(self, topic: str, payload: bytes, error: str) -> None:
        """Publish a refused sensor message's error on the dead-letter topic."""
        logger.warning("refusing a sensor message on %s: %s", topic, error)
        letter = dead_letter(self.device_id, topic, payload, error)
        self.client.publish(self.errors_topic, json.dumps(letter), qos=1)

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                answer = self.answer(batch)
            except Exception as e:  # noqa: BLE001 -- a bug must still answer the readings, and not kill the worker
                logger.exception("answering %d reading(s) failed", len(batch))
                answer = {**self._request(batch, ""), **failed(f"internal error: {e!r}")}
            self._publish(answer)
            self.metrics.answer_latency_seconds.observe(time.monotonic() - batch[0].received)

    def _next_batch(self) -> list[Reading] | None:
        """Block for a reading, then take whatever else is queued, up to ``window`` readings (None: stop)."""
        first = self.inbox.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.settings.window:
            try:
                reading = self.inbox.get_nowait()
            except queue.Empty:
                break
            if reading is None:
                self.inbox.put(None)  # stop after this batch
                break
            batch.append(reading)
        return batch

    def _drain_inbox(self) -> list[Reading]:
        readings = []
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return readings
            if item is not None:
                readings.append(item)

    def answer(self, batch: list[Reading]) -> dict[str, Any]:
        """Generate the answer that covers ``batch`` (added to the window first)."""
        self.window.extend(batch)
        prompt = render_prompt(self.settings.prompt_template, self.device_id, list(self.window))
        request = self._request(batch, prompt)
        with bound(request_id=request["request_id"], session_id=request["request_id"]):  # (one id: the session's)
            return self._generate(request, prompt, len(batch))

    def _generate(self, request: dict[str, Any], prompt: str, readings: int) -> dict[str, Any]:
        """The answer of ``request``: its generation's summary, or the error that ended it."""
        if self._stopping.is_set():
            return {**request, **failed("the device agent stopped before answering")}
        generation = self._generation(request["request_id"], prompt)
        logger.info("generating for %d reading(s) (session %s)", readings, generation.session_id)
        if self.settings.log_content:
            logger.info("prompt of session %s: %r", generation.session_id, prompt)
        traced = tracing.span("device.answer", request_id=request["request_id"], session_id=generation.session_id,
                              readings=readings) if tracing.enabled else tracing.NOOP  # the reading's trace root
        try:
            with traced:
                for _ in generation:
                    pass
        except LinkClosed:
            return {**request, **failed("the device agent stopped while answering", generation)}
        except Exception as e:  # noqa: BLE001 -- StepFailed, LinkError, a bad frame: all end in an error answer
            logger.error("generation %s failed: %s", generation.session_id, e)
            return {**request, **failed(str(e) or repr(e), generation)}
        return {**request, **summary(generation)}

    def _request(self, batch: list[Reading], prompt: str) -> dict[str, Any]:
        """The answer's fields about its request: the prompt only where the device asks for it."""
        request = {"device_id": self.device_id, "request_id": uuid.uuid4().hex,
                   "readings": [r.as_json() for r in batch]}
        if self.settings.results_include_prompt:
            request["prompt"] = prompt
        return request

    def _generation(self, request_id: str, prompt: str) -> Generation:
        s = self.settings
        params = pb.GenerationParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop_token_ids=self.stop_token_ids,
            policy=s.policy,
            latency_budget_ms=s.latency_budget_ms,
            speculate={"default": pb.SPECULATE_DEFAULT, "on": pb.SPECULATE_ON, "off": pb.SPECULATE_OFF}[s.speculate],
        )
        deadline = int(time.time() * 1e3) + s.latency_budget_ms if s.latency_budget_ms else 0
        return Generation(
            self.segment,
            self.link,
            prompt_token_ids(self.tokenizer, prompt, s.system_prompt),
            params,
            self.codec,
            self.tokenizer,
            session_id=request_id,
            deadline_unix_ms=deadline,
            lock=self.tier.lock,
        )

    def _publish(self, answer: dict[str, Any]) -> None:
        self._last_publish = self.client.publish(self.results_topic, json.dumps(answer), qos=1)
        self.metrics.answered(bool(answer["error"]), answer["tokens"])
        if answer["error"]:
            logger.warning("answer %s for %d reading(s): error %s", answer["request_id"], len(answer["readings"]),
                           answer["error"])
        else:
            logger.info("answer %s for %d reading(s): %d tokens, path %s, %.0f ms%s", answer["request_id"],
                        len(answer["readings"]), answer["tokens"], answer["path"], answer["timings_ms"]["total"],
                        f": {answer['text']!r}" if self.settings.log_content else "")


def summary(generation: Generation | None) -> dict[str, Any]:
    """The answer fields a (finished or interrupted) generation gives; None: no generation ran."""
    if generation is None:
        return {"text": "", "tokens": 0, "finish_reason": None, "path": None, "paths": [], "switches": [],
                "predicted_ms": None, "actual_ms": 0.0, "timings_ms": dict(ZERO_TIMINGS), "stages_ms": {},
                "budget_met": None, "frame_bytes": 0, "degraded": False, "policy": None,
                "speculative": {"drafted": 0, "accepted": 0, "round_trips": 0}, "error": None}
    return {
        "text": generation.text,
        "tokens": len(generation.tokens),
        "finish_reason": generation.finish_reason or None,
        **report(generation, generation.params.latency_budget_ms or None),
        "frame_bytes": generation.frame_bytes,
        "error": None,
    }


def failed(message: str, generation: Generation | None = None) -> dict[str, Any]:
    """The answer fields of a request that failed, with what a partial generation got done."""
    return {**summary(generation), "finish_reason": "error", "error": message}
