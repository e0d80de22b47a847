"""The gRPC face of the cloud tier: ``SegmentService.Stream`` (one stream per session) and the health service.

The servicer only adapts: it parses and validates each frame, hands it to the
scheduler (``batcher.Batcher``) and streams back the StepResults; a frame it
cannot serve ends the stream with a gRPC status and a message (every failure
becomes a ``StepError`` through ``runtime.terminal.status_of``). Frames arrive
as raw bytes (not parsed by gRPC), so bad bytes are our INVALID_ARGUMENT, not
gRPC's INTERNAL; gRPC itself refuses messages over ``max_frame_bytes`` with
RESOURCE_EXHAUSTED.

The health service (service "" and ``splitglm.v1.SegmentService``) says NOT_SERVING until the plan's tier is
loaded on its device and the scheduler runs (the port opens only after the load), SERVING then, and
NOT_SERVING for good once the server drains (``stop``, SIGTERM) or the scheduler's loop has died
(``CloudServer.watch_scheduler``). Each stream's session id is on its log lines (``runtime.logs``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import splitglm_pb2 as pb
from protos.errors import CodecError, SizeLimitError
from protos.frames import decode_frame_hidden, parse_frame
from runtime import logs, tracing
from runtime.artifacts import load_plan, load_tier
from runtime.checkpoint import load_spec
from runtime.grammar import tier_grammars
from runtime.tensor_parallel import ShardError, shard_segment
from runtime.terminal import StepError, status_of
from runtime.tp_ranks import Ranks

from .batcher import Batcher, Limits
from .metrics import CloudMetrics
from .settings import CloudSettings, SettingsError

logger = logging.getLogger(__name__)

SERVICE = "splitglm.v1.SegmentService"
FREE_TIMEOUT_S = 30.0  # longest wait for the scheduler to free a session at the end of a stream
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_OWNERS = 65536  # sessions whose opening peer is remembered (for forks), oldest forgotten first


class SegmentServicer:
    """``SegmentService.Stream``: frames of one session in, its StepResults out."""

    def __init__(self, batcher: Batcher, hidden_size: int, max_frame_bytes: int, max_positions: int,
                 step_timeout_s: float = 300.0):
        self.batcher, self.hidden_size, self.step_timeout_s = batcher, hidden_size, step_timeout_s
        self.max_frame_bytes, self.max_elements = max_frame_bytes, max_positions * hidden_size
        self._streaming: set[str] = set()  # sessions that have a stream now
        self._owners: dict[str, str] = {}  # session -> the peer that opened it (a fork must come from the same)
        self._lock = threading.Lock()

    def Stream(self, request_iterator, context):  # noqa: N802 -- the rpc's name
        """Serve a session's frames in order; a close frame or the end of the stream frees the session."""
        session, keep, parent = None, False, None
        try:
            for data in request_iterator:
                frame = self._parse(data)
                if session is None:
                    session = self._attach(frame.session_id, peer_identity(context))
                    logs.session_id.set(session)  # on this stream's log lines (its thread's, until the end)
                    self._check_fork(frame, context)
                    if tracing.enabled and not tracing.continues_remote():  # no context in the gRPC metadata
                        parent = tracing.context_of(frame.traceparent)
                elif frame.session_id != session:
                    raise StepError("INVALID_ARGUMENT", f"this stream carries session {session!r}, not "
                                    f"{frame.session_id!r}: open one stream per session")
                if frame.close:
                    return
                yield self._traced(frame, parent) if tracing.enabled else self._answer(frame)
        except StepError as e:
            keep = e.status == "DEADLINE_EXCEEDED"  # the session stays for a retry (on a new stream)
            logger.info("stream of session %r ends with %s: %s", session, e.status, e)
            context.abort(grpc.StatusCode[e.status], str(e))
        finally:
            if session is not None:
                self._detach(session, free=not keep)
            logs.session_id.set("")

    def _answer(self, frame: pb.Frame) -> pb.StepResult:
        """The frame's StepResult from the scheduler (StepError DEADLINE_EXCEEDED past ``step_timeout_s``)."""
        try:
            return self.batcher.submit(frame, self._hidden(frame)).result(self.step_timeout_s)
        except concurrent.futures.TimeoutError:
            raise StepError("DEADLINE_EXCEEDED", f"session {frame.session_id!r}: step {frame.seq} took more than "
                            f"{self.step_timeout_s:g} s (step_timeout_s)") from None

    def _traced(self, frame: pb.Frame, parent) -> pb.StepResult:
        """``_answer`` in a span (the batched step that runs it links to it)."""
        with tracing.span("cloud.step", parent, session_id=frame.session_id, seq=frame.seq,
                          start_pos=frame.start_pos, drafts=len(frame.draft_tokens)) as span:
            result = self._answer(frame)
            span.set_attributes({"tokens": len(result.tokens), "accepted": result.accepted,
                                 "batch_size": int(result.timings_ms.get("batch_size", 0))})
            return result

    def _parse(self, data: bytes) -> pb.Frame:
        try:
            return parse_frame(data, self.max_frame_bytes)
        except CodecError as e:
            raise _codec_error(e, "") from None

    def _hidden(self, frame: pb.Frame) -> torch.Tensor | None:
        """The frame's hidden states, validated and decoded: (T, C) float32, or None."""
        if not frame.HasField("hidden"):
            return None
        where = f"frame {frame.seq} of session {frame.session_id!r}: "
        try:
            return decode_frame_hidden(frame, self.hidden_size, self.max_elements)
        except SizeLimitError as e:
            most = self.max_elements // self.hidden_size
            raise StepError("RESOURCE_EXHAUSTED", f"{where}{e} (a session holds at most {most} positions)") from None
        except CodecError as e:
            raise _codec_error(e, where) from None

    def _attach(self, session_id: str, peer: str) -> str:
        with self._lock:
            if session_id in self._streaming:
                raise StepError("FAILED_PRECONDITION", f"session {session_id!r} already has a stream")
            self._streaming.add(session_id)
            self._owners.setdefault(session_id, peer)
            while len(self._owners) > MAX_OWNERS:  # (sessions kept for a retry and then reaped leave entries)
                del self._owners[next(iter(self._owners))]
        return session_id

    def _check_fork(self, frame: pb.Frame, context) -> None:
        """A session may fork only a session its own peer opened (else another edge's prompt would leak into
        it): any other source is NOT_FOUND, as one this tier does not hold."""
        if frame.fork_of and frame.seq == 0:
            with self._lock:
                mine = self._owners.get(frame.fork_of) == peer_identity(context)
            if not mine:
                raise StepError("NOT_FOUND", f"session {frame.session_id!r} forks {frame.fork_of!r}, which this "
                                "tier does not hold for this peer")

    def _detach(self, session_id: str, free: bool) -> None:
        if free:
            self.batcher.free(session_id).result(FREE_TIMEOUT_S)
        with self._lock:
            self._streaming.discard(session_id)
            if free:
                self._owners.pop(session_id, None)


def peer_identity(context) -> str:
    """Who opened a stream: the client certificate's common name under mTLS, else the connection's address."""
    names = dict(context.auth_context() or {}).get("x509_common_name")
    return f"cn:{names[0].decode(errors='replace')}" if names else f"peer:{context.peer()}"


def _codec_error(error: CodecError, where: str) -> StepError:
    status, message = status_of(error)
    return StepError(status, f"{where}{message}")


def add_segment_service(servicer: SegmentServicer, server: grpc.Server) -> None:
    """Register ``Stream`` with raw request bytes (we parse frames) and serialized StepResults."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Stream, request_deserializer=None, response_serializer=pb.StepResult.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),))


@dataclass
class CloudServer:
    """A running cloud service: the bound ``port``, ``stop()``."""

    server: grpc.Server
    executor: ThreadPoolExecutor
    batcher: Batcher
    health: health.HealthServicer
    host: str
    port: int
    tls: bool = False
    metrics: CloudMetrics | None = None  # served on metrics_port, when set
    replica: object = None  # with tensor parallelism: the other ranks (``cloud_service.parallel.Replica``)
    failure: str = ""  # why the service failed ("" while it works)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'grpcs' if self.tls else 'grpc'}://{host}:{self.port}"

    def drain(self) -> None:
        """Health NOT_SERVING, for good: load balancers stop sending new sessions."""
        self.health.enter_graceful_shutdown()

    def watch_scheduler(self) -> None:
        """Drain (health NOT_SERVING) once the scheduler's loop ends: at ``stop``, or when a bug kills it."""

        def watch() -> None:
            self.batcher.join()
            if not self.batcher.stopping:
                logger.error("the scheduler's loop has died: health NOT_SERVING (restart this process)")
            self.drain()

        threading.Thread(target=watch, name="cloud-health", daemon=True).start()

    def fail(self, reason: str) -> None:
        """The service cannot serve any more (a rank of its replica died): health NOT_SERVING, for good."""
        self.failure = self.failure or reason
        logger.error("cannot serve any more (%s): health NOT_SERVING (restart this process)", reason)
        self.drain()

    def stop(self, grace: float | None = 0.0) -> None:
        """Drain, let running streams finish for ``grace`` seconds, cancel the rest, stop the scheduler."""
        self.drain()
        self.server.stop(grace).wait()
        self.batcher.stop()  # after the streams: steps still queued fail (UNAVAILABLE)
        if self.replica is not None:
            self.replica.stop()
        self.executor.shutdown(wait=True)  # the streams' threads, woken by the cancellation
        if self.metrics is not None:
            self.metrics.stop()
        logger.info("stopped: %s", self.url)

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without CUDA is a settings error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device: cuda was asked for, but CUDA is not available here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp8": torch.bfloat16}  # fp8: E4M3 weights of the layers' products, bf16 for the rest


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on cuda, float32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def weights_format(plan: Path, settings: CloudSettings, device: torch.device) -> str:
    """``settings.dtype``, or with ``auto`` the plan's choice for its cloud tier (``gpu_weights`` of its compression
    entry); an FP8 choice where FP8 cannot run is a settings error that says why."""
    name = settings.dtype
    source = "dtype"
    if name == "auto":
        name = load_plan(plan)["compression"]["cloud"].get("gpu_weights", "auto")
        source = f"the plan's cloud tier ({plan})"
    if name != "fp8":
        return name
    from runtime.fp8 import support_error

    problem = "it runs on cuda only, and device is cpu" if device.type != "cuda" else support_error(device)
    if problem:
        raise SettingsError(f"{source} asks for fp8 weights, but {problem}. Run the cloud on such a GPU, or pass "
                            "--dtype bfloat16 to serve the same tier unquantised")
    return name


def load_segment(plan: Path, settings: CloudSettings, ranks: Ranks | None = None):
    """The plan's verified cloud tier on the settings' device and dtype, its KV pool sized; and its hidden size.

    With ``ranks`` (tensor parallel), this rank's shard of it (``runtime.tensor_parallel``).
    """
    device = resolve_device(settings.device)
    weights = weights_format(plan, settings, device)
    dtype = resolve_dtype(weights, device)
    segment = load_tier(plan, "cloud")
    mib = settings.kv_pool_mib
    if mib is None and settings.kv_pool_tokens is None:
        mib = 8192 if device.type == "cuda" else 1024
    if ranks is not None:
        try:
            segment = shard_segment(segment, ranks)
        except ShardError as e:
            raise SettingsError(f"tensor_parallel {ranks.world}: {e}") from None
    if device.type == "cuda":
        from runtime.cuda import CudaEngine

        segment = CudaEngine(segment, dtype=dtype, fp8_linears=weights == "fp8", pool_tokens=settings.kv_pool_tokens,
                             pool_mib=mib,
                             prefill_chunk=settings.prefill_chunk, max_batch=settings.max_batch,
                             max_sessions=settings.max_sessions,
                             max_positions=settings.max_positions, graphs=settings.cuda_graphs,
                             mixed_passes=settings.mixed_passes, ranks=ranks)
    elif isinstance(segment, torch.nn.Module):
        segment = segment.to(dtype=dtype)
        segment.configure_pool(tokens=settings.kv_pool_tokens, mib=None if settings.kv_pool_tokens else mib)
    return segment, load_spec(Path(plan) / "cloud").hidden_size


def server_credentials(settings: CloudSettings) -> grpc.ServerCredentials | None:
    """TLS credentials of the settings' certificate (client certificates required with a client CA); None: none."""
    if settings.tls_cert is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def security_mode(settings: CloudSettings) -> str:
    """How the port is secured, in words for the log."""
    if settings.tls_client_ca is not None:
        return f"mutual TLS (clients need a certificate signed by {settings.tls_client_ca})"
    if settings.tls_cert is not None:
        return "TLS without client certificates"
    return "plaintext (no TLS: whoever reaches the port can use it)"


def bind(server: grpc.Server, settings: CloudSettings) -> int:
    """Add the listening port (TLS when the settings have a certificate); the bound port."""
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            return server.add_insecure_port(f"{address}:{settings.port}")
        return server.add_secure_port(f"{address}:{settings.port}", credentials)
    except RuntimeError as e:
        hint = "" if credentials is None else " (or tls_cert and tls_key are not a matching PEM pair)"
        raise OSError(f"cannot listen on {address}:{settings.port}{hint}: {e}") from None


def serve(settings: CloudSettings, segment=None) -> CloudServer:
    """Load the cloud segment (or take ``segment``: a tensor-parallel ``Leader``), start the scheduler and the
    gRPC server; return once it serves."""
    torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    if segment is None:
        segment, hidden_size = load_segment(settings.plan, settings)
    else:
        hidden_size = segment.spec.hidden_size
    limits = Limits(settings.max_sessions, settings.max_batch, settings.max_tokens, settings.max_positions,
                    settings.session_ttl_s, settings.prefill_chunk, settings.max_draft)
    grammars = tier_grammars([Path(settings.plan) / "cloud"], segment.spec.vocab_size, settings.grammar_limits())
    metrics = CloudMetrics() if settings.metrics_port is not None else None
    batcher = Batcher(segment, limits, device, grammars, metrics).start()
    workers = max(64, settings.max_sessions + 16)  # one thread per open stream, plus health checks
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloud-rpc")
    server = grpc.server(
        executor,
        maximum_concurrent_rpcs=workers,  # beyond it gRPC answers RESOURCE_EXHAUSTED instead of queueing without end
        options=[
            ("grpc.max_receive_message_length", settings.max_frame_bytes),
            ("grpc.max_send_message_length", settings.max_frame_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not shared with another server
        ],
    )
    add_segment_service(SegmentServicer(batcher, hidden_size, settings.max_frame_bytes, settings.max_positions,
                                        settings.step_timeout_s), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # until the server runs
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = bind(server, settings)
        if metrics is not None:
            metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError:  # the port, or the certificate files
        batcher.stop()
        executor.shutdown()
        raise
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    handle = CloudServer(server, executor, batcher, health_servicer, settings.host, port, settings.tls_cert is not None,
                         metrics=metrics)
    handle.watch_scheduler()
    mode = security_mode(settings)
    if settings.tls_cert is None and settings.host not in LOOPBACK:
        logger.warning("gRPC on %s is %s", settings.host, mode)
    logger.info("cloud segment on %s, %d max sessions, batches of up to %d, %s; ready: %s",
                device, settings.max_sessions, settings.max_batch, mode, handle.url)
    return handle
