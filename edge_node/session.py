"""One routed session's request and clock: what its seq 0 asked, the path chosen for it, and the budget left.

Time: a session's clock starts at ``deadline_unix_ms - budget`` when the owner
set a frame deadline (a device: its own segment and the MQTT hop count), else
when its seq-0 frame arrives. Frames go to the cloud without the deadline: the
router enforces the budget softly (a late accurate token beats a dropped step).
The owner's time between an answer and its next frame ("upstream": its own
layers, the MQTT hops) is estimated per kind (``Upstream``) and taken off what
the tails get.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from protos import splitglm_pb2 as pb
from runtime.terminal import sampling_params

from .estimates import RobustStat
from .policy import Policy, choose, parse_policy, should_switch, total_budget_ms

logger = logging.getLogger(__name__)

MIN_CLOUD_WAIT_MS = 50.0  # a budget never makes a cloud step time out sooner than this (nor than 2x its estimate)


def server_ms(result: pb.StepResult) -> float:
    """The cloud's own time of a step (its queue + compute), ms: the rest of the wall time is the link."""
    return result.timings_ms.get("compute", 0.0) + result.timings_ms.get("queue", 0.0)


class Upstream:
    """Time an owner takes between an answer and its next frame, per session kind, ms (thread-safe)."""

    def __init__(self):
        self._stats: dict[str, RobustStat] = {}
        self._lock = threading.Lock()

    def observe(self, kind: str, ms: float) -> None:
        with self._lock:
            self._stats.setdefault(kind, RobustStat(0.0)).observe(max(ms, 0.0))

    def get(self, kind: str, stat: str = "mean") -> float:
        with self._lock:
            s = self._stats.get(kind)
            return s.value(stat) if s is not None else 0.0


class Session:
    """A routed session's request (set by ``start`` at seq 0) and where its budget stands."""

    def __init__(self, router: object, kind: str):  # router: edge_node.router.Router
        self.router, self.kind = router, kind
        self.session_id = ""
        self.params: pb.GenerationParams | None = None  # seq 0's
        self.policy: Policy = router.policy
        self.budget_ms: float | None = None  # the whole completion's
        self.start_ms = 0.0  # Unix ms when the session's clock started
        self.prompt_tokens = 0
        self.predicted_ms = 0.0
        self.tokens: list[int] = []  # emitted since seq 0 (after its params' generated_tokens, on a replay)

    @property
    def tokens_done(self) -> int:
        return len(self.tokens)

    def start(self, frame: pb.Frame, hidden: torch.Tensor, follow: str = "") -> str:
        """Read seq 0's params and choose the path ("accurate" | "fast"), or take ``follow``'s (a fork goes
        where its source's cache is); ValueError names what is invalid."""
        params = pb.GenerationParams()
        params.CopyFrom(frame.params)
        n = params.max_tokens
        router = self.router
        self.policy = parse_policy(params.policy or None, router.policy)
        self.budget_ms = total_budget_ms(n, params.latency_budget_ms or None, params.token_budget_ms or None)
        sampling_params(params)
        rows = int(hidden.shape[0])
        self.session_id, self.params = frame.session_id, params
        self.prompt_tokens = frame.start_pos + rows  # (a fork's first frame has the prompt's last row only)
        now = time.time() * 1e3
        owner_start = frame.deadline_unix_ms - self.budget_ms if frame.deadline_unix_ms and self.budget_ms else now
        self.start_ms = min(owner_start, now)
        tails_budget = None
        if self.budget_ms is not None:
            upstream_ms = router.upstream.get(self.kind, "high") * max(n - 1, 0)  # the owner's share of the budget
            tails_budget = max(self.budget_ms - (now - self.start_ms) - upstream_ms, 0.0)
        if follow:  # a fork: one row to prefill, on the path of its source
            path, reason = follow, f"a fork of {frame.fork_of}"
            predicted_ms = router.estimates[path].predict(rows, n)
        else:
            decision = choose(self.policy, tails_budget, self.prompt_tokens, n, router.estimates, router.margin)
            path, reason, predicted_ms = decision.path, decision.reason, decision.predicted_ms
        self.predicted_ms = predicted_ms + router.upstream.get(self.kind) * max(n - 1, 0)
        router.count("router_decision", path=path, policy=self.policy.value)
        logger.debug("session %s (%s): %s path, %s", self.session_id, self.kind, path, reason)
        return path

    def left(self) -> tuple[int, float | None]:
        """(tokens still to come, this one included; ms the budget leaves the tails for them or None)."""
        left = max(self.params.max_tokens - self.tokens_done, 0)
        if self.budget_ms is None:
            return left, None
        upstream = self.router.upstream.get(self.kind, "high") * max(left - 1, 0)
        return left, self.budget_ms - (time.time() * 1e3 - self.start_ms) - upstream

    def deadline_at_risk(self) -> bool:
        """``policy.should_switch`` with the budget the tails have left."""
        left, tails_ms = self.left()
        if tails_ms is None:
            return False
        elapsed = time.time() * 1e3 - self.start_ms
        budget = elapsed + tails_ms  # should_switch compares the rest with budget - elapsed
        return should_switch(self.policy, elapsed, self.tokens_done, self.params.max_tokens, budget,
                             self.router.estimates, self.prompt_tokens)

    def cloud_wait_s(self, history_tokens: int) -> float:
        """How long this step may wait for the cloud: until moving to the fast path could no longer help."""
        limit = self.router.step_timeout_s
        left, tails_ms = self.left()
        if self.policy is not Policy.ADAPTIVE or tails_ms is None:
            return limit
        est = self.router.estimates
        fast_ms = est.fast.replay_ms(history_tokens, "high") + est.fast.remaining(left - 1, "high")
        if fast_ms >= est.accurate.remaining(left, "high"):
            return limit  # the fast path would be no quicker: no reason to give up on the cloud early
        expected = est.accurate.predict(self.prompt_tokens, 1, "high") if self.tokens_done == 0 else \
            est.accurate.get("step", "high")
        return min(limit, max(tails_ms - fast_ms, 2 * expected, MIN_CLOUD_WAIT_MS) / 1e3)

    def observe_accurate(self, positions: int, wall_ms: float, result: pb.StepResult) -> None:
        """A plain cloud step into the accurate estimates: the prefill, or a decode step and the link's rtt."""
        rtt_ms = max(wall_ms - server_ms(result), 0.0)
        accurate = self.router.estimates.accurate
        self.router.last_accurate = time.monotonic()
        if self.tokens_done == 0:  # the prefill
            accurate.observe_rtt(rtt_ms)
            accurate.observe_prefill(positions, wall_ms)
        else:
            accurate.observe_step(wall_ms, rtt_ms)
