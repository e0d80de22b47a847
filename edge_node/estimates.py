"""Online latency estimates of the router's two paths (pure: no I/O, no clocks; thread-safe).

Per path ("accurate": the cloud tail, "fast": the edge's fast tail) four
quantities, all in milliseconds, each a ``RobustStat``:

- ``prefill``: cost per prompt position of a prefill, the link's round trip excluded;
- ``step``: one decode step as the edge sees it (compute + the round trip, if any);
- ``rtt``: the link's round trip (accurate path; 0 for the fast path);
- ``replay``: cost per position of rebuilding the path's cache from the split-point
  history (the fast tail alone, or the link + cloud tail), used when switching.

A request of P prompt tokens and N new tokens is predicted as

    predict(P, N) = rtt + prefill * P + (N - 1) * step

(the first token comes out of the prefill; each later one costs one step, round
trip included), with every quantity at its mean or at its high percentile.

``RobustStat`` (what "robust" promises, tested in tests/edge_node/test_estimates.py):

- ``high``: the nearest-rank ``quantile`` (0.95; ``runtime.stats``) of the last ``window`` (64) raw
  samples. Until ``min_samples`` (20) are seen, copies of the seed fill the sample
  set up to 20 values, so the first observations cannot swing it. With 20 or more
  samples a single outlier, however large, moves ``high`` by at most one order
  statistic: it stays <= the largest of the other samples. A real change shows as
  soon as ceil(5%) of the window is slow (4 steps of 64).
- ``mean``: an EWMA (weight ``alpha`` = 0.1; while warming up max(alpha, 1/(n+2)),
  the seed counting as one sample) of the samples winsorized at ``high`` (each sample
  clipped to the current high before it enters). One outlier moves the mean by at
  most alpha * (high - mean); once the high percentile itself moves, the mean follows.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from runtime.stats import percentile

PATHS = ("accurate", "fast")
QUANTITIES = ("prefill", "step", "rtt", "replay")
PREFIX = "splitglm_edge_router_"


@dataclass(frozen=True)
class Seed:
    """A path's starting estimates (ms), e.g. a plan's predictions."""

    prefill_ms_per_token: float
    step_ms: float
    rtt_ms: float = 0.0
    replay_ms_per_token: float | None = None  # default: prefill_ms_per_token


# Fixed plans predict nothing: a CPU edge running a ~100M-parameter model, a cloud some 20 ms away.
# Measurements replace these within about 20 steps.
DEFAULT_SEEDS = {
    "accurate": Seed(prefill_ms_per_token=2.0, step_ms=60.0, rtt_ms=20.0, replay_ms_per_token=1.0),
    "fast": Seed(prefill_ms_per_token=2.0, step_ms=40.0, rtt_ms=0.0, replay_ms_per_token=1.0),
}


class RobustStat:
    """A winsorized EWMA mean and a sliding-window high percentile of one quantity (see the module doc).

    Not locked: ``PathEstimate`` serialises access.
    """

    def __init__(
        self, seed: float, alpha: float = 0.1, window: int = 64, quantile: float = 0.95, min_samples: int = 20
    ):
        if seed < 0 or not math.isfinite(seed):
            raise ValueError(f"a seed must be a finite number >= 0, got {seed!r}")
        self.seed, self.alpha, self.quantile, self.min_samples = float(seed), alpha, quantile, min_samples
        self.samples: deque[float] = deque(maxlen=window)
        self.count = 0
        self.mean = float(seed)
        self.last: float | None = None

    @property
    def high(self) -> float:
        """The high percentile, never below the mean."""
        values = list(self.samples) + [self.seed] * max(self.min_samples - self.count, 0)
        return max(percentile(values, self.quantile), self.mean) if values else self.mean

    def observe(self, value: float) -> None:
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"an observed time must be a finite number >= 0 ms, got {value!r}")
        weight = max(self.alpha, 1.0 / (self.count + 2))
        self.mean += weight * (min(value, self.high) - self.mean)
        self.samples.append(float(value))
        self.count += 1
        self.last = float(value)

    def value(self, stat: str) -> float:
        if stat == "mean":
            return self.mean
        if stat == "high":
            return self.high
        raise ValueError(f"stat must be 'mean' or 'high', got {stat!r}")


class PathEstimate:
    """Online estimates of one path (ms), seeded, updated from every prefill and step."""

    def __init__(self, name: str, seed: Seed, **stat_options):
        self.name = name
        self._lock = threading.Lock()
        replay = seed.prefill_ms_per_token if seed.replay_ms_per_token is None else seed.replay_ms_per_token
        self.stats = {
            "prefill": RobustStat(seed.prefill_ms_per_token, **stat_options),
            "step": RobustStat(seed.step_ms, **stat_options),
            "rtt": RobustStat(seed.rtt_ms, **stat_options),
            "replay": RobustStat(replay, **stat_options),
        }

    def observe_step(self, ms: float, rtt_ms: float | None = None) -> None:
        """One decode step took ``ms`` at the edge (round trip included); ``rtt_ms``: its round trip, if known."""
        with self._lock:
            self.stats["step"].observe(ms)
            if rtt_ms is not None:
                self.stats["rtt"].observe(rtt_ms)

    def observe_rtt(self, ms: float) -> None:
        with self._lock:
            self.stats["rtt"].observe(ms)

    def observe_prefill(self, tokens: int, ms: float) -> None:
        """A prefill of ``tokens`` positions took ``ms``; the round trip (current mean) is taken out."""
        if tokens < 1:
            raise ValueError(f"a prefill has at least one position, got {tokens}")
        with self._lock:
            self.stats["prefill"].observe(max(ms - self.stats["rtt"].mean, 0.0) / tokens)

    def observe_replay(self, tokens: int, ms: float) -> None:
        """Rebuilding this path's cache over ``tokens`` history positions took ``ms``."""
        if tokens < 1:
            raise ValueError(f"a replay has at least one position, got {tokens}")
        with self._lock:
            self.stats["replay"].observe(ms / tokens)

    def get(self, quantity: str, stat: str = "mean") -> float:
        """One estimate: ``quantity`` in QUANTITIES, ``stat`` 'mean' or 'high' (ms, or ms per position)."""
        with self._lock:
            return self.stats[quantity].value(stat)

    def predict(self, prompt_tokens: int, new_tokens: int, quantile: str = "mean") -> float:
        """rtt + prefill * prompt_tokens + (new_tokens - 1) * step, at the mean or the high percentile (ms)."""
        with self._lock:
            s = {q: self.stats[q].value(quantile) for q in ("prefill", "step", "rtt")}
        return s["rtt"] + s["prefill"] * prompt_tokens + max(new_tokens - 1, 0) * s["step"]

    def remaining(self, new_tokens: int, quantile: str = "mean") -> float:
        """``new_tokens`` more decode steps on this path (ms)."""
        return max(new_tokens, 0) * self.get("step", quantile)

    def replay_ms(self, history_tokens: int, quantile: str = "mean") -> float:
        """Rebuilding this path's cache over ``history_tokens`` positions (ms)."""
        return max(history_tokens, 0) * self.get("replay", quantile)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{quantity: {"mean", "high", "samples"}}."""
        with self._lock:
            return {q: {"mean": s.mean, "high": s.high, "samples": s.count} for q, s in self.stats.items()}


def seeds_from_plan(plan: dict | None) -> dict[str, Seed]:
    """Each path's seed from plan.json: ``predicted.paths`` (``splitglm partition``), else ``DEFAULT_SEEDS``.

    A plan that predicts only ``per_token_ms`` (an older partition) seeds the accurate step from it.
    """
    predicted = (plan or {}).get("predicted") or {}
    paths = predicted.get("paths") or {}
    seeds = {}
    for name in PATHS:
        default = DEFAULT_SEEDS[name]
        p = paths.get(name)
        if p:
            seeds[name] = Seed(
                p["prefill_ms_per_token"], p["step_ms"], p.get("rtt_ms", 0.0), p.get("replay_ms_per_token")
            )
        elif name == "accurate" and predicted.get("per_token_ms"):
            seeds[name] = Seed(default.prefill_ms_per_token, predicted["per_token_ms"], default.rtt_ms, None)
        else:
            seeds[name] = default
    return seeds


class Estimates:
    """Both paths' estimates; ``register`` exposes them as Prometheus gauges."""

    def __init__(self, seeds: dict[str, Seed] | None = None, **stat_options):
        seeds = {**DEFAULT_SEEDS, **(seeds or {})}
        self.paths = {name: PathEstimate(name, seeds[name], **stat_options) for name in PATHS}

    @classmethod
    def from_plan(cls, plan: dict | None, **stat_options) -> Estimates:
        return cls(seeds_from_plan(plan), **stat_options)

    def __getitem__(self, path: str) -> PathEstimate:
        return self.paths[path]

    @property
    def accurate(self) -> PathEstimate:
        return self.paths["accurate"]

    @property
    def fast(self) -> PathEstimate:
        return self.paths["fast"]

    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        return {name: p.snapshot() for name, p in self.paths.items()}

    def register(self, registry: CollectorRegistry) -> Collector:
        """Add gauges ``splitglm_edge_router_{prefill,replay}_seconds_per_token``,
        ``..._{step,rtt}_seconds`` (labels path, stat = mean | high) and the counter ``..._samples_total``
        (labels path, stat = the quantity) to ``registry``, read at each scrape."""
        collector = _Collector(self)
        registry.register(collector)
        return collector


_GAUGES = {  # quantity -> (metric name, help)
    "prefill": (
        "prefill_seconds_per_token",
        "Router estimate: prefill cost per prompt position (round trip excluded).",
    ),
    "step": ("step_seconds", "Router estimate: one decode step at the edge (round trip included)."),
    "rtt": ("rtt_seconds", "Router estimate: the link's round trip (accurate path)."),
    "replay": ("replay_seconds_per_token", "Router estimate: rebuilding a path's cache, per history position."),
}


class _Collector(Collector):
    def __init__(self, estimates: Estimates):
        self.estimates = estimates

    def describe(self) -> Iterator[Metric]:
        yield from self._families(with_values=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_values=True)

    def _families(self, with_values: bool) -> Iterator[Metric]:
        snapshot = self.estimates.snapshot() if with_values else {}
        for quantity, (name, help_text) in _GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["path", "stat"])
            for path, values in snapshot.items():
                for stat in ("mean", "high"):
                    family.add_metric([path, stat], values[quantity][stat] / 1000)
            yield family
        samples = CounterMetricFamily(PREFIX + "samples", "Router estimates: observations taken, by path and "
                                      "quantity (stat).", labels=["path", "stat"])  # exposed as ..._samples_total
        for path, values in snapshot.items():
            for quantity in QUANTITIES:
                samples.add_metric([path, quantity], values[quantity]["samples"])
        yield samples
