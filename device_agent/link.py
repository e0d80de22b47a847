"""The device's downstream: frames to an edge over MQTT, step results back on the device's steps topic.

Request/reply as ``protos.topics`` describes it: every frame goes to a
frames topic that ends in this device's id and carries ``reply_to`` (and, on
MQTT v5, ResponseTopic + CorrelationData), this device's own steps topic, the
only one an edge answers it on; a session's first frame goes to the edge pool,
and the answer's ``edge_id`` pins every later frame of the session to that
edge (it holds the session's KV cache).

Retries follow Petals' inference session: an explicit attempt loop. When a
step gets no answer within ``step_timeout_s`` or the connection drops, the
same frame (same session id and seq) is published again once connected, after
a capped exponential backoff; the edge answers a repeated seq from its stored
result, and a second answer to a seq already answered is ignored.

When the edge holding a session is gone -- it answers NOT_FOUND (it restarted
and lost the session), or ``replay_after`` attempts in a row got no answer --
the session is replayed through the pool: one frame of every committed row
(``device_agent.replay``), whose answer answers the step; later frames are
renumbered for the new edge. The owner sees one answer per step, as before.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError

from protos import splitglm_pb2 as pb
from protos.frames import frame_to_bytes
from protos.mqtt import V5, publish_properties, user_property
from protos.status import STATUS_CODES
from protos.topics import (
    DEFAULT_POOL,
    EDGE_ID_PROPERTY,
    correlation,
    frames_topic,
    parse_correlation,
    steps_topic,
)
from runtime import tracing

from .replay import NoHistory, SessionHistory

logger = logging.getLogger(__name__)
Key = tuple[str, int]  # (session id, seq) as on the wire
NOT_FOUND = STATUS_CODES["NOT_FOUND"]


class LinkError(ConnectionError):
    """A step got no answer after every attempt."""


class LinkClosed(LinkError):
    """The link was shut down while a step waited (the agent is stopping)."""


class EdgeGone(LinkError):
    """The edge holding a session lost it or stopped answering: the session must be replayed."""


class EdgeLink:
    """``runtime.owner.Downstream`` over MQTT; the owner of ``client`` forwards its connect callbacks."""

    def __init__(
        self,
        client: mqtt.Client,
        protocol: int,
        device_id: str,
        pool: str = DEFAULT_POOL,
        step_timeout_s: float = 10.0,
        max_attempts: int = 30,
        backoff_s: float = 0.5,  # first pause before a republish, seconds; doubles per attempt
        max_backoff_s: float = 5.0,  # cap of that pause, seconds
        replay_after: int = 3,  # unanswered attempts of a frame to a session's edge before replaying it, count
    ):
        if max_attempts < 1 or step_timeout_s <= 0 or replay_after < 1:
            raise ValueError("an EdgeLink needs max_attempts >= 1, replay_after >= 1 and step_timeout_s > 0")
        self.client, self.v5 = client, protocol == V5
        self.device_id, self.reply_to = device_id, steps_topic(device_id)
        self.pool_topic = frames_topic(pool, device_id)
        self.step_timeout_s, self.max_attempts = step_timeout_s, max_attempts
        self.backoff_s, self.max_backoff_s, self.replay_after = backoff_s, max_backoff_s, replay_after
        self.stats: Counter[str] = Counter()  # published, republished, answers, ignored, replays
        self._cond = threading.Condition()
        self._connected = False
        self._epoch = 0  # connections made so far: a frame published in an earlier one may be lost
        self._closed = False
        self._answers: dict[Key, pb.StepResult | None] = {}  # steps in flight: None until answered
        self._edges: dict[str, str] = {}  # session id (on the wire) -> the edge holding it
        self._histories: dict[str, SessionHistory] = {}  # the owner's session id -> what a replay needs
        client.message_callback_add(self.reply_to, self.on_message)

    # ---- paho callbacks (network thread) ---------------------------------------------------------

    def on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        """paho's on_connect for a client that carries only this link: subscribe the steps topic, then
        ``connected()`` (an owner that subscribes for the link itself calls ``connected()`` alone)."""
        if reason_code.is_failure:
            return
        client.subscribe(self.reply_to, qos=1)  # before any frame this connection publishes
        self.connected()

    def connected(self) -> None:
        """A new connection, the steps topic already asked for on it: frames go out again."""
        with self._cond:
            self._connected, self._epoch = True, self._epoch + 1
            self._cond.notify_all()

    def on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """A StepResult on the steps topic: wake the step waiting for it; ignore repeats and strays."""
        result = pb.StepResult()
        try:
            result.ParseFromString(message.payload)
        except DecodeError as e:
            logger.warning("ignoring %d bytes on %s that are no StepResult: %s", len(message.payload), message.topic, e)
            return
        key = (result.session_id, int(result.seq)) if result.session_id else _correlation_key(message)
        edge = result.edge_id or user_property(message, EDGE_ID_PROPERTY)
        with self._cond:
            if key is None or key not in self._answers or self._answers[key] is not None:
                self.stats["ignored"] += 1
                logger.debug("ignoring an answer to %s: no step waits for it (a repeat or a late one)", key)
                return
            self._answers[key] = result
            if edge and not result.error:
                self._edges[key[0]] = edge
            self.stats["answers"] += 1
            self._cond.notify_all()

    # ---- Downstream ----------------------------------------------------------------------------

    def step(self, frame: pb.Frame) -> pb.StepResult:
        """Publish the frame and wait for its answer, republishing it until answered or out of attempts; when
        the session's edge is gone, replay the session to the pool and answer from the replay."""
        if not tracing.enabled:
            return self._step(frame)
        with tracing.span("link.mqtt.frame", client=True, session_id=frame.session_id, seq=frame.seq,
                          start_pos=frame.start_pos) as span:
            result = self._step(frame)
            span.set_attributes({"edge_id": result.edge_id, "tokens": len(result.tokens), "status": result.status})
            return result

    def _step(self, frame: pb.Frame) -> pb.StepResult:
        frame.reply_to = self.reply_to
        sid, seq = frame.session_id, int(frame.seq)
        history = self._history(frame)
        frame.session_id, frame.seq = history.wire_id, history.wire_seq(seq)
        try:
            result = self._exchange(frame)
            if not result.error:
                history.answered(frame, result)
        except EdgeGone as e:
            frame.session_id, frame.seq = sid, seq
            result = self._replay(frame, history, e)
        finally:
            frame.session_id, frame.seq = sid, seq
        result.session_id, result.seq = sid, seq
        return result

    def close(self, frame: pb.Frame) -> None:
        """Publish a close frame to the edge holding the session (QoS 1, no answer, no wait)."""
        frame.reply_to = self.reply_to
        with self._cond:
            history = self._histories.pop(frame.session_id, None)
            if history is not None:
                frame.session_id, frame.seq = history.wire_id, max(history.wire_seq(int(frame.seq)), 0)
            topic = self._topic(frame.session_id, int(frame.seq))
            self._edges.pop(frame.session_id, None)
        self.client.publish(topic, frame_to_bytes(frame), qos=1)

    def shutdown(self) -> None:
        """Wake every waiting step with LinkClosed; later steps fail at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- internals -----------------------------------------------------------------------------

    def _history(self, frame: pb.Frame) -> SessionHistory:
        with self._cond:
            history = self._histories.get(frame.session_id)
            if history is None or frame.seq == 0:
                history = SessionHistory(frame.session_id, pb.GenerationParams())
                history.params.CopyFrom(frame.params)
                if frame.seq != 0:
                    history.broken = "its first frame did not go through this link"
                self._histories[frame.session_id] = history
            return history

    def _exchange(self, frame: pb.Frame) -> pb.StepResult:
        """One wire frame's answer (EdgeGone: the edge holding its session lost it or went silent)."""
        key = (frame.session_id, int(frame.seq))
        payload = frame_to_bytes(frame)
        with self._cond:
            self._answers[key] = None
        try:
            result = self._attempts(key, payload)
        finally:
            with self._cond:
                self._answers.pop(key, None)
        if key[1] > 0 and result.error and result.status == NOT_FOUND:
            raise EdgeGone(f"the edge lost session {key[0]}: {result.error}")
        return result

    def _replay(self, frame: pb.Frame, history: SessionHistory, gone: EdgeGone) -> pb.StepResult:
        """Replay the session's committed rows (and ``frame``'s, unless a draft's) to the pool: the new
        edge's seq 0, whose answer is ``frame``'s."""
        old = history.wire_id
        try:
            replay = history.replay(frame)
        except NoHistory as e:
            raise LinkError(f"step {frame.seq} of session {frame.session_id}: {gone}; {e}") from gone
        replay.reply_to = self.reply_to
        with self._cond:
            edge = self._edges.pop(old, None)
        logger.warning("step %d of session %s: %s; replaying its %d positions to the pool as session %s",
                       frame.seq, frame.session_id, gone, replay.hidden.shape[0], replay.session_id)
        if edge:  # best effort: an edge that was only slow frees the old session at once
            close = pb.Frame(session_id=old, seq=0, close=True, reply_to=self.reply_to)
            self.client.publish(frames_topic(edge, self.device_id), frame_to_bytes(close), qos=1)
        self.stats["replays"] += 1
        result = self._exchange(replay)
        if not result.error:
            history.replayed(replay, result)
        return result

    def _attempts(self, key: Key, payload: bytes) -> pb.StepResult:
        session, seq = key
        silent = 0  # attempts in a row that got no answer from the session's edge
        for attempt in range(1, self.max_attempts + 1):
            try:
                epoch = self._publish(key, payload, republish=attempt > 1)
                return self._await(key, epoch)
            except LinkClosed:
                raise
            except (TimeoutError, ConnectionError) as e:
                silent = silent + 1 if isinstance(e, TimeoutError) else 0
                if seq > 0 and silent >= self.replay_after:
                    raise EdgeGone(f"no answer from its edge after {silent} attempts") from e
                if attempt == self.max_attempts:
                    raise LinkError(
                        f"step {seq} of session {session}: no answer after {attempt} attempts ({e})"
                    ) from e
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                logger.warning(
                    "step %d of session %s, attempt %d/%d failed: %r; republishing in %.1f s",
                    seq, session, attempt, self.max_attempts, e, delay,
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._answers[key] is not None, delay)
        raise AssertionError("unreachable")

    def _publish(self, key: Key, payload: bytes, republish: bool) -> int:
        """Publish once connected (unless already answered); return the connection epoch it went out in."""
        with self._cond:
            ready = self._cond.wait_for(lambda: self._connected or self._closed, self.step_timeout_s)
            if self._closed:
                raise LinkClosed("the device link is shut down")
            if not ready:
                raise ConnectionError(f"not connected to the MQTT broker for {self.step_timeout_s:g} s")
            if self._answers[key] is not None:  # a late answer came in during the backoff
                return self._epoch
            epoch, topic = self._epoch, self._topic(*key)
        user = {tracing.TRACEPARENT: tracing.traceparent()} if tracing.enabled else None  # the link's span
        properties = publish_properties(self.reply_to, correlation(*key), user) if self.v5 else None
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        # NO_CONN: the connection dropped just now; paho keeps the message and sends it on reconnect
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publishing to {topic} failed: {mqtt.error_string(info.rc)}")
        self.stats["republished" if republish else "published"] += 1
        return epoch

    def _await(self, key: Key, epoch: int) -> pb.StepResult:
        """The answer to ``key``; TimeoutError / ConnectionError when a republish is due."""

        def lost() -> bool:
            return not self._connected or self._epoch != epoch

        with self._cond:
            self._cond.wait_for(lambda: self._answers[key] is not None or self._closed or lost(), self.step_timeout_s)
            if self._answers[key] is not None:
                return self._answers[key]
            if self._closed:
                raise LinkClosed("the device link is shut down")
            if lost():
                raise ConnectionError("the connection to the MQTT broker dropped while waiting for the answer")
        raise TimeoutError(f"no answer within {self.step_timeout_s:g} s")

    def _topic(self, session: str, seq: int) -> str:
        """Seq 0 to the pool; later frames to the edge that answered the session (the pool if none did)."""
        edge = self._edges.get(session) if seq > 0 else None
        return frames_topic(edge, self.device_id) if edge else self.pool_topic


def _correlation_key(message: mqtt.MQTTMessage) -> Key | None:
    data = getattr(getattr(message, "properties", None), "CorrelationData", None)
    try:
        return parse_correlation(data) if data else None
    except ValueError:
        return None

