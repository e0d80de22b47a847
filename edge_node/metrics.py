"""Prometheus metrics of the edge node, in one registry of its own (served at ``GET /metrics``).

Every metric name starts with ``splitglm_edge_``; ``docs/metrics.md`` lists them all. Times are in seconds
(the Prometheus convention), byte counts in bytes, and every label takes its values from a fixed set. The
registry (``runtime.metrics_http.new_registry``) also holds the process, platform and gc collectors. The
router counts its decisions and switches here and adds its estimate gauges (``Estimates.register``) to
the same ``registry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protos import splitglm_pb2 as pb
from protos.status import STATUS_CODES
from runtime.metrics_http import LATENCY_BUCKETS_S, new_registry
from runtime.report import path_name  # noqa: F401 -- the label of a path (one definition, re-exported)

PREFIX = "splitglm_edge_"
BUCKETS_S = LATENCY_BUCKETS_S
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The timings a step's answer may name (StepResult.timings_ms): the terminal's (queue, compute, grammar) and
# the relay's (edge_*, tail). Any other key is counted as "other", so a peer cannot grow the label's values.
TIMINGS = frozenset({"queue", "compute", "grammar", "edge_queue", "edge_compute", "tail", "edge_total"})
NOT_TIMES = frozenset({"batch_size"})  # counts the answers carry beside their timings


def timing_label(name: str) -> str:
    """The ``timing`` label of a StepResult timing: its name when known, else "other"."""
    return name if name in TIMINGS else "other"


class EdgeMetrics:
    """The edge node's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.http_requests_total = Counter(
            PREFIX + "http_requests_total",
            "HTTP generation requests answered, by API (completions, chat) and HTTP status code (499: the "
            "client went away).",
            ["api", "code"],
            registry=r,
        )
        self.device_frames_total = Counter(
            PREFIX + "device_frames_total",
            "Device frames (MQTT) answered, by gRPC status code name of the answer (OK, INVALID_ARGUMENT, ...).",
            ["code"],
            registry=r,
        )
        self.ttft_seconds = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "HTTP requests: time from the request's arrival to its first token.",
            buckets=BUCKETS_S,
            registry=r,
        )
        self.itl_seconds = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "HTTP requests: time per generated token after the first (its step's time over the step's tokens).",
            buckets=BUCKETS_S,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "HTTP requests answered in full (200): time from the request's arrival to its last token.",
            buckets=BUCKETS_S,
            registry=r,
        )
        self.tokens_total = Counter(
            PREFIX + "tokens_total", "Generated tokens, by the path that produced them.", ["path"], registry=r
        )
        self.steps_total = Counter(
            PREFIX + "steps_total", "Decode steps (one frame and its answer), by path.", ["path"], registry=r
        )
        self.step_seconds = Histogram(
            PREFIX + "step_seconds",
            "Time of one step at the edge (compute + round trip), by request kind.",
            ["kind"],
            buckets=BUCKETS_S,
            registry=r,
        )
        self.step_timing_seconds = Histogram(
            PREFIX + "step_timing_seconds",
            "Named timings the downstream reported for a step (StepResult.timings_ms): queue, compute, grammar, "
            "edge_queue, edge_compute, tail, edge_total, other.",
            ["timing"],
            buckets=BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            PREFIX + "stage_seconds",
            "Latency of a stage: cloud (an edge-cloud step, round trip included), edge_segment (the edge's "
            "layers for a device frame).",
            ["stage"],
            buckets=BUCKETS_S,
            registry=r,
        )
        self.wire_bytes_total = Counter(
            PREFIX + "wire_bytes_total",
            "Serialized bytes on a link (device_edge, edge_cloud), by direction.",
            ["link", "direction"],
            registry=r,
        )
        self.router_decisions_total = Counter(
            PREFIX + "router_decisions_total",
            "Paths the router chose for new sessions, by path and policy.",
            ["path", "policy"],
            registry=r,
        )
        self.router_switches_total = Counter(
            PREFIX + "router_switches_total",
            "Sessions moved to the fast path mid-generation, by reason: deadline, or cloud_error (a degraded answer).",
            ["reason"],
            registry=r,
        )
        self.relay_batch_size = Histogram(
            PREFIX + "relay_batch_size",
            "Device frames run through the edge's layers in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.spec_acceptance = Histogram(
            PREFIX + "speculative_acceptance_ratio",
            "Share of the drafts each speculative verification accepted.",
            buckets=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
            registry=r,
        )
        self.spec_tokens_per_round_trip = Histogram(
            PREFIX + "speculative_tokens_per_round_trip",
            "Tokens one speculative verification (one edge-cloud round trip) gave.",
            buckets=tuple(range(1, 17)),
            registry=r,
        )
        self.sessions_active = Gauge(
            PREFIX + "sessions_active", "Sessions open now, by kind (http, mqtt).", ["kind"], registry=r
        )
        self.cloud_sessions = Gauge(
            PREFIX + "cloud_sessions", "Cloud streams open now, by replica (an entry of --cloud).", ["replica"],
            registry=r,
        )
        self.cloud_failovers_total = Counter(
            PREFIX + "cloud_failovers_total",
            "Sessions moved to another cloud replica by replaying their split-point history, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.mqtt_refused_total = Counter(
            PREFIX + "mqtt_refused_total",
            "MQTT frames refused before any work: a reply topic or a session of another device, a topic that "
            "names no device, a frame over the size limit (too_large).",
            ["reason"],
            registry=r,
        )
        self.mqtt_reconnects_total = Counter(
            PREFIX + "mqtt_reconnects_total", "Connections to the MQTT broker after the first.", registry=r
        )
        self.mqtt_resubscribes_total = Counter(
            PREFIX + "mqtt_resubscribes_total",
            "Reconnections where the broker had lost the edge's session (another client took its client id, a "
            "broker restart), so every subscription was made anew.",
            registry=r,
        )
        self.mqtt_subscriptions_refused_total = Counter(
            PREFIX + "mqtt_subscriptions_refused_total", "SUBACKs that refused a subscription the relay needs.",
            registry=r,
        )
        self.http_refused_total = Counter(
            PREFIX + "http_refused_total",
            "HTTP requests refused before any model work, by reason (missing_api_key, invalid_api_key, "
            "body_too_large, prompt_too_long, too_many_tokens, context_length, rate_limit, concurrency).",
            ["reason"],
            registry=r,
        )

        self.prefill_positions_total = Counter(
            PREFIX + "prefill_positions_total",
            "Prompt positions the edge's own layers ran for HTTP sessions (a session forked from another's "
            "prefill, one of n completions, runs one).",
            registry=r,
        )
        self.forked_sessions_total = Counter(
            PREFIX + "forked_sessions_total",
            "HTTP sessions started from another session's prefill (n completions of one prompt) instead of their own.",
            registry=r,
        )
        self.quota_refusals_total = Counter(
            PREFIX + "quota_refusals_total",
            "New sessions and frames refused because their device or API key was at its fair share, by limit "
            "(sessions, kv_positions, max_tokens, queued_frames, queued_bytes, frames_rate) and kind (device, key).",
            ["limit", "kind"],
            registry=r,
        )

    def observe_step(self, result: pb.StepResult, step_s: float, kind: str) -> None:
        """Count one answered step of a session of ``kind`` ('http' or 'mqtt') that took ``step_s`` seconds."""
        self.steps_total.labels(path=path_name(result.path)).inc()
        self.step_seconds.labels(kind=kind).observe(step_s)
        for name, ms in result.timings_ms.items():
            if name not in NOT_TIMES:
                self.step_timing_seconds.labels(timing=timing_label(name)).observe(ms / 1e3)

    def add_wire_bytes(self, link: str, direction: str, n: int) -> None:
        """Add ``n`` bytes sent ('out') or received ('in') on ``link``."""
        self.wire_bytes_total.labels(link=link, direction=direction).inc(n)

    def session_opened(self, kind: str) -> None:
        self.sessions_active.labels(kind=kind).inc()

    def session_closed(self, kind: str) -> None:
        self.sessions_active.labels(kind=kind).dec()

    def mqtt_refused(self, reason: str) -> None:
        """Count a frame refused for ``reason`` ('reply_to', 'foreign_session', 'foreign_close', 'topic',
        'too_large', 'retained')."""
        self.mqtt_refused_total.labels(reason=reason).inc()

    def mqtt_session(self, event: str) -> None:
        """Count a broker link event: 'reconnects', 'resubscribes' or 'refused' (``protos.mqtt.Subscriptions``)."""
        {"reconnects": self.mqtt_reconnects_total, "resubscribes": self.mqtt_resubscribes_total,
         "refused": self.mqtt_subscriptions_refused_total}[event].inc()

    def http_refused(self, reason: str) -> None:
        """Count an HTTP request refused for ``reason`` (see ``http_refused_total``)."""
        self.http_refused_total.labels(reason=reason).inc()

    def quota_refused(self, limit: str, kind: str) -> None:
        """Count a refusal of a device's or a key's (``kind``) new session or frame at its ``limit``."""
        self.quota_refusals_total.labels(limit=limit, kind=kind).inc()

    def http_request(self, api: str, code: int | str) -> None:
        """Count one request of ``api`` ('completions', 'chat') answered with HTTP status ``code``."""
        self.http_requests_total.labels(api=api, code=str(code)).inc()

    def device_frame(self, code: str) -> None:
        """Count one device frame answered with gRPC status ``code`` (a name; any other counts as UNKNOWN)."""
        self.device_frames_total.labels(code=code if code in STATUS_CODES else "UNKNOWN").inc()

    def token(self, path: str, step_s: float, first: bool) -> None:
        """Count one token of an HTTP session made by ``path`` in a step of ``step_s`` seconds per token;
        each after the ``first`` is an inter-token latency."""
        self.tokens_total.labels(path=path).inc()
        if not first:
            self.itl_seconds.observe(step_s)

    def http_answered(self, ttft_s: float, e2e_s: float) -> None:
        """A whole HTTP answer: its time to first token and its end-to-end latency."""
        self.ttft_seconds.observe(ttft_s)
        self.e2e_seconds.observe(e2e_s)

    def tokens(self, path: str, n: int) -> None:
        """Count ``n`` tokens produced by ``path`` ('accurate' or 'fast')."""
        self.tokens_total.labels(path=path).inc(n)

    def stage(self, stage: str, seconds: float) -> None:
        """Observe the latency of one ``stage`` ('cloud', 'edge_segment') in seconds."""
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def router_decision(self, path: str, policy: str) -> None:
        """Count a new session the router started on ``path`` under ``policy``."""
        self.router_decisions_total.labels(path=path, policy=policy).inc()

    def cloud_failover(self, outcome: str) -> None:
        """Count a failed replica's session: 'moved' to another replica, or 'none_left' (the fast path takes it)."""
        self.cloud_failovers_total.labels(outcome=outcome).inc()

    def router_switch(self, reason: str) -> None:
        """Count a session moved to the fast path ('deadline' or 'cloud_error')."""
        self.router_switches_total.labels(reason=reason).inc()

    def speculation(self, drafted: int, accepted: int, tokens: int) -> None:
        """One verification: g drafts, a accepted, the tokens it gave."""
        self.spec_acceptance.observe(accepted / max(drafted, 1))
        self.spec_tokens_per_round_trip.observe(tokens)

    def prefilled(self, positions: int, forked: bool) -> None:
        """An HTTP session's prompt: ``positions`` run by the edge's layers, the rest ``forked`` or not."""
        self.prefill_positions_total.inc(positions)
        if forked:
            self.forked_sessions_total.inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
