"""OpenTelemetry traces, configured only by the standard ``OTEL_*`` variables; without them, nothing at all.

Each agent's entry point calls ``setup(service_name)`` once. Tracing is on only when a variable selects an
exporter -- ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; not ``none``), or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) -- and ``OTEL_SDK_DISABLED`` is not
``true``. Off, the SDK is never imported, and every call site on a hot path is guarded by the module-level
``enabled`` flag, so tracing costs one attribute read:

    with tracing.span("owner.step", seq=seq) if tracing.enabled else tracing.NOOP:

On, the SDK reads the rest of the standard variables itself: ``OTEL_SERVICE_NAME`` (else ``service_name``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``), ``OTEL_BSP_*`` (the batch span processor),
``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, certificates, timeout; ``OTEL_EXPORTER_OTLP_PROTOCOL``
``http/protobuf``, the default, or ``grpc``). The gRPC instrumentations (client and server, health checks left
out) carry the context in gRPC metadata; the FastAPI one (``instrument_fastapi``) starts the edge's request
spans. Between processes the context also travels as a W3C ``traceparent``: ``Frame.traceparent`` on a
session's first frame and an MQTT v5 user property (``traceparent``, ``context_of``).

Spans carry ids and numbers only (session ids, seqs, positions, counts, status names), never prompt text or
token ids: docs/operations.md lists them.
"""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger(__name__)

enabled = False  # set once by setup(); read on the hot paths
NOOP = contextlib.nullcontext()  # the stand-in for a span while tracing is off (reusable)
TRACEPARENT = "traceparent"  # the W3C header: the MQTT v5 user property's name too
HEALTH_PATHS = "/metrics,/livez,/readyz,/healthz"  # HTTP paths the FastAPI instrumentation leaves out

_tracer = None
_provider = None
_w3c = None  # the W3C trace-context propagator


def wanted(env: dict[str, str] | None = None) -> bool:
    """Whether the standard variables in ``env`` (default: the process's) ask for traces."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str) -> bool:
    """Turn tracing on when the ``OTEL_*`` variables ask for it (once per process); whether it is on."""
    global enabled, _tracer, _provider, _w3c
    if enabled or not wanted():
        return enabled
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    name = OTELResourceDetector().detect().attributes.get(SERVICE_NAME) or service_name
    _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))  # sampler: OTEL_TRACES_SAMPLER
    exporters = list(_exporters(os.environ.get("OTEL_TRACES_EXPORTER", "") or "otlp"))
    for exporter in exporters:
        _provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* variables
    trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("splitglm")
    _w3c = TraceContextTextMapPropagator()
    _instrument_grpc()
    enabled = True
    logger.info("tracing on: service %s, exporters %s", name, ", ".join(type(e).__name__ for e in exporters))
    return True


def _exporters(names: str):
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (otlp, console)."""
    for name in (n.strip().lower() for n in names.split(",")):
        if name == "otlp":
            yield _otlp_exporter()
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            yield ConsoleSpanExporter()
        elif name not in ("", "none"):
            logger.warning("OTEL_TRACES_EXPORTER: %r is not otlp, console or none: ignored", name)


def _otlp_exporter():
    """The OTLP span exporter of ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: http/protobuf (default) or grpc."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        if protocol != "http/protobuf":
            logger.warning("OTLP protocol %r is not supported here: using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()  # endpoint, headers, certificates, timeout: the OTEL_EXPORTER_OTLP_* variables


def _instrument_grpc() -> None:
    """Client and server spans for every gRPC call but the health service's, the context in the metadata."""
    from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient, GrpcInstrumentorServer, filters

    not_health = filters.negate(filters.health_check())
    GrpcInstrumentorClient(filter_=not_health).instrument()
    GrpcInstrumentorServer(filter_=not_health).instrument()


def instrument_fastapi(app) -> None:
    """Server spans for the HTTP app's requests (not for ``HEALTH_PATHS``), continuing a caller's traceparent."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls=HEALTH_PATHS, tracer_provider=_provider,
                                       exclude_spans=["receive", "send"])  # (one span per ASGI message: noise)


@contextlib.contextmanager
def running(service_name: str):
    """``setup(service_name)``; at the end of the block, however it ends, ``shutdown()`` (the spans flushed)."""
    setup(service_name)
    try:
        yield
    finally:
        shutdown()


def shutdown() -> None:
    """Export the spans still buffered and stop (each agent's stop path; harmless when off)."""
    global enabled
    if _provider is not None:
        _provider.shutdown()
    enabled = False


# ---- the hot paths' helpers (call them only while ``enabled``) ---------------------------------------------


def span(name: str, parent=None, links=(), client: bool = False, **attributes):
    """A span, current while the ``with`` block runs: a child of ``parent`` (a context, ``context_of``) or of
    the current span; ``links``: span contexts (``current``) it is linked to; ids and numbers only."""
    from opentelemetry.trace import Link, SpanKind

    return _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
        links=[Link(c) for c in links if c is not None and c.is_valid], attributes=attributes,
    )


def current():
    """The current span's context (to link to later), or None."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def traceparent() -> str:
    """The current span as a W3C traceparent ("" without one)."""
    carrier: dict[str, str] = {}
    _w3c.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def context_of(value: str):
    """A parent context from a W3C traceparent (None for ""/an invalid one: the current context)."""
    if not value:
        return None
    from opentelemetry import trace

    context = _w3c.extract({TRACEPARENT: value})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def continues_remote() -> bool:
    """Whether the current span continues another process's trace (it has a parent)."""
    from opentelemetry import trace

    return getattr(trace.get_current_span(), "parent", None) is not None
