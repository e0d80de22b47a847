"""Prometheus metrics of the device agent, served over plain HTTP on ``metrics_port`` (off by default).

Every name starts with ``splitglm_device_``; ``docs/metrics.md`` lists them all. The agent counts its
readings and answers here (a few increments per reading); the broker link's and the edge link's counts
(``Subscriptions.stats``, ``EdgeLink.stats``: reconnects, republished frames, replays) are read from them at
scrape time. The registry also holds the process, platform and gc collectors
(``runtime.metrics_http.new_registry``). Labels and values carry counts and times, never a reading.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.metrics_http import LATENCY_BUCKETS_S, TierMetrics

PREFIX = "splitglm_device_"
READING_OUTCOMES = ("queued", "invalid", "queue_full", "rate_limited")
# (stats, key) -> (counter name without _total, help): the links' own counts, read when scraped
LINK_COUNTERS = {
    ("links", "reconnects"): ("mqtt_reconnects", "Connections to the MQTT broker after the first."),
    ("links", "resubscribes"): ("mqtt_resubscribes", "Reconnections where the broker had lost the agent's session, "
                                "so its subscriptions were made anew."),
    ("links", "refused"): ("mqtt_subscriptions_refused", "SUBACKs that refused a subscription the agent needs."),
    ("link", "published"): ("frames_sent", "Frames published to an edge (first attempts)."),
    ("link", "republished"): ("frames_republished", "Frames published again after no answer within "
                              "step_timeout_s, or after a lost connection."),
    ("link", "answers"): ("step_answers", "Step answers (StepResults) received from edges."),
    ("link", "replays"): ("replays", "Sessions replayed to a new edge (the old one restarted or went silent)."),
}


class DeviceMetrics(TierMetrics):
    """The device agent's registry: readings and answers counted here, its links read when scraped."""

    def __init__(self):
        super().__init__()
        r = self.registry
        self.readings_total = Counter(PREFIX + "readings_total", "Sensor messages received, by outcome: queued for "
                                      "an answer; invalid or queue_full (refused with a dead letter); rate_limited "
                                      "(dropped unread over max_readings_per_s).", ["outcome"], registry=r)
        for outcome in READING_OUTCOMES:
            self.readings_total.labels(outcome=outcome)
        self.answers_total = Counter(PREFIX + "answers_total", "Answers published on results/{device_id}, by "
                                     "outcome (ok, error).", ["outcome"], registry=r)
        for outcome in ("ok", "error"):
            self.answers_total.labels(outcome=outcome)
        self.answer_latency_seconds = Histogram(PREFIX + "answer_latency_seconds", "From the oldest reading an "
                                                "answer covers arriving to the answer's publication.",
                                                buckets=LATENCY_BUCKETS_S, registry=r)
        self.tokens_total = Counter(PREFIX + "tokens_total", "Tokens generated in the answers.", registry=r)

    def reading(self, outcome: str) -> None:
        """Count one sensor message with ``outcome`` (one of ``READING_OUTCOMES``)."""
        self.readings_total.labels(outcome=outcome).inc()

    def answered(self, error: bool, tokens: int) -> None:
        """Count one published answer (an error answer or not) and its tokens."""
        self.answers_total.labels(outcome="error" if error else "ok").inc()
        self.tokens_total.inc(tokens)

    def watch(self, agent) -> None:
        """Read the agent's readiness and its links' counts at each scrape."""
        self.registry.register(AgentCollector(agent))


class AgentCollector(Collector):
    """``splitglm_device_ready`` and the ``LINK_COUNTERS`` of a ``device_agent.agent.DeviceAgent``."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self) -> Iterator[Metric]:
        yield from families(None)

    def collect(self) -> Iterator[Metric]:
        yield from families(self.agent)


def families(agent) -> Iterator[Metric]:
    """The families, with the ``agent``'s values (None: only names and help)."""
    ready = None if agent is None else float(agent.ready.is_set())
    yield GaugeMetricFamily(PREFIX + "ready", "1 while the broker holds the sensors and steps subscriptions.", ready)
    for (stats, key), (name, help_text) in LINK_COUNTERS.items():
        value = None if agent is None else getattr(agent, stats).stats[key]
        yield CounterMetricFamily(PREFIX + name, help_text, value=value)  # exposed as ..._total
