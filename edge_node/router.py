"""The edge's router: each session's tokens come from the accurate path (the cloud tail) or the fast path (the edge's
fast tail), chosen per request and switched mid-generation when the deadline or the cloud demands it.

``Router`` holds what every session shares: the cloud client, the fast tail,
the online estimates, the metrics and the deployment's policy.
``Router.tail(kind)`` gives a ``RoutedTail``, the ``runtime.owner.Downstream``
of ONE session (an HTTP session the edge owns, or a device session relayed
from MQTT). Per session:

- seq 0: the frame's params (policy, latency budget, max_tokens) choose the
  path (``policy.choose``); the first answer carries the prediction and the
  policy applied.
- on the accurate path the router keeps the split-point history: the decoded
  hidden states of every frame, exactly what the cloud sees (with a lossless
  codec the fast tail replays the very same input). Before each step it asks
  ``policy.should_switch``; a cloud step waits at most what the budget leaves
  for it (``step_timeout_s`` without a budget, or when the fast path would be
  no quicker).
- a cloud replica that fails (not one that is slow): the session moves to
  another replica (``edge_node.cloud``), which gets the history replayed in
  one step (as fp32: exactly what the failed one decoded) and answers the
  current frame; the tokens are the same, nothing is degraded.
- moving to the fast path (reason "deadline", or "cloud_error: ..." when the
  cloud times out or no replica is left): the cloud stream is closed, the fast tail's
  session is built by replaying the history in one step (which also answers
  the current frame), and the session never goes back. After a cloud failure
  every answer is ``degraded``; no request fails because the cloud did
  (unless the cloud says the request itself is INVALID_ARGUMENT, or the edge
  is shutting down).
- every step updates the estimates (``edge_node.estimates``): step wall time,
  the link's round trip (wall - the cloud's queue + compute), prefill and
  replay per position. While no session steps the cloud, ``LinkProbe`` times
  the cloud's health check so the accurate estimates follow the link anyway.

Time: a session's clock starts at ``deadline_unix_ms - budget`` when the owner
set a frame deadline (a device: its own segment and the MQTT hop count), else
when its seq-0 frame arrives. Frames go to the cloud without the deadline: the
router enforces the budget softly (a late accurate token beats a dropped step).
The owner's time between an answer and its next frame ("upstream": its own
layers, the MQTT hops) is estimated per kind and taken off what the tails get.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from protos import splitglm_pb2 as pb
from protos.codecs import join_rows
from protos.errors import CodecError
from protos.frames import decode_frame_hidden, make_frame
from protos.status import error_result
from runtime.ledger import Ledger
from runtime.sampling import SamplingParams
from runtime.terminal import sampling_params

from .estimates import Estimates, RobustStat
from .fast_tail import FastTail
from .policy import DEFAULT_MARGIN, DEFAULT_POLICY, Policy, choose, parse_policy, should_switch, total_budget_ms
from .speculation import Acceptance, RoundCosts, best_draft

logger = logging.getLogger(__name__)

MIN_CLOUD_WAIT_MS = 50.0  # a budget never makes a cloud step time out sooner than this (nor than 2x its estimate)
NOT_RETRIED = (grpc.StatusCode.INVALID_ARGUMENT.value[0],)  # the request itself is bad: no tail would serve it


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


class History:
    """A session's split-point hidden states, position by position, as its frames brought them."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []  # each (T_i, C), consecutive positions
        self.length = 0  # positions held

    def add(self, start_pos: int, hidden: torch.Tensor) -> None:
        """Rows (T, C) from ``start_pos`` (<= length; below it rewinds, as a retried step does)."""
        if start_pos > self.length:
            raise ValueError(f"the history holds {self.length} positions; a step cannot start at {start_pos}")
        if start_pos < self.length:
            kept = self.tensor()[:start_pos]
            self.chunks, self.length = [kept], start_pos
        self.chunks.append(hidden)
        self.length += int(hidden.shape[0])

    def tensor(self) -> torch.Tensor:
        """All of it: (length, C)."""
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0]


@dataclass
class Round:
    """A speculative round in progress: the committed token's row and the drafts' rows so far."""

    base: int  # position of the committed token (the first row)
    g: int  # drafts this round
    rows: list[torch.Tensor]  # (1, C) each, positions base, base + 1, ...
    encoded: list[pb.EncodedTensor]  # the same rows as they arrived
    drafts: list[int] = field(default_factory=list)
    tails_ms: float = 0.0  # time this round's frames spent at the edge's tails


@dataclass
class Router:
    """What the sessions' RoutedTails share; ``tail(kind)`` for each new session."""

    cloud: object  # edge_node.cloud.CloudClient: ``tail(kind) -> CloudStream``
    fast: FastTail
    estimates: Estimates
    hidden_size: int
    metrics: object | None = None  # edge_node.metrics.EdgeMetrics
    policy: Policy = DEFAULT_POLICY  # for frames that name none
    margin: float = DEFAULT_MARGIN  # choose(): the accurate prediction must fit the budget with this to spare
    step_timeout_s: float = 30.0  # longest wait for one cloud step, seconds
    upstream: Upstream = field(default_factory=Upstream)
    closed: threading.Event = field(default_factory=threading.Event)  # set: the edge is shutting down
    last_accurate: float = 0.0  # time.monotonic() of the latest measured cloud step
    # Speculative split decoding (edge_node.speculation): drafts a round at most; fixed_draft > 0 drafts
    # that many every round instead of choosing; alpha_prior is the acceptance assumed before any is seen.
    speculate: bool = True
    max_draft: int = 8
    fixed_draft: int = 0
    alpha_prior: float = 0.8

    def __post_init__(self):
        accurate = self.estimates.accurate  # the cloud's share of a decode step, ms: for speculation's costs
        self._cloud_ms = RobustStat(max(accurate.get("step") - accurate.get("rtt"), 1.0))
        self._cost_lock = threading.Lock()

    def observe_cloud(self, ms: float) -> None:
        with self._cost_lock:
            self._cloud_ms.observe(ms)

    def cloud_ms(self) -> float:
        with self._cost_lock:
            return self._cloud_ms.value("mean")

    def tail(self, kind: str = "http") -> RoutedTail:
        return RoutedTail(self, kind)

    def close(self) -> None:
        """From now on steps fail (UNAVAILABLE) instead of falling back: the edge is shutting down."""
        self.closed.set()

    def count(self, what: str, **labels: str) -> None:
        """Count on the edge's metrics (``router_decision``, ``router_switch``, ``cloud_failover``), if any."""
        if self.metrics is not None:
            getattr(self.metrics, what)(**labels)

    def observe_probe(self, rtt_ms: float) -> None:
        """A round trip to the cloud measured without a step (``LinkProbe``): one rtt sample, and one step
        sample modelled as that round trip plus the cloud's share of a step (step - rtt, at their means)."""
        accurate = self.estimates.accurate
        server_ms = max(accurate.get("step") - accurate.get("rtt"), 0.0)
        accurate.observe_step(rtt_ms + server_ms, rtt_ms)


class LinkProbe:
    """Keeps the accurate path's estimates current while no session measures them.

    Without it a congested link would be remembered for good: once the estimates
    send every budgeted request down the fast path, no cloud step would ever show
    that the link recovered. Every ``interval_s`` without a measured cloud step it
    times one call of the cloud's health service (the same channel and link the
    steps use) and feeds it to ``Router.observe_probe``; a failed check adds nothing.
    """

    def __init__(self, router: Router, interval_s: float, timeout_s: float = 2.0):
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
                self.router.observe_probe((time.perf_counter() - started) * 1e3)


class RoutedTail:
    """The tail of one session: ``step(frame) -> StepResult`` on the path the router chose; ``close(frame)``."""

    def __init__(self, router: Router, kind: str):
        self.router, self.kind = router, kind
        self.cloud = router.cloud.tail(kind)  # no call is made until the first accurate step
        self.session_id = ""
        self.params: pb.GenerationParams | None = None  # seq 0's
        self.policy = router.policy
        self.budget_ms: float | None = None  # the whole completion's
        self.start_ms = 0.0  # Unix ms when the session's clock started
        self.prompt_tokens = 0
        self.predicted_ms = 0.0
        self.path = ""  # "accurate" | "fast", once chosen
        self.history: History | None = None  # the split-point hidden states, while on the accurate path
        self.fast_seq0 = -1  # the frame seq the fast tail's session started at (-1: never)
        self.tokens_done = 0
        self.degraded = False
        self.ledger = Ledger()  # the answer to a repeated frame
        self.answered_at: float | None = None  # perf_counter() when the last answer left
        self.cloud_seq = 0  # the seq of the next frame to the cloud (draft steps send it none)
        self.speculating = False  # this session drafts for the cloud (set at seq 0)
        self.sampling: SamplingParams | None = None  # the session's, for drafts
        self.acceptance = Acceptance(router.alpha_prior)
        self.round: Round | None = None  # the speculative round in progress
        self.draft_len = 0  # positions the fast tail's draft session holds
        self._lock = threading.Lock()  # one step at a time

    # ---- Downstream ---------------------------------------------------------------------------------

    def step(self, frame: pb.Frame) -> pb.StepResult:
        """Answer one frame on the session's path (never raises: failures come back as error results)."""
        with self._lock:
            arrived = time.perf_counter()
            stored = self.ledger.repeat(frame.session_id, frame.seq, strict=False)
            if stored is not None:
                return stored  # a repeated frame: the same answer
            if self.router.closed.is_set():
                return error_result(frame.session_id, frame.seq, "UNAVAILABLE", "the edge is shutting down")
            try:
                hidden = decode_frame_hidden(frame, self.router.hidden_size)  # (T, C)
            except CodecError as e:
                return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT", str(e))
            if self.params is None:
                refused = self._start(frame, hidden)
                if refused is not None:
                    return refused
            elif self.answered_at is not None:
                self.router.upstream.observe(self.kind, (arrived - self.answered_at) * 1e3)
            if self.path == "accurate":
                result = self._accurate(frame, hidden)
            else:
                result = self._fast(frame.seq, frame.start_pos, hidden)
            if self.round is not None:
                self.round.tails_ms += (time.perf_counter() - arrived) * 1e3
            if result.error:
                return result
            if frame.seq == 0:
                result.predicted_ms, result.policy = self.predicted_ms, self.policy.value
            self.tokens_done += len(result.tokens)
            self.ledger.record(frame.seq, result)
            self.answered_at = time.perf_counter()
            return result

    def close(self, frame: pb.Frame) -> None:
        """Free the session on whichever tails hold it (best effort, never blocks on a step)."""
        self.history, self.round = None, None
        if self.fast_seq0 >= 0 or self.speculating:
            self.router.fast.close(frame.session_id or self.session_id)  # its fast-path and draft caches
        if self.fast_seq0 < 0:  # (a session that moved to the fast path has closed or lost its cloud stream)
            out = pb.Frame()
            out.CopyFrom(frame)
            out.seq = self.cloud_seq
            self.cloud.close(out)

    def cancel(self) -> None:
        """Abandon the cloud stream at once (the edge is stopping)."""
        self.cloud.cancel()

    # ---- choosing ----------------------------------------------------------------------------------

    def _start(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult | None:
        """Read seq 0's params and choose the path; an error result if the frame cannot start a session."""
        if frame.seq != 0:
            return error_result(frame.session_id, frame.seq, "NOT_FOUND",
                               f"unknown session {frame.session_id!r} (a session starts at seq 0)")
        params = pb.GenerationParams()
        params.CopyFrom(frame.params)
        n = params.max_tokens
        try:
            self.policy = parse_policy(params.policy or None, self.router.policy)
            self.budget_ms = total_budget_ms(n, params.latency_budget_ms or None, params.token_budget_ms or None)
            sampling_params(params)
        except ValueError as e:
            return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT", f"edge router: {e}")
        self.session_id, self.params, self.prompt_tokens = frame.session_id, params, int(hidden.shape[0])
        now = time.time() * 1e3
        owner_start = frame.deadline_unix_ms - self.budget_ms if frame.deadline_unix_ms and self.budget_ms else now
        self.start_ms = min(owner_start, now)
        upstream = self.router.upstream
        tails_budget = None
        if self.budget_ms is not None:
            upstream_ms = upstream.get(self.kind, "high") * max(n - 1, 0)  # the owner's share of the budget
            tails_budget = max(self.budget_ms - (now - self.start_ms) - upstream_ms, 0.0)
        decision = choose(self.policy, tails_budget, self.prompt_tokens, n, self.router.estimates, self.router.margin)
        self.path = decision.path
        self.predicted_ms = decision.predicted_ms + upstream.get(self.kind) * max(n - 1, 0)
        if self.path == "accurate":
            self.history = History()
            self.speculating = self.router.speculate and params.speculate != pb.SPECULATE_OFF \
                or params.speculate == pb.SPECULATE_ON
            self.sampling = sampling_params(params)  # (checked with the policy above)
        self.router.count("router_decision", path=self.path, policy=self.policy.value)
        logger.debug("session %s (%s): %s path, %s", self.session_id, self.kind, self.path, decision.reason)
        return None

    # ---- the accurate path ---------------------------------------------------------------------------

    def _accurate(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """Step the cloud (or move to the fast path first when the deadline is at risk); or speculate."""
        if self.round is not None:
            return self._round_step(frame, hidden)
        try:
            self.history.add(frame.start_pos, hidden)
        except ValueError as e:
            return error_result(frame.session_id, frame.seq, "FAILED_PRECONDITION", f"session {self.session_id!r}: {e}")
        if self.tokens_done > 0 and self._deadline_at_risk():
            return self._to_fast(frame, "deadline")
        drafts = self._drafts_for_round() if self.tokens_done > 0 else 0
        if drafts:  # a round starts: this frame's row is the last committed token
            self.round = Round(frame.start_pos, drafts, [hidden], [pb.EncodedTensor()])
            self.round.encoded[0].CopyFrom(frame.hidden)
            return self._draft_step(frame, hidden)
        out = pb.Frame()
        out.CopyFrom(frame)
        result, wall_ms = self._cloud_step(out)
        if result.error:
            if result.status in NOT_RETRIED or self.router.closed.is_set():
                return result
            if result.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and self.tokens_done > 0:
                self.router.estimates.accurate.observe_step(wall_ms)  # the step took at least this long
            self.cloud.cancel()
            moved = self._to_replica(frame.seq, frame.start_pos + int(hidden.shape[0]), result)
            if moved is not None:
                return moved
            return self._to_fast(frame, f"cloud_error: {result.error}", degraded=True)
        self._observe_accurate(int(hidden.shape[0]), wall_ms, result)
        return result

    def _to_replica(self, seq: int, end: int, failed: pb.StepResult) -> pb.StepResult | None:
        """The cloud replica failed: replay the history's first ``end`` positions on another replica (a new
        stream), which answers the token after them; None when no replica takes it (then the fast path does).

        The history holds the hidden states exactly as the cloud decoded them, sent again as fp32, and the
        draws are keyed by position: the new replica gives the tokens the failed one would have."""
        if failed.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] or self.router.closed.is_set():
            return None  # a slow cloud, not a dead one: the budget is better spent on the fast path
        params = pb.GenerationParams()
        params.CopyFrom(self.params)
        params.max_tokens = max(self.params.max_tokens - self.tokens_done, 1)
        history = self.history.tensor()[:end]
        for replica in self.router.cloud.replicas_for(self.cloud.replica):
            self.cloud, self.cloud_seq = self.router.cloud.tail(self.kind, replica), 0
            out = make_frame(self.session_id, seq, 0, history, "fp32", params=params)
            result, wall_ms = self._cloud_step(out)
            if not result.error:
                self.router.count("cloud_failover", outcome="moved")
                logger.warning("session %s: moved to cloud replica %s at token %d (%s); replayed %d positions in "
                               "%.1f ms", self.session_id, replica.target, self.tokens_done, failed.error,
                               history.shape[0], wall_ms)
                result.next_pos = end  # (after a round's drafts: the owner rewinds to the token after the committed)
                return result
            self.cloud.cancel()
            if result.status in NOT_RETRIED:
                break
        self.router.count("cloud_failover", outcome="none_left")
        return None

    def _cloud_step(self, out: pb.Frame) -> tuple[pb.StepResult, float]:
        """One frame to the cloud (renumbered into the cloud stream's seqs); its answer, numbered back, and
        the wall time in ms."""
        seq, out.seq = out.seq, self.cloud_seq
        out.deadline_unix_ms = 0  # the router keeps the budget; the cloud must not drop a late step
        self.cloud.step_timeout_s = self._cloud_wait_s()
        started = time.perf_counter()
        result = self.cloud.step(out)
        wall_ms = (time.perf_counter() - started) * 1e3
        if not result.error:
            self.cloud_seq += 1
            if self.tokens_done > 0:  # (a prefill is no decode step)
                self.router.observe_cloud(result.timings_ms.get("compute", 0.0) + result.timings_ms.get("queue", 0.0))
        answer = pb.StepResult()
        answer.CopyFrom(result)
        answer.seq = seq
        return answer, wall_ms

    # ---- speculation: the fast tail drafts, the cloud verifies several tokens per round trip ------------

    def _drafts_for_round(self) -> int:
        """g for the round starting now (0: a plain accurate step), from the acceptance and the costs."""
        if not self.speculating:
            return 0
        cap = min(self.router.max_draft, self.params.max_tokens - self.tokens_done - 1)
        if cap <= 0:
            return 0
        if self.router.fixed_draft:
            return min(self.router.fixed_draft, cap)
        est, r = self.router.estimates.accurate, self.router
        costs = RoundCosts(owner_ms=r.upstream.get(self.kind), draft_ms=r.estimates.fast.get("step"),
                           rtt_ms=est.get("rtt"), verify_ms=r.cloud_ms(), verify_row_ms=est.get("prefill"))
        forced = 1 if self.params.speculate == pb.SPECULATE_ON else 0  # asked for: at least one draft
        return best_draft(self.acceptance.alpha, costs, cap, at_least=forced)

    def _draft(self, start_pos: int, hidden: torch.Tensor) -> int:
        """The fast tail's draft after ``hidden`` (one row at start_pos), catching its cache up first."""
        rows, at = hidden, start_pos
        if self.draft_len < start_pos:  # positions it has not seen: from the cloud-bound history
            rows, at = torch.cat([self.history.tensor()[self.draft_len : start_pos], hidden]), self.draft_len
        started = time.perf_counter()
        token = self.router.fast.draft(self.session_id, at, rows, self.sampling)
        if rows.shape[0] == 1:  # a draft is a fast-tail decode step
            self.router.estimates.fast.observe_step((time.perf_counter() - started) * 1e3)
        self.draft_len = start_pos + 1
        return token

    def _draft_step(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """Draft one token and hand it to the owner to run (not emitted: it is not verified yet)."""
        token = self._draft(frame.start_pos, hidden)
        self.round.drafts.append(token)
        return pb.StepResult(session_id=frame.session_id, seq=frame.seq, draft_tokens=[token],
                             next_pos=frame.start_pos + 1, path=pb.ACCURATE)

    def _round_step(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """The row of the latest draft: draft again, or send the round to the cloud for verification."""
        r = self.round
        if frame.start_pos != r.base + len(r.rows) or hidden.shape[0] != 1:
            return error_result(frame.session_id, frame.seq, "FAILED_PRECONDITION",
                                f"session {self.session_id!r}: the draft of position {r.base + len(r.rows)} "
                                f"comes as one row there, not {hidden.shape[0]} at {frame.start_pos}")
        r.rows.append(hidden)
        r.encoded.append(pb.EncodedTensor())
        r.encoded[-1].CopyFrom(frame.hidden)
        stopped = r.drafts[-1] in self.params.stop_token_ids
        if len(r.drafts) < r.g and not stopped:
            return self._draft_step(frame, hidden)
        return self._verify(frame)

    def _verify(self, frame: pb.Frame) -> pb.StepResult:
        """One cloud step over the round's g + 1 rows; the accepted tokens, and where the owner goes on."""
        r, self.round = self.round, None
        out = pb.Frame(session_id=frame.session_id, seq=frame.seq, start_pos=r.base, draft_tokens=r.drafts)
        out.hidden.CopyFrom(join_rows(r.encoded))  # the rows exactly as they came (entropy-coded: as fp32)
        result, wall_ms = self._cloud_step(out)
        if result.error:
            if result.status in NOT_RETRIED or self.router.closed.is_set():
                return result
            self.cloud.cancel()
            moved = self._to_replica(frame.seq, r.base + 1, result)
            if moved is not None:
                return moved
            return self._to_fast_at(frame.seq, r.base + 1, f"cloud_error: {result.error}", degraded=True)
        accepted = result.accepted
        if accepted:  # the cloud now holds the accepted drafts' positions too
            self.history.add(r.base + 1, torch.cat(r.rows[1 : accepted + 1]))
        self.acceptance.observe(len(r.drafts), accepted)
        self._observe_round(r, wall_ms, result)
        result.next_pos = r.base + 1 + accepted  # the owner rewinds there: rejected drafts are dropped
        return result

    def _observe_round(self, r: Round, wall_ms: float, result: pb.StepResult) -> None:
        """The estimates see a round as steps of (the tails' time of the round) / (tokens it gave)."""
        server_ms = result.timings_ms.get("compute", 0.0) + result.timings_ms.get("queue", 0.0)
        per_token = (r.tails_ms + wall_ms) / max(len(result.tokens), 1)
        self.router.estimates.accurate.observe_step(per_token, max(wall_ms - server_ms, 0.0))
        self.router.last_accurate = time.monotonic()
        if self.router.metrics is not None:
            self.router.metrics.speculation(len(r.drafts), result.accepted, len(result.tokens))

    def _observe_accurate(self, positions: int, wall_ms: float, result: pb.StepResult) -> None:
        server_ms = result.timings_ms.get("compute", 0.0) + result.timings_ms.get("queue", 0.0)
        rtt_ms = max(wall_ms - server_ms, 0.0)
        accurate = self.router.estimates.accurate
        self.router.last_accurate = time.monotonic()
        if self.tokens_done == 0:  # the prefill
            accurate.observe_rtt(rtt_ms)
            accurate.observe_prefill(positions, wall_ms)
        else:
            accurate.observe_step(wall_ms, rtt_ms)

    def _left(self) -> tuple[int, float | None]:
        """(tokens still to come, this one included; ms the budget leaves the tails for them or None)."""
        left = max(self.params.max_tokens - self.tokens_done, 0)
        if self.budget_ms is None:
            return left, None
        upstream = self.router.upstream.get(self.kind, "high") * max(left - 1, 0)
        return left, self.budget_ms - (time.time() * 1e3 - self.start_ms) - upstream

    def _deadline_at_risk(self) -> bool:
        """``policy.should_switch`` with the budget the tails have left."""
        left, tails_ms = self._left()
        if tails_ms is None:
            return False
        elapsed = time.time() * 1e3 - self.start_ms
        budget = elapsed + tails_ms  # should_switch compares the rest with budget - elapsed
        return should_switch(self.policy, elapsed, self.tokens_done, self.params.max_tokens, budget,
                             self.router.estimates, self.prompt_tokens)

    def _cloud_wait_s(self) -> float:
        """How long this step may wait for the cloud: until moving to the fast path could no longer help."""
        limit = self.router.step_timeout_s
        left, tails_ms = self._left()
        if self.policy is not Policy.ADAPTIVE or tails_ms is None:
            return limit
        est = self.router.estimates
        fast_ms = est.fast.replay_ms(self.history.length, "high") + est.fast.remaining(left - 1, "high")
        if fast_ms >= est.accurate.remaining(left, "high"):
            return limit  # the fast path would be no quicker: no reason to give up on the cloud early
        expected = est.accurate.predict(self.prompt_tokens, 1, "high") if self.tokens_done == 0 else \
            est.accurate.get("step", "high")
        return min(limit, max(tails_ms - fast_ms, 2 * expected, MIN_CLOUD_WAIT_MS) / 1e3)

    # ---- the fast path ------------------------------------------------------------------------------

    def _to_fast(self, frame: pb.Frame, reason: str, degraded: bool = False) -> pb.StepResult:
        """Leave the cloud for good: replay the history on the fast tail, which answers ``frame``."""
        return self._to_fast_at(frame.seq, frame.start_pos + frame.hidden.shape[0], reason, degraded)

    def _to_fast_at(self, seq: int, end: int, reason: str, degraded: bool = False) -> pb.StepResult:
        """Leave the cloud for good: the fast tail replays the history's first ``end`` positions and answers
        the token after them; the owner goes on from position ``end``."""
        if not degraded:
            self.cloud.close(make_frame(self.session_id, self.cloud_seq, end, None, close=True))
        if self.speculating:
            self.router.fast.close(self.session_id)  # its draft cache: the fast path's session is new
        self.path, self.fast_seq0, self.round = "fast", seq, None
        self.degraded = self.degraded or degraded
        params = pb.GenerationParams()
        params.CopyFrom(self.params)
        params.max_tokens = max(self.params.max_tokens - self.tokens_done, 1)
        history, self.history = self.history.tensor()[:end], None  # (positions, C)
        started = time.perf_counter()
        result = self._fast_step(seq, 0, history, params)
        replay_ms = (time.perf_counter() - started) * 1e3
        if result.error:
            return result
        self.router.estimates.fast.observe_replay(int(history.shape[0]), replay_ms)
        result.switch_reason = reason
        self.router.count("router_switch", reason=reason.split(":")[0])
        log = logger.warning if degraded else logger.info
        log("session %s: fast path from token %d (%s); replayed %d positions in %.1f ms",
            self.session_id, self.tokens_done, reason, history.shape[0], replay_ms)
        result.next_pos = end  # (after a round's drafts: the owner rewinds to the token after the committed one)
        return result

    def _fast(self, seq: int, start_pos: int, hidden: torch.Tensor) -> pb.StepResult:
        """A step of a session already on the fast path (seq 0 of a session that started there: its prefill)."""
        if self.fast_seq0 < 0:
            self.fast_seq0 = 0
        first = seq == self.fast_seq0
        started = time.perf_counter()
        result = self._fast_step(seq, start_pos, hidden, self.params if first else None)
        wall_ms = (time.perf_counter() - started) * 1e3
        if not result.error:
            if first:
                self.router.estimates.fast.observe_prefill(int(hidden.shape[0]), wall_ms)
            else:
                self.router.estimates.fast.observe_step(wall_ms)
        return result

    def _fast_step(self, seq: int, start_pos: int, hidden: torch.Tensor, params) -> pb.StepResult:
        """The fast tail's answer, renumbered from its own seqs (from 0 at ``fast_seq0``) to the frame's."""
        inner = self.router.fast.step(self.session_id, seq - self.fast_seq0, start_pos, hidden, params)
        result = pb.StepResult()
        result.CopyFrom(inner)
        result.session_id, result.seq, result.degraded = self.session_id, seq, self.degraded
        return result
