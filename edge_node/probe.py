"""Keeps the accurate path's estimates current while no session measures them (``LinkProbe``)."""

from __future__ import annotations

import threading
import time


class LinkProbe:
    """Keeps the accurate path's estimates current while no session measures them.

    Without it a congested link would be remembered for good: once the estimates
    send every budgeted request down the fast path, no cloud step would ever show
    that the link recovered. Every ``interval_s`` without a measured cloud step it
    times one call of the cloud's health service (the same channel and link the
    steps use) and feeds it to ``observe``; a failed check adds nothing.
    """

    def __init__(self, router: object, interval_s: float, timeout_s: float = 2.0):  # router: edge_node.router.Router
        self.router, self.interval_s, self.timeout_s = router, interval_s, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-probe", daemon=True)

    def start(self) -> LinkProbe:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self.router.last_accurate < self.interval_s:
                continue  # sessions measure the link
            started = time.perf_counter()
            if self.router.cloud.healthy(timeout_s=self.timeout_s) and not self._stop.is_set():
                self.observe((time.perf_counter() - started) * 1e3)

    def observe(self, rtt_ms: float) -> None:
        """A round trip to the cloud measured without a step: one rtt sample, and one step sample modelled as
        that round trip plus the cloud's share of a step (step - rtt, at their means)."""
        accurate = self.router.estimates.accurate
        server_ms = max(accurate.get("step") - accurate.get("rtt"), 0.0)
        accurate.observe_step(rtt_ms + server_ms, rtt_ms)
