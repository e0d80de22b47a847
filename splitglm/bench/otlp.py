"""A local OTLP/HTTP trace receiver: ``POST /v1/traces`` (protobuf), counted and, if asked, kept as plain records.

``bench observability`` points the tiers' exporters at one that only counts; the trace test keeps the spans
and checks them. Not a collector: no batching, no forwarding, loopback only.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OK = ExportTraceServiceResponse().SerializeToString()


@dataclass
class Span:
    """One received span: its service (resource ``service.name``), ids in hex, name, attributes and links."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)


def _value(v):
    """An OTLP AnyValue as Python (scalars; anything else as its text form)."""
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    """The spans of one export request, flattened."""
    out = []
    for rs in request.resource_spans:
        service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(service, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                {a.key: _value(a.value) for a in s.attributes},
                                [(link.trace_id.hex(), link.span_id.hex()) for link in s.links]))
    return out


class OtlpReceiver:
    """``with OtlpReceiver(keep=True) as sink:`` -- ``sink.url`` for OTEL_EXPORTER_OTLP_ENDPOINT; ``count``
    spans received, ``spans`` (with ``keep``) the records."""

    def __init__(self, keep: bool = False):
        self.keep, self.count, self.spans = keep, 0, []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                    self.send_response(200)
                else:
                    self.send_response(404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(OK)))
                self.end_headers()
                self.wfile.write(OK)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    def take(self, request: ExportTraceServiceRequest) -> None:
        spans = spans_of(request)
        with self._lock:
            self.count += len(spans)
            if self.keep:
                self.spans.extend(spans)

    def env(self) -> dict[str, str]:
        """The standard variables that send a process's traces here, exported within 0.1 s."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
