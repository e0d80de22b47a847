"""Events per client per period: token buckets, the one rate limit every agent uses (HTTP requests per key,
device frames per second at the edge, sensor readings per second at the device)."""

from __future__ import annotations

import time

MAX_CLIENTS = 10_000  # buckets kept before the full (idle) ones are dropped


class RateBuckets:
    """``rate`` events per client per ``period_s`` seconds: a bucket of ``rate`` tokens (a burst), refilled at
    rate/period_s a second; rate 0 = no limit."""

    def __init__(self, rate: float, clock=time.monotonic, period_s: float = 60.0):
        self.rate, self.clock, self.period_s = rate, clock, period_s
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """Take one token of ``client``'s bucket: 0.0, or the seconds until one is there (refused)."""
        if self.rate <= 0:
            return 0.0
        now, per_s = self.clock(), self.rate / self.period_s
        tokens, at = self._buckets.get(client, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - at) * per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / per_s
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_full(now, per_s)
        return 0.0

    def _forget_full(self, now: float, per_s: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * per_s >= self.rate]
        for client in full:
            del self._buckets[client]
