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
from protos.mqtt import V5, MqttAuth, connect, new_client, publish_properties, wait_for_broker
from protos.status import STATUS_NAMES, error_result
from runtime.ledger import Ledger, StepError
from runtime.ledger import idle as ledger_idle
from runtime.scheduler import Scheduler
from runtime.step import SegmentInput
from runtime.terminal import status_of

from .metrics import path_name

logger = logging.getLogger(__name__)

@dataclass
class Incoming:
    """A received frame and where its answer goes."""

    frame: pb.Frame
    reply_topic: str  # the sending device's steps topic
    correlation: bytes
    device: str = ""  # the sending device, from the frames topic
    received: float = field(default_factory=time.perf_counter)


@dataclass
class RelaySession:
    """What the edge keeps of one device session between its frames."""

    tail: object  # a runtime.owner.Downstream (the cloud stream of this session)
    device: str  # the device that opened it: the only one whose frames it takes
    ledger: Ledger = field(default_factory=Ledger)  # seq order and the answer to a duplicate delivery


class SerialLanes:
    """Runs tasks on a thread pool; the tasks of one key run in order, one at a time, at most ``depth`` waiting."""

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
        # concurrent sessions' frames share forward passes of [k1, k2); prompts run in chunks
        self.scheduler = Scheduler(segment, max_batch=settings.relay_max_batch, lock=lock, name="relay-scheduler",
                                   on_step=lambda step: metrics.relay_batch_size.observe(step.sessions))
        self._subscribed, self._stopping = threading.Event(), threading.Event()
        self._connected = False
        self.protocol: int | None = None
        self.client = None
        self._janitor = threading.Thread(target=self._expire_idle, name="relay-janitor", daemon=True)

    # ---- MQTT ----------------------------------------------------------------------------------

    def start(self, timeout_s: float) -> None:
        """Connect, subscribe and wait (at most ``timeout_s``) until the subscriptions are made."""
        self.scheduler.start()
        self.protocol = wait_for_broker(self.settings.broker, self.settings.mqtt_protocol, timeout_s,
                                        MqttAuth.from_settings(self.settings))
        self.client = new_client(f"splitglm-edge-{self.edge_id}", self.protocol)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        connect(self.client, self.settings.broker, self.protocol, MqttAuth.from_settings(self.settings))
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"no MQTT subscriptions at {self.settings.broker} within {timeout_s:g} s")
        self._janitor.start()

    def subscriptions(self) -> list[str]:
        """The pool topic (shared on v5) and this edge's own frames topic."""
        s = self.settings
        if self.protocol == V5:
            pool = topics.pool_subscription(s.pool, s.share_group)
        else:
            pool = topics.frames_subscription(s.pool)
        return [pool, topics.frames_subscription(self.edge_id)]

    def connected(self) -> bool:
        return self._connected

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            logger.warning("MQTT broker %s refused the connection: %s", self.settings.broker, reason_code)
            return
        self._connected = True
        if self.protocol != V5:
            logger.warning(
                "MQTT 3.1.1 broker: every edge of pool %r gets each new session (load splitting "
                "needs shared subscriptions, i.e. an MQTT v5 broker)",
                self.settings.pool,
            )
        client.subscribe([(topic, 1) for topic in self.subscriptions()])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            logger.error("MQTT subscriptions %s refused: %s", self.subscriptions(), failed)
            return
        logger.info("subscribed to %s", ", ".join(self.subscriptions()))
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self._connected = False
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
        props = getattr(message, "properties", None)
        asked = getattr(props, "ResponseTopic", "") if props is not None else ""
        correlation = bytes(getattr(props, "CorrelationData", b"")) if props is not None else b""
        own = topics.steps_topic(device)  # the only topic this edge answers the device on
        self.metrics.add_wire_bytes("device_edge", "in", len(message.payload))
        try:
            frame = parse_frame(message.payload, self.settings.max_frame_bytes)
        except CodecError as e:
            self._publish(Incoming(pb.Frame(), own, correlation, device), error_result("", 0, *status_of(e)))
            return
        incoming = Incoming(frame, own, correlation or topics.correlation(frame.session_id, frame.seq), device)
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
        if not self._lanes.submit(frame.session_id, lambda: self._serve(incoming)):
            with self._lock:
                self._in_flight.discard(key)
            message = (f"edge {self.edge_id}: session {frame.session_id!r} already has "
                       f"{self.settings.relay_queue} frames waiting (relay_queue)")
            self._publish(incoming, error_result(frame.session_id, frame.seq, "RESOURCE_EXHAUSTED", message))

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
        self.metrics.request("mqtt", STATUS_NAMES.get(result.status, "UNKNOWN") if result.error else "ok")

    # ---- sessions --------------------------------------------------------------------------------

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
        state = self._open(sid, incoming.device)
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

    def _open(self, sid: str, device: str) -> RelaySession:
        with self._lock:
            if len(self.sessions) >= self.settings.relay_max_sessions:
                raise StepError("RESOURCE_EXHAUSTED", f"edge {self.edge_id} holds "
                                 f"{self.settings.relay_max_sessions} device sessions (relay_max_sessions)")
        state = RelaySession(self.new_tail(), device)
        with self._lock:
            self.sessions[sid] = state
        self.metrics.session_opened("mqtt")
        logger.debug("session %s opened", sid)
        return state

    def _free(self, sid: str, reason: str, close: pb.Frame | None = None) -> None:
        """Forget a session: its cache of [k1, k2) and its cloud stream (sent ``close`` or a close frame)."""
        with self._lock:
            state = self.sessions.pop(sid, None)
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


