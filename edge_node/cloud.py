"""The edge's gRPC client of the cloud: its replicas (a channel each: plaintext, TLS or mutual TLS), the health
service, and one stream per session.

The cloud is one or more replicas: ``--cloud HOST:PORT[,HOST:PORT...]``, and
an entry may be a DNS name (``dns:///cloud-headless:50051``, the form of a
Kubernetes headless service), whose channel spreads its streams over every
address the name resolves to with gRPC's ``round_robin`` policy. A new session
goes to the replica with the fewest open sessions among those whose channel is
not failing; ``splitglm_edge_cloud_sessions{replica}`` counts them. When a
replica fails mid-generation the router moves its sessions to another one by
replaying their split-point history (``edge_node.router``).

``CloudClient.tail()`` gives a ``CloudStream``: the accurate tail of one
session (a ``runtime.owner.Downstream``). Its frames go out through one
``SegmentService.Stream`` call (requests fed from a queue); a reader thread
moves the answers into a queue that ``step`` reads under a timeout. Failures
never raise: a gRPC error or a timeout comes back as a ``StepResult`` with
``error`` and the numeric gRPC ``status``, and the stream is then dead (the
cloud has freed the session, as the contract says).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import splitglm_pb2 as pb
from protos import splitglm_pb2_grpc as pb_grpc
from protos.status import error_result
from runtime import tracing

logger = logging.getLogger(__name__)

RECONNECT_BACKOFF_MS = (200, 2000)  # the channel's reconnect backoff after a failure: first, largest


class CloudStream:
    """The cloud tail of one session: ``step(frame) -> StepResult`` and ``close(frame)`` over one gRPC stream."""

    def __init__(self, client: CloudClient, replica: Replica | None, step_timeout_s: float, metrics=None,
                 kind: str = "http"):
        self._client, self.replica = client, replica  # None: the least loaded one when the stream opens
        self.step_timeout_s, self.metrics, self.kind = step_timeout_s, metrics, kind
        self._counted = False  # counted in the replica's open sessions
        self._outbox: queue.Queue[pb.Frame | None] = queue.Queue()  # requests; None ends the stream
        self._inbox: queue.Queue = queue.Queue()  # StepResult, grpc.RpcError, or None (stream ended)
        self._call = None
        self._failure: tuple[grpc.StatusCode, str] | None = None  # once set, the stream is dead
        self._lock = threading.Lock()  # one step at a time

    def step(self, frame: pb.Frame) -> pb.StepResult:
        """Send one frame and wait (at most ``step_timeout_s``) for its answer."""
        if not tracing.enabled:
            return self._step(frame)
        with tracing.span("link.grpc.step", client=True, session_id=frame.session_id, seq=frame.seq,
                          start_pos=frame.start_pos, drafts=len(frame.draft_tokens), frame_bytes=frame.ByteSize()
                          ) as span:
            if frame.seq == 0:
                frame.traceparent = tracing.traceparent()
            result = self._step(frame)
            span.set_attributes({"replica": self.target, "tokens": len(result.tokens), "status": result.status})
            return result

    def _step(self, frame: pb.Frame) -> pb.StepResult:
        with self._lock:
            if self._failure is not None:
                return error_result(frame.session_id, frame.seq, *self._failure)
            if self._call is None:
                self._open()
            start = time.perf_counter()
            self._outbox.put(frame)
            result = self._await(frame, start + self.step_timeout_s)
            if self.metrics is not None:
                self.metrics.add_wire_bytes("edge_cloud", "out", frame.ByteSize())
                if not result.error:
                    self.metrics.add_wire_bytes("edge_cloud", "in", result.ByteSize())
                    self.metrics.stage("cloud", time.perf_counter() - start)
            return result

    def close(self, frame: pb.Frame) -> None:
        """Send the close frame and end the stream (no answer; never blocks)."""
        self._uncount()
        if self._call is None or self._failure is not None:
            return
        self._outbox.put(frame)
        self._outbox.put(None)

    def cancel(self) -> None:
        """Abandon the stream at once (the cloud frees the session when the call ends)."""
        self._uncount()
        if self._call is not None:
            self._call.cancel()
            self._outbox.put(None)  # ends gRPC's thread that reads our requests

    @property
    def target(self) -> str:
        return self.replica.target if self.replica is not None else self._client.target

    def _open(self) -> None:
        self.replica = self._client.acquire(self.replica)
        self._counted = True
        if self.metrics is not None:
            self.metrics.cloud_sessions.labels(replica=self.replica.target).inc()
        self._call = self.replica.stub.Stream(iter(self._outbox.get, None))
        threading.Thread(target=self._read, name="cloud-stream-reader", daemon=True).start()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._client.release(self.replica)
            if self.metrics is not None:
                self.metrics.cloud_sessions.labels(replica=self.replica.target).dec()

    def _read(self) -> None:
        """Move the call's answers into the inbox until the stream ends."""
        try:
            for result in self._call:
                self._inbox.put(result)
            self._inbox.put(None)
        except grpc.RpcError as e:
            self._inbox.put(e)

    def _await(self, frame: pb.Frame, deadline: float) -> pb.StepResult:
        """The answer to ``frame``; answers to earlier seqs are skipped; a failure kills the stream."""
        while True:
            try:
                item = self._inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                self.cancel()
                return self._fail(
                    frame, grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.step_timeout_s:g} s"
                )
            if item is None:
                return self._fail(frame, grpc.StatusCode.UNAVAILABLE, "the cloud ended the stream without an answer")
            if isinstance(item, grpc.RpcError):
                return self._fail(frame, item.code(), item.details() or "")
            if item.session_id == frame.session_id and item.seq == frame.seq:
                return item
            logger.debug("session %s: skipping the cloud's answer to seq %d", item.session_id, item.seq)

    def _fail(self, frame: pb.Frame, code: grpc.StatusCode, details: str) -> pb.StepResult:
        message = f"cloud {self.target}: {code.name}: {details}"
        self._failure = (code, message)
        self._uncount()
        self._outbox.put(None)
        logger.warning("session %s seq %d: %s", frame.session_id, frame.seq, message)
        return error_result(frame.session_id, frame.seq, code, message)


@dataclass(frozen=True)
class ChannelTls:
    """TLS of a channel to the cloud: the CA its certificate must chain to, our client certificate (mutual TLS),
    the name its certificate must carry (empty: the host of the target)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        key, cert = (self.key.read_bytes(), self.cert.read_bytes()) if self.cert is not None else (None, None)
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), private_key=key, certificate_chain=cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_channel(target: str, tls: ChannelTls | None = None, options: list | None = None) -> grpc.Channel:
    """A channel to ``target`` (HOST:PORT): TLS when ``tls`` is given, else plaintext."""
    options = list(options or [])
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options + tls.options())


def parse_targets(value: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` (an entry may be ``dns:///NAME:PORT``) -> the entries; ValueError otherwise."""
    targets = [part.strip() for part in value.split(",") if part.strip()]
    if not targets:
        raise ValueError(f"cloud address {value!r} names no replica")
    for target in targets:
        address = target.removeprefix("dns:///")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cloud replica {target!r} must be HOST:PORT or dns:///NAME:PORT")
    if len(set(targets)) != len(targets):
        raise ValueError(f"cloud address {value!r} names a replica twice")
    return targets


class Replica:
    """One cloud replica: its channel (``round_robin`` over what its name resolves to), stubs and open sessions."""

    def __init__(self, target: str, tls: ChannelTls | None, options: list):
        self.target = target
        self.channel = open_channel(target, tls, options + [("grpc.lb_policy_name", "round_robin")])
        self.stub = pb_grpc.SegmentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.sessions = 0  # streams open now (CloudClient.acquire / release, under its lock)
        self.state = grpc.ChannelConnectivity.IDLE
        self.channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state != self.state:
            (logger.warning if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE else logger.debug)(
                "cloud replica %s: %s", self.target, state.name)
        self.state = state

    def failing(self) -> bool:
        return self.state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)

    def healthy(self, timeout_s: float) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


class CloudClient:
    """The cloud's replicas: health checks and per-session streams, each on the least loaded replica."""

    def __init__(self, target: str, step_timeout_s: float = 30.0, max_message_bytes: int = 64 << 20, metrics=None,
                 tls: ChannelTls | None = None):
        self.target, self.step_timeout_s, self.metrics = target, step_timeout_s, metrics
        limit = max_message_bytes + (1 << 20)  # the frame plus protobuf framing
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
        self.replicas = [Replica(t, tls, options) for t in parse_targets(target)]
        self._streams: weakref.WeakSet[CloudStream] = weakref.WeakSet()
        self._pick = threading.Lock()

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """Whether a replica's health service says SERVING within ``timeout_s`` seconds."""
        return any(r.healthy(timeout_s) for r in sorted(self.replicas, key=Replica.failing))

    def wait_ready(self, timeout_s: float, abort: threading.Event | None = None) -> None:
        """Block until a replica is healthy (or ``abort`` is set); TimeoutError after ``timeout_s`` seconds."""
        deadline, delay, attempt = time.monotonic() + timeout_s, 0.2, 0
        abort = abort or threading.Event()
        while not abort.is_set():
            attempt += 1
            if self.healthy(timeout_s=max(0.1, min(2.0, deadline - time.monotonic()))):
                logger.info("cloud %s is serving", self.target)
                return
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"cloud {self.target} not serving after {timeout_s:g} s ({attempt} checks)")
            if attempt == 1:
                logger.info("waiting for the cloud at %s", self.target)
            abort.wait(delay)
            delay = min(delay * 2, 2.0)

    def replicas_for(self, failed: Replica | None = None) -> list[Replica]:
        """Replicas to try for a session, best first: the ones not failing, fewest open sessions first; after a
        failure of ``failed``, the others, then ``failed`` itself if it is a DNS name (its channel may reach
        another address)."""
        with self._pick:
            order = sorted(self.replicas, key=lambda r: (r.failing(), r.sessions))
        if failed is None:
            return order
        again = [failed] if failed.target.startswith("dns:") else []
        return [r for r in order if r is not failed] + again

    def acquire(self, replica: Replica | None = None) -> Replica:
        """Count a stream opening on ``replica`` (None: the best one now); the replica."""
        with self._pick:
            if replica is None:
                replica = min(self.replicas, key=lambda r: (r.failing(), r.sessions))
            replica.sessions += 1
        return replica

    def release(self, replica: Replica) -> None:
        with self._pick:
            replica.sessions -= 1

    def tail(self, kind: str = "http", replica: Replica | None = None) -> CloudStream:
        """The accurate tail of a new session (a Downstream) on ``replica`` (default: the least loaded one when
        its first step goes out); ``kind`` labels its metrics (http, mqtt)."""
        stream = CloudStream(self, replica, self.step_timeout_s, self.metrics, kind)
        self._streams.add(stream)
        return stream

    def close(self) -> None:
        """Cancel the open streams (their steps fail with CANCELLED) and close the channels."""
        for stream in list(self._streams):
            stream.cancel()
        for replica in self.replicas:
            replica.close()
