"""Fair shares: how much one device (its MQTT sessions at the relay) or one API key (its HTTP sessions) may hold.

A ``Shares`` tallies two things per holder, each entry under its own key so
that a release is exact and idempotent:
- sessions held, and the KV positions they reserved (prompt + ``max_tokens``:
  the room every tier keeps for the session, on the cloud, the edge's fast
  tail or its relay pool; it stays the session's when it moves to the fast
  path or another replica, and is released when the session ends, fails, is
  closed or reaped);
- or frames queued at the relay (waiting or running), and their bytes.

An entry that would take its holder past either limit is refused with
``QuotaExceeded``: a ``StepError`` of status RESOURCE_EXHAUSTED whose message
names the setting, its value and its unit. Each refusal counts in
``splitglm_edge_quota_refusals_total{limit, kind}``; the holder's id or key is
never a label. Holders below their limits are never refused here, whatever
the others hold.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

from runtime.ledger import StepError
from runtime.rates import RateBuckets

from .settings import setting

NOUNS = {"device": "device", "key": "API key"}  # a holder of each kind, in a refusal's words


@dataclass(frozen=True)
class Quota:
    """One limit: its metric label, the setting that sets it, its unit, and its value (0 = no limit)."""

    limit: str  # the label of splitglm_edge_quota_refusals_total: sessions, kv_positions, queued_frames, queued_bytes
    setting: str  # e.g. device_max_sessions
    unit: str  # e.g. sessions
    most: int


class QuotaExceeded(StepError):
    """A holder at its limit: RESOURCE_EXHAUSTED (HTTP 429), naming the limit and its value."""

    def __init__(self, quota: Quota, kind: str, detail: str):
        noun = NOUNS.get(kind, kind)
        super().__init__("RESOURCE_EXHAUSTED", f"{noun} quota reached: {quota.setting} is {quota.most} {quota.unit} "
                         f"per {noun}; {detail.format(noun=noun)}")
        self.quota, self.kind = quota, kind


class Shares:
    """What each holder of one ``kind`` ('device' or 'key') holds: a count of entries and an amount (thread-safe)."""

    def __init__(self, kind: str, count: Quota, amount: Quota, metrics=None):
        self.kind, self.count, self.amount, self.metrics = kind, count, amount, metrics
        self._entries: dict[Hashable, tuple[str, int]] = {}  # key -> (holder, amount)
        self._held: dict[str, tuple[int, int]] = {}  # holder -> (entries, amount)
        self._lock = threading.Lock()

    def acquire(self, holder: str, key: Hashable, amount: int) -> None:
        """Record entry ``key`` of ``holder`` with ``amount``; QuotaExceeded (counted) if it would pass a limit."""
        with self._lock:
            if key in self._entries:
                raise ValueError(f"{key!r} is held already")
            entries, total = self._held.get(holder, (0, 0))
            refused = self._refusal(self.count, entries, 1) or self._refusal(self.amount, total, amount)
            if refused is None:
                self._entries[key] = (holder, amount)
                self._held[holder] = (entries + 1, total + amount)
                return
        if self.metrics is not None:
            self.metrics.quota_refused(refused.quota.limit, self.kind)
        raise refused

    def release(self, key: Hashable) -> bool:
        """Give entry ``key`` back; False if it was not held (released already, or never acquired)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            holder, amount = entry
            entries, total = self._held[holder]
            if entries == 1:
                del self._held[holder]
            else:
                self._held[holder] = (entries - 1, total - amount)
            return True

    def held(self, holder: str) -> tuple[int, int]:
        """(entries, amount) that ``holder`` holds now."""
        with self._lock:
            return self._held.get(holder, (0, 0))

    def holders(self) -> int:
        """Holders that hold anything now."""
        with self._lock:
            return len(self._held)

    def _refusal(self, quota: Quota, held: int, asked: int) -> QuotaExceeded | None:
        if quota.most > 0 and held + asked > quota.most:
            return QuotaExceeded(quota, self.kind, f"this {{noun}} holds {held} and asked for {asked} more")
        return None


def session_shares(kind: str, settings, metrics=None) -> Shares:
    """Sessions and reserved KV positions per holder of ``kind``, limited by ``{kind}_max_sessions`` and
    ``{kind}_max_kv_positions`` of the edge's settings."""
    sessions, positions = f"{kind}_max_sessions", f"{kind}_max_kv_positions"
    return Shares(kind, Quota("sessions", sessions, "sessions", setting(settings, sessions)),
                  Quota("kv_positions", positions, "KV positions", setting(settings, positions)), metrics)


def queue_shares(settings, metrics=None) -> Shares:
    """Frames queued at the relay, and their bytes, per device."""
    return Shares("device", Quota("queued_frames", "device_max_queued_frames", "frames",
                                  setting(settings, "device_max_queued_frames")),
                  Quota("queued_bytes", "device_max_queued_bytes", "bytes",
                        setting(settings, "device_max_queued_bytes")), metrics)


class FrameRates:
    """Frames per second per device (``device_frames_per_s``, bursts of as many; paho's thread only)."""

    def __init__(self, settings, metrics=None):
        per_s = setting(settings, "device_frames_per_s")
        self.quota = Quota("frames_rate", "device_frames_per_s", "frames per second", per_s)
        self.buckets, self.metrics = RateBuckets(per_s, period_s=1.0), metrics

    def take(self, device: str) -> None:
        """Count one frame of ``device``; QuotaExceeded (counted) when it sends faster than its rate."""
        wait_s = self.buckets.take(device)
        if wait_s > 0:
            if self.metrics is not None:
                self.metrics.quota_refused(self.quota.limit, "device")
            raise QuotaExceeded(self.quota, "device", f"retry in {wait_s:.3f} s")
