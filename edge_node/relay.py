"""MQTT frames from device agents -> the edge's layers [k1, k2) -> the cloud tail -> StepResult back over MQTT.

A device agent owns its session: it sends the hidden states of layer k1 as
Frame bytes (QoS 1) to the edge pool (seq 0, shared subscription) or to this
edge's own topic (later seqs, named by ``StepResult.edge_id``), and waits for
the StepResult on its steps topic. The frames topic ends in the device's id,
which the broker's ACL ties to the device's login: the edge answers only on
that device's steps topic (a v5 ``ResponseTopic`` or ``Frame.reply_to`` naming
any other topic is refused), and a session belongs to the device that opened
it (another device's frames and close frames for it are refused). Each refusal
is counted (``splitglm_edge_mqtt_refused_total``). Per session the relay keeps the cloud tail, the next
expected seq and the last answer, so a duplicate delivery is answered again
without a second step. Messages are served off paho's network thread by a
pool of workers, the frames of one session in order; the frames of
concurrent sessions share forward passes of [k1, k2) (the runtime's
``Scheduler``, prompts in chunks). A bad frame, an unknown session or a
cloud failure is answered with an error StepResult carrying its gRPC status
(``runtime.terminal.status_of``; a session whose first frame fails is not kept); nothing here raises into paho or
touches another session.

Each device gets a fair share (``edge_node.shares``): sessions and the KV
positions they reserve (prompt + ``max_tokens``, taken at seq 0 and given back
when ``_free`` forgets the session, however it ends), frames (and bytes)
queued, and frames a second; past it the frame is answered RESOURCE_EXHAUSTED
naming the limit, and the other devices go on.

A frame larger than ``frame_limit`` (the plan's largest legal frame, or
``max_frame_bytes`` if smaller) is refused by its length before it is parsed.
The subscriptions are made on every connection (``protos.mqtt.Subscriptions``):
a reconnect, a session the broker lost (another client took our client id, a
broker restart) and a refused subscription are counted and logged, and
``subscribed()`` -- /healthz's ``broker`` -- holds only while every one is
acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from protos import splitglm_pb2 as pb
from protos import topics
from protos.errors import CodecError
from protos.frames import decode_frame_hidden, make_frame, parse_frame
from protos.mqtt import (
    V5,
    MqttAuth,
    Subscriptions,
    connect,
    new_client,
    publish_properties,
    user_property,
    wait_for_broker,
)
from protos.status import STATUS_NAMES, error_result
from runtime import tracing
from runtime.ledger import Ledger, StepError
from runtime.ledger import idle as ledger_idle
from runtime.logs import bound
from runtime.scheduler import Scheduler
from runtime.step import SegmentInput
from runtime.terminal import status_of

from .metrics import path_name
from .shares import FrameRates, QuotaExceeded, queue_shares, session_shares

logger = logging.getLogger(__name__)
FRAME_METADATA_BYTES = 64 << 10  # a frame's all but its tensor values: ids, reply topic, params, shape, scales


def frame_limit(hidden_size: int, max_frame_positions: int, max_frame_bytes: int) -> int:
    """The largest frame the edge takes, bytes: ``max_frame_positions`` rows of fp32 hidden states (the widest
    encoding a plan uses) and the metadata beside them, or ``max_frame_bytes`` if smaller."""
    return min(max_frame_bytes, max_frame_positions * hidden_size * 4 + FRAME_METADATA_BYTES)


@dataclass
class Incoming:
    """A received frame and where its answer goes."""

    frame: pb.Frame
    reply_topic: str  # the sending device's steps topic
    correlation: bytes
    device: str = ""  # the sending device, from the frames topic
    received: float = field(default_factory=time.perf_counter)
    traceparent: str = ""  # (tracing on) the sender's trace context: the v5 user property, else the frame's


@dataclass
class RelaySession:
    """What the edge keeps of one device session between its frames."""

    tail: object  # a runtime.owner.Downstream (the cloud stream of this session)
    device: str  # the device that opened it: the only one whose frames it takes
    ledger: Ledger = field(default_factory=Ledger)  # seq order and the answer to a duplicate delivery
    traceparent: str = ""  # (tracing on) its first frame's trace context: its later frames' over MQTT 3.1.1


class SerialLanes:
    """Runs tasks on a thread pool; the tasks of one key (a session id, bound for their log lines) run in order,
    one at a time, at most ``depth`` waiting."""

    def __init__(self, workers: int, depth: int = 64):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="relay")
        self._lanes: dict[str, deque[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self.depth = depth

    def submit(self, key: str, task: Callable[[], None]) -> bool:
        """Queue ``task`` on its key's lane; False (nothing queued) when ``depth`` tasks already wait there."""
        with self._lock:
            lane = self._lanes.get(key)
            if lane is not None:
                if len(lane) >= self.depth:
                    return False
                lane.append(task)
                return True
            self._lanes[key] = deque([task])
        self._pool.submit(self._drain, key)
        return True

    def busy(self, key: str) -> bool:
        with self._lock:
            return key in self._lanes

    def _drain(self, key: str) -> None:
        while True:
            with self._lock:
                lane = self._lanes[key]
                if not lane:
                    del self._lanes[key]
                    return
                task = lane.popleft()
            try:
                with bound(session_id=key):  # a lane is one session's: its id on the task's log lines
                    task()
            except Exception:  # noqa: BLE001 -- one task's bug must not stop its lane
                logger.exception("relay task for session %s failed", key)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class FrameRelay:
    """Serves device frames that arrive over MQTT with the edge segment [k1, k2) and a cloud tail per session."""

    def __init__(self, settings, segment, lock: threading.Lock, codec: str, new_tail: Callable[[], object], metrics):
        self.settings, self.segment, self.lock, self.codec = settings, segment, lock, codec
        self.new_tail, self.metrics = new_tail, metrics
        self.edge_id = settings.edge_id
        self.hidden_size = segment.spec.hidden_size
        self.sessions: dict[str, RelaySession] = {}
        self._in_flight: set[tuple[str, int]] = set()  # (session, seq) queued or running
        self._lock = threading.Lock()  # guards sessions and _in_flight
        self._lanes = SerialLanes(settings.relay_workers, settings.relay_queue)
        # fair shares per device (edge_node.shares): sessions + reserved KV positions, queued frames + bytes, rate
        self.shares = session_shares("device", settings, metrics)
        self.queued = queue_shares(settings, metrics)
        self.frame_rates = FrameRates(settings, metrics)
        # concurrent sessions' frames share forward passes of [k1, k2); prompts run in chunks
        self.scheduler = Scheduler(segment, max_batch=settings.relay_max_batch, lock=lock, name="relay-scheduler",
                                   on_step=lambda step: metrics.relay_batch_size.observe(step.sessions))
        self.frame_limit = frame_limit(self.hidden_size, settings.max_frame_positions, settings.max_frame_bytes)
        self._stopping = threading.Event()
        # every subscription renewed on each connection; /healthz's "broker" is whether all of them hold now
        self.links = Subscriptions(f"edge {self.edge_id}", self.subscriptions, on_event=metrics.mqtt_session)
        self.protocol: int | None = None
        self.client = None
        self._janitor = threading.Thread(target=self._expire_idle, name="relay-janitor", daemon=True)

    # ---- MQTT ----------------------------------------------------------------------------------

    def start(self, timeout_s: float) -> None:
        """Connect, subscribe and wait (at most ``timeout_s``) until the subscriptions are made."""
        self.scheduler.start()
        self.protocol = wait_for_broker(self.settings.broker, self.settings.mqtt_protocol, timeout_s,
                                        self._auth())
        self.client = new_client(topics.client_id("edge", self.edge_id), self.protocol)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        connect(self.client, self.settings.broker, self.protocol, self._auth())
        if not self.links.wait(timeout_s):
            self.stop()
            why = f": {self.links.refusal}" if self.links.refusal else ""
            raise TimeoutError(f"no MQTT subscriptions at {self.settings.broker} within {timeout_s:g} s{why}")
        self._janitor.start()

    def _auth(self) -> MqttAuth:
        """This edge's login, bound to its client id ``splitglm-edge-{edge_id}``."""
        return MqttAuth.from_settings(self.settings, topics.client_id("edge", self.edge_id))

    def subscriptions(self) -> list[str]:
        """The pool topic (shared on v5) and this edge's own frames topic."""
        s = self.settings
        if self.protocol == V5:
            pool = topics.pool_subscription(s.pool, s.share_group)
        else:
            pool = topics.frames_subscription(s.pool)
        return [pool, topics.frames_subscription(self.edge_id)]

    def subscribed(self) -> bool:
        """Connected, and the broker acknowledged every subscription the relay needs."""
        return self.links.subscribed()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if not self.links.on_connect(client, flags, reason_code):
            logger.warning("MQTT broker %s refused the connection: %s", self.settings.broker, reason_code)
            return
        if self.protocol != V5:
            logger.warning(
                "MQTT 3.1.1 broker: every edge of pool %r gets each new session (load splitting "
                "needs shared subscriptions, i.e. an MQTT v5 broker)",
                self.settings.pool,
            )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if self.links.on_subscribe(mid, reason_codes) and self.links.subscribed():
            logger.info("subscribed to %s", ", ".join(self.subscriptions()))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.links.on_disconnect()
        if not self._stopping.is_set():
            logger.warning("MQTT connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message):
        """Parse the frame on paho's thread; queue it on its session's lane (never raises)."""
        try:
            self._accept(message)
        except Exception:  # noqa: BLE001 -- paho's network thread must survive anything
            logger.exception("dropping an MQTT message on %s", message.topic)

    def _accept(self, message) -> None:
        try:
            device = topics.frame_sender(message.topic)
        except ValueError as e:
            self.metrics.mqtt_refused("topic")
            logger.warning("dropping a message: %s", e)
            return
        if message.retain:  # replayed by the broker at subscribe time: an old frame, never a new step
            self.metrics.mqtt_refused("retained")
            logger.warning("dropping a retained frame on %s", message.topic)
            return
        props = getattr(message, "properties", None)
        asked = getattr(props, "ResponseTopic", "") if props is not None else ""
        correlation = bytes(getattr(props, "CorrelationData", b"")) if props is not None else b""
        own = topics.steps_topic(device)  # the only topic this edge answers the device on
        self.metrics.add_wire_bytes("device_edge", "in", len(message.payload))
        if len(message.payload) > self.frame_limit:  # before any parsing: the bytes are all it costs
            self._too_large(Incoming(pb.Frame(), own, correlation, device), len(message.payload))
            return
        try:
            frame = parse_frame(message.payload, self.settings.max_frame_bytes)
        except CodecError as e:
            self._publish(Incoming(pb.Frame(), own, correlation, device), error_result("", 0, *status_of(e)))
            return
        incoming = Incoming(frame, own, correlation or topics.correlation(frame.session_id, frame.seq), device)
        if tracing.enabled:
            incoming.traceparent = user_property(message, tracing.TRACEPARENT) or frame.traceparent
        try:
            self.frame_rates.take(device)
        except QuotaExceeded as e:
            if not frame.close:  # (a close frame gets no answer)
                self._publish(incoming, self._over_quota(frame, e))
            return
        if frame.close:
            self._lanes.submit(frame.session_id, lambda: self._close(incoming))
            return
        for topic in (asked, frame.reply_to):
            if topic and topic != own:
                self.metrics.mqtt_refused("reply_to")
                logger.warning("refusing frame %s:%d of device %s: reply topic %r is not its own",
                               frame.session_id, frame.seq, device, topic[:200])
                message = f"edge {self.edge_id}: the reply topic must be {own} (the sending device's own)"
                self._publish(incoming, error_result(frame.session_id, frame.seq, "PERMISSION_DENIED", message))
                return
        key = (frame.session_id, frame.seq)
        with self._lock:
            if key in self._in_flight:
                logger.debug("ignoring a duplicate of frame %s:%d still in progress", *key)
                return
            self._in_flight.add(key)
        try:
            self.queued.acquire(device, key, len(message.payload))  # given back once served (_serve)
        except QuotaExceeded as e:
            with self._lock:
                self._in_flight.discard(key)
            self._publish(incoming, self._over_quota(frame, e))
            return
        serve = self._serve_traced if tracing.enabled else self._serve
        if not self._lanes.submit(frame.session_id, lambda: serve(incoming)):
            self.queued.release(key)
            with self._lock:
                self._in_flight.discard(key)
            message = (f"edge {self.edge_id}: session {frame.session_id!r} already has "
                       f"{self.settings.relay_queue} frames waiting (relay_queue)")
            self._publish(incoming, error_result(frame.session_id, frame.seq, "RESOURCE_EXHAUSTED", message))

    def _over_quota(self, frame: pb.Frame, refusal: QuotaExceeded) -> pb.StepResult:
        """The answer to a frame of a device at its fair share: RESOURCE_EXHAUSTED naming the limit."""
        logger.info("frame %s:%d refused: %s", frame.session_id, frame.seq, refusal)
        return error_result(frame.session_id, frame.seq, refusal.status, f"edge {self.edge_id}: {refusal}")

    def _too_large(self, incoming: Incoming, size: int) -> None:
        """Refuse a frame over ``frame_limit`` unread: RESOURCE_EXHAUSTED naming the limit, on its steps topic."""
        self.metrics.mqtt_refused("too_large")
        s = self.settings
        message = (f"edge {self.edge_id}: a frame of {size} bytes exceeds the limit of {self.frame_limit} bytes "
                   f"(max_frame_positions {s.max_frame_positions} x hidden {self.hidden_size} x 4 bytes + "
                   f"{FRAME_METADATA_BYTES} bytes of metadata, at most max_frame_bytes {s.max_frame_bytes})")
        logger.warning("refusing a frame of device %s: %d bytes > the limit of %d", incoming.device, size,
                       self.frame_limit)
        self._publish(incoming, error_result("", 0, "RESOURCE_EXHAUSTED", message))

    def _close(self, incoming: Incoming) -> None:
        """A close frame, on the session's lane: only the device that opened the session may close it."""
        sid = incoming.frame.session_id
        with self._lock:
            state = self.sessions.get(sid)
        if state is not None and state.device != incoming.device:
            self.metrics.mqtt_refused("foreign_close")
            logger.warning("device %s may not close session %s of device %s", incoming.device, sid, state.device)
            return
        self._free(sid, "closed by its owner", incoming.frame)

    def _publish(self, incoming: Incoming, result: pb.StepResult) -> None:
        """Publish the answer (QoS 1) to the frame's reply topic, with v5 correlation + edge id properties."""
        if not incoming.reply_topic:
            logger.warning(
                "cannot answer frame %s:%d (%s): no reply topic",
                incoming.frame.session_id,
                incoming.frame.seq,
                result.error or "ok",
            )
            return
        result.edge_id = self.edge_id
        payload = result.SerializeToString(deterministic=True)
        props = None
        if self.protocol == V5:
            props = publish_properties("", incoming.correlation, {topics.EDGE_ID_PROPERTY: self.edge_id})
        self.client.publish(incoming.reply_topic, payload, qos=1, properties=props)
        self.metrics.add_wire_bytes("device_edge", "out", len(payload))
        self.metrics.device_frame(STATUS_NAMES.get(result.status, "UNKNOWN") if result.error else "OK")

    # ---- sessions --------------------------------------------------------------------------------

    def _serve_traced(self, incoming: Incoming) -> None:
        """``_serve`` in a span that continues the device's trace (the frame's context, else its session's)."""
        frame, carrier = incoming.frame, incoming.traceparent
        if not carrier:
            with self._lock:
                state = self.sessions.get(frame.session_id)
            carrier = state.traceparent if state is not None else ""
        with tracing.span("relay.frame", tracing.context_of(carrier), device_id=incoming.device,
                          session_id=frame.session_id, seq=frame.seq, start_pos=frame.start_pos):
            self._serve(incoming)

    def _serve(self, incoming: Incoming) -> None:
        """Answer one frame on its session's lane."""
        frame = incoming.frame
        try:
            result = self._step(incoming)
        except Exception as e:  # noqa: BLE001 -- a refusal or a bug answers this frame, other sessions go on
            status, message = status_of(e, closed=f"edge {self.edge_id} is shutting down",
                                        failed=f"edge {self.edge_id}: step failed", log="the edge's log")
            logger.info("frame %s:%d refused: %s %s", frame.session_id, frame.seq, status, message)
            result = error_result(frame.session_id, frame.seq, status, message)
        finally:
            self.queued.release((frame.session_id, frame.seq))  # before a duplicate may be queued again
            with self._lock:
                self._in_flight.discard((frame.session_id, frame.seq))
        self._publish(incoming, result)

    def _step(self, incoming: Incoming) -> pb.StepResult:
        """Check the frame against its session, run [k1, k2), step the cloud; the answer (maybe stored)."""
        frame = incoming.frame
        sid = frame.session_id
        if not sid or len(sid) > 128:
            raise StepError("INVALID_ARGUMENT", "session_id must be 1-128 characters")
        with self._lock:
            state = self.sessions.get(sid)
        if state is not None and state.device != incoming.device:
            self.metrics.mqtt_refused("foreign_session")
            message = f"edge {self.edge_id}: session {sid!r} belongs to another device"
            raise StepError("PERMISSION_DENIED", message)
        if state is None and frame.seq != 0:
            raise StepError(
                "NOT_FOUND",
                f"edge {self.edge_id}: unknown session {sid!r} (a session starts at seq 0, on the pool topic)",
            )
        if state is not None:
            stored = state.ledger.repeat(sid, frame.seq)  # a duplicate delivery: the same answer, no second step
            if stored is not None:
                return stored
        t0 = time.perf_counter()
        hidden = self._decode(frame)  # (T, C)
        if state is not None:
            return self._forward(incoming, state, hidden, t0)
        state = self._open(sid, incoming.device, frame, int(hidden.shape[0]))
        try:
            return self._forward(incoming, state, hidden, t0)
        except BaseException:
            self._free(sid, "its first step failed")  # a refused first frame leaves no session behind
            raise

    def _forward(self, incoming: Incoming, state: RelaySession, hidden, t0: float) -> pb.StepResult:
        """Run [k1, k2) on the frame's hidden states (T, C), step the session's tail; the answer."""
        frame = incoming.frame
        sid = frame.session_id
        mid = self.scheduler.submit(SegmentInput(sid, frame.start_pos, hidden=hidden)).result()  # (T, C)
        params = frame.params if frame.HasField("params") else None
        out = make_frame(
            sid, frame.seq, frame.start_pos, mid, self.codec, params=params, deadline_unix_ms=frame.deadline_unix_ms
        )
        t1 = time.perf_counter()
        self.metrics.stage("edge_segment", t1 - t0)
        result = state.tail.step(out)
        if result.error:
            self._free(sid, f"cloud step failed: {result.error}")
            return result
        t2 = time.perf_counter()
        # the edge's share of the step, for the owner's breakdown (runtime.owner.stage_breakdown)
        result.timings_ms["edge_queue"] = (t0 - incoming.received) * 1e3  # waiting for its lane
        result.timings_ms["edge_compute"] = (t1 - t0) * 1e3  # decode, layers [k1, k2), encode
        result.timings_ms["tail"] = (t2 - t1) * 1e3  # the tail's step: cloud round trip (or the fast tail)
        result.timings_ms["edge_total"] = (t2 - incoming.received) * 1e3
        state.ledger.record(frame.seq, result)
        self.metrics.observe_step(result, t2 - t0, "mqtt")
        self.metrics.tokens(path_name(result.path), len(result.tokens))
        return result

    def _decode(self, frame: pb.Frame):
        """The frame's hidden states, within the positions a frame and a session may hold."""
        s = self.settings
        hidden = decode_frame_hidden(frame, self.hidden_size, s.max_frame_positions * self.hidden_size)
        if frame.start_pos + hidden.shape[0] > s.max_positions:
            raise StepError("RESOURCE_EXHAUSTED", f"edge {self.edge_id}: positions {frame.start_pos}.."
                             f"{frame.start_pos + hidden.shape[0]} pass max_positions {s.max_positions}")
        return hidden

    def _open(self, sid: str, device: str, frame: pb.Frame, rows: int) -> RelaySession:
        """A new session of ``device`` from its seq 0 (``rows`` hidden states), within the edge's and the device's
        limits: it holds a session and prompt + max_tokens KV positions of the device's share until freed."""
        s = self.settings
        with self._lock:
            if len(self.sessions) >= s.relay_max_sessions:
                raise StepError("RESOURCE_EXHAUSTED", f"edge {self.edge_id} holds "
                                 f"{s.relay_max_sessions} device sessions (relay_max_sessions)")
        asked = frame.params.max_tokens
        if asked > s.max_tokens_limit:  # a refusal, never a silent clip
            self.metrics.quota_refused("max_tokens", "device")
            raise StepError("RESOURCE_EXHAUSTED", f"edge {self.edge_id}: max_tokens {asked} exceeds "
                            f"max_tokens_limit, {s.max_tokens_limit} tokens per session")
        self.shares.acquire(device, sid, min(frame.start_pos + rows + asked, s.max_positions))
        try:
            state = RelaySession(self.new_tail(), device, traceparent=frame.traceparent)
        except BaseException:
            self.shares.release(sid)
            raise
        with self._lock:
            self.sessions[sid] = state
        self.metrics.session_opened("mqtt")
        logger.debug("session %s opened", sid)
        return state

    def _free(self, sid: str, reason: str, close: pb.Frame | None = None) -> None:
        """Forget a session: its cache of [k1, k2) and its cloud stream (sent ``close`` or a close frame)."""
        with self._lock:
            state = self.sessions.pop(sid, None)
        self.shares.release(sid)  # its share of the device's sessions and KV positions
        self.scheduler.close_session(sid)
        if state is None:
            return
        self.metrics.session_closed("mqtt")
        logger.debug("session %s freed: %s", sid, reason)
        try:
            state.tail.close(close or make_frame(sid, state.ledger.next_seq, 0, None, close=True))
        except Exception:  # noqa: BLE001 -- best effort: the cloud frees the session when the stream ends
            logger.warning("closing the cloud stream of session %s failed", sid, exc_info=True)

    def _expire_idle(self) -> None:
        """Free sessions idle for ``session_ttl_s`` (on their lane, so never under a running step)."""
        ttl = self.settings.session_ttl_s
        while not self._stopping.wait(min(ttl / 4, 10.0)):
            now = time.monotonic()
            with self._lock:
                idle = ledger_idle({sid: s.ledger for sid, s in self.sessions.items()}, ttl, now)
            for sid in idle:
                if not self._lanes.busy(sid):
                    self._lanes.submit(sid, lambda sid=sid: self._free_if_idle(sid, ttl))

    def _free_if_idle(self, sid: str, ttl: float) -> None:
        with self._lock:
            state = self.sessions.get(sid)
        if state is not None and time.monotonic() - state.ledger.touched > ttl:
            self._free(sid, f"idle for more than {ttl:g} s")

    def stop(self) -> None:
        """Stop taking frames, abandon the steps in progress, free every session."""
        self._stopping.set()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        with self._lock:
            states = list(self.sessions.values())
        for state in states:
            cancel = getattr(state.tail, "cancel", None)
            if cancel is not None:
                cancel()
        self._lanes.shutdown()
        self.scheduler.stop()
        with self._lock:
            sids = list(self.sessions)
        for sid in sids:
            self._free(sid, "edge stopping")
        if self._janitor.is_alive():
            self._janitor.join()


