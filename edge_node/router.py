"""The edge's router: each session's tokens come from the accurate path (the cloud tail) or the fast path (the edge's
fast tail), chosen per request and switched mid-generation when the deadline or the cloud demands it.

``Router`` holds what every session shares: the cloud client, the fast tail, the online estimates, the metrics
and the deployment's policy. ``Router.tail(kind)`` gives a ``RoutedTail``, the ``runtime.owner.Downstream`` of
ONE session (an HTTP session the edge owns, or a device session relayed from MQTT). It keeps the session's path
and the moves between paths; its parts: ``edge_node.session.Session`` (seq 0 chooses the path; the clock, the
budget and the estimates' view of them), ``runtime.history.SplitHistory`` (on the accurate path, the
split-point rows as they came: exactly what the cloud decoded), ``edge_node.speculation.Speculation`` (the
fast tail drafts, the cloud verifies) and ``edge_node.probe.LinkProbe`` (the link's estimates between sessions).

- a cloud replica that fails (not one that is slow): another replica (``edge_node.cloud``) gets the history
  replayed in one step and answers the current frame. It decodes what the failed one did, and restores the
  penalties' counts and the grammar's state from the tokens emitted so far: the same tokens.
- to the fast path (reason "deadline", or "cloud_error: ..." when the cloud times out or no replica is
  left): the cloud stream is closed, the fast tail replays the history in one step (answering the current
  frame), and the session never goes back. After a cloud failure every answer is ``degraded``; no request
  fails because the cloud did (unless it is INVALID_ARGUMENT, or the edge is shutting down).
Every step updates the estimates (``edge_node.estimates``).

n completions of one prompt share its prefill (``runtime.owner.share_prefill``: a RoutedTail
``forks_sessions``). A fork's first frame names its source, an HTTP session of this edge (``Frame.fork_of``),
and carries the prompt's last row; it goes where the source's cache is: a new stream to the source's
replica, the fork's history starting as a copy of the source's committed rows (a failover replays the whole
prompt), or the fast tail. A cloud without a copy of the source (NOT_FOUND, FAILED_PRECONDITION) gets the
fork's history replayed instead; a source not open here, or not in the fast tail, answers NOT_FOUND and the
owner prefills the prompt itself. No request fails because a fork could not be made.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import InitVar, dataclass, field

import grpc
import torch

from protos import splitglm_pb2 as pb
from protos.errors import CodecError
from protos.frames import decode_frame_hidden, make_frame
from protos.status import error_result
from runtime import tracing
from runtime.history import Seqs, SplitHistory, count_rows, remaining_params
from runtime.ledger import Ledger, StepError
from runtime.owner import FORK_REFUSED

from .estimates import Estimates
from .fast_tail import FastTail
from .policy import DEFAULT_MARGIN, DEFAULT_POLICY, Policy
from .probe import LinkProbe  # noqa: F401 -- the router's public API
from .session import Session, Upstream, server_ms
from .speculation import Drafting, Speculation

logger = logging.getLogger(__name__)

NOT_RETRIED = (grpc.StatusCode.INVALID_ARGUMENT.value[0],)  # the request itself is bad: no tail would serve it
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


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
    # the edge's own (HTTP) sessions by id, while open: the sources a fork may name
    sessions: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    drafting: Drafting = field(init=False)  # speculative split decoding (edge_node.speculation.Drafting)
    speculate: InitVar[bool] = True
    max_draft: InitVar[int] = 8
    fixed_draft: InitVar[int] = 0
    alpha_prior: InitVar[float] = 0.8

    def __post_init__(self, speculate: bool, max_draft: int, fixed_draft: int, alpha_prior: float):
        accurate = self.estimates.accurate  # the cloud's share of a decode step, ms: for speculation's costs
        verify_ms = accurate.get("step") - accurate.get("rtt")
        self.drafting = Drafting(speculate, max_draft, fixed_draft, alpha_prior, verify_ms)

    def tail(self, kind: str = "http") -> RoutedTail:
        return RoutedTail(self, kind)

    def close(self) -> None:
        """From now on steps fail (UNAVAILABLE) instead of falling back: the edge is shutting down."""
        self.closed.set()

    def count(self, what: str, **labels: str) -> None:
        """Count on the edge's metrics (``router_decision``, ``router_switch``, ``cloud_failover``), if any."""
        if self.metrics is not None:
            getattr(self.metrics, what)(**labels)


@dataclass
class Fork:
    """Where a fork's source session is: its path, whether it is degraded, and on the accurate path its cloud
    replica and a copy of its history up to the fork."""

    path: str
    degraded: bool = False
    replica: object | None = None  # edge_node.cloud.Replica
    history: SplitHistory | None = None


def fork_history(history: SplitHistory, length: int) -> SplitHistory:
    """A new history of ``history``'s committed rows [0, length)."""
    out, decoded = SplitHistory(), history.tensor()  # (length', C)
    for rows in history.rows:
        if out.length >= length:
            break
        out.commit(out.length, rows, decoded[out.length : out.length + count_rows(rows)])
    out.truncate(length)
    return out


class RoutedTail:
    """The tail of one session: ``step(frame) -> StepResult`` on the path the router chose; ``close(frame)``."""

    forks_sessions = True  # a first frame may fork another session's cache (``Frame.fork_of``; module doc)

    def __init__(self, router: Router, kind: str):
        self.router = router
        self.session = Session(router, kind)
        self.path = ""  # "accurate" | "fast", once chosen
        self.cloud = router.cloud.tail(kind)  # no call is made until the first accurate step
        self.seqs = Seqs()  # the session's seqs as its current tail (cloud stream, fast tail) knows them
        self.history: SplitHistory | None = None  # the split-point rows, while on the accurate path
        self.spec: Speculation | None = None  # while on the accurate path, if the session drafts for the cloud
        self.degraded = False
        self.fork_of = ""  # the session whose cache this one's first step forks
        self.closed = False
        self.ledger = Ledger()  # the answer to a repeated frame
        self.answered_at: float | None = None  # perf_counter() when the last answer left
        self._lock = threading.Lock()  # one step at a time

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
            s = self.session
            if s.params is None:
                refused = self._start(frame, hidden)
                if refused is not None:
                    return refused
            elif self.answered_at is not None:
                self.router.upstream.observe(s.kind, (arrived - self.answered_at) * 1e3)
            if self.path == "accurate":
                result = self._accurate(frame, hidden)
            else:
                result = self._fast(frame.seq, frame.start_pos, hidden)
            if self.spec is not None:
                self.spec.spent((time.perf_counter() - arrived) * 1e3)
            if result.error:
                return result
            if frame.seq == 0:
                result.predicted_ms, result.policy = s.predicted_ms, s.policy.value
            s.tokens.extend(result.tokens)
            self.ledger.record(frame.seq, result)
            self.answered_at = time.perf_counter()
            return result

    def close(self, frame: pb.Frame) -> None:
        """Free the session on whichever tails hold it (best effort, never blocks on a step)."""
        self.closed = True
        if self.router.sessions.get(self.session.session_id) is self:
            self.router.sessions.pop(self.session.session_id, None)
        on_fast = self.path == "fast"
        if on_fast or self.spec is not None:
            self.router.fast.close(frame.session_id or self.session.session_id)  # its fast-path and draft caches
        self.history, self.spec = None, None
        if not on_fast:  # (a session that moved to the fast path has closed or lost its cloud stream)
            out = pb.Frame()
            out.CopyFrom(frame)
            out.seq = self.seqs.sent
            self.cloud.close(out)

    def cancel(self) -> None:
        """Abandon the cloud stream at once (the edge is stopping)."""
        self.cloud.cancel()

    def fork_point(self, length: int) -> Fork | None:
        """Where a session that forks this one's positions [0, length) starts (after this one's step in
        flight); None when this one cannot be forked now (closed, or not that far)."""
        with self._lock:
            if self.closed or not self.path:
                return None
            if self.path == "fast":
                return Fork("fast", self.degraded)
            if self.history is None or self.history.length < length or self.cloud.replica is None:
                return None
            return Fork("accurate", self.degraded, self.cloud.replica, fork_history(self.history, length))

    def _start(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult | None:
        """Choose the path from seq 0 (a fork: its source's); an error result if the frame cannot start a
        session (for a fork without a source to copy, NOT_FOUND with nothing started)."""
        if frame.seq != 0:
            return error_result(frame.session_id, frame.seq, "NOT_FOUND",
                                f"unknown session {frame.session_id!r} (a session starts at seq 0)")
        fork = self._fork_source(frame) if frame.fork_of else None
        if isinstance(fork, pb.StepResult):
            return fork
        try:
            self.path = self.session.start(frame, hidden, fork.path if fork is not None else "")
        except ValueError as e:
            return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT", f"edge router: {e}")
        if self.session.kind == "http":
            self.router.sessions[frame.session_id] = self
        if fork is not None:
            self.fork_of, self.degraded = frame.fork_of, fork.degraded
        if self.path == "accurate":
            self.history = SplitHistory() if fork is None else fork.history
            if fork is not None:  # the replica that holds the source's cache
                self.cloud = self.router.cloud.tail(self.session.kind, fork.replica)
            if self.router.drafting.wanted(self.session.params):
                try:
                    self.spec = Speculation(self.router, self.session, self.history, self._cloud,
                                            fork=(frame.fork_of, frame.start_pos) if fork is not None else None)
                except StepError as e:  # its parameters or grammar: no tail would take them
                    return error_result(frame.session_id, frame.seq, e.status, f"edge fast tail: {e}")
        return None

    def _fork_source(self, frame: pb.Frame) -> Fork | pb.StepResult:
        """Where the source of a fork is, or the error that answers the fork."""
        if self.session.kind != "http":
            return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT",
                                "edge router: only the edge's own sessions fork another's cache")
        source = self.router.sessions.get(frame.fork_of)
        fork = source.fork_point(frame.start_pos) if source is not None else None
        if fork is None:
            return error_result(frame.session_id, frame.seq, "NOT_FOUND",
                                f"edge router: session {frame.fork_of!r} is not open here to fork")
        return fork

    def _forget(self, refused: pb.StepResult) -> pb.StepResult:
        """A fork the fast tail could not make: the session starts over (the owner prefills it at seq 0)."""
        self.router.sessions.pop(self.session.session_id, None)
        self.router.fast.close(self.session.session_id)  # (whatever of it the fast tail opened)
        self.session, self.path, self.fork_of, self.seqs = Session(self.router, self.session.kind), "", "", Seqs()
        self.degraded = False
        return refused

    # ---- the accurate path ---------------------------------------------------------------------------

    def _accurate(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """Step the cloud (or move to the fast path first when the deadline is at risk); or speculate."""
        s, spec = self.session, self.spec
        if spec is not None and spec.round is not None:
            return spec.step(frame, hidden)
        try:
            self.history.commit(frame.start_pos, frame.hidden, hidden)
        except ValueError as e:
            return error_result(frame.session_id, frame.seq, "FAILED_PRECONDITION", f"session {s.session_id!r}: {e}")
        if s.tokens_done > 0 and s.deadline_at_risk():
            return self._to_fast(frame.seq, "deadline")
        drafts = spec.drafts_for_round() if spec is not None and s.tokens_done > 0 else 0
        if drafts:  # a round starts: this frame's row is the last committed token
            return spec.start(frame, hidden, drafts)
        out = pb.Frame()
        out.CopyFrom(frame)
        result, wall_ms = self._cloud(out, frame.seq)
        if wall_ms is not None:
            s.observe_accurate(int(hidden.shape[0]), wall_ms, result)
        return result

    def _cloud(self, out: pb.Frame, seq: int) -> tuple[pb.StepResult, float | None]:
        """``out`` to the cloud, answering frame ``seq``: its answer and wall ms; when the cloud fails, the answer
        of another replica or of the fast path, or the error when no tail would serve it (and no wall ms)."""
        result, wall_ms = self._cloud_step(out, seq)
        if not result.error:
            return result, wall_ms
        if result.status in NOT_RETRIED or self.router.closed.is_set():
            return result, None
        if out.fork_of and result.status in FORK_REFUSED:
            return self._unforked(seq, result), None
        if result.status == DEADLINE_EXCEEDED and self.session.tokens_done > 0 and not out.draft_tokens:
            self.router.estimates.accurate.observe_step(wall_ms)  # the step took at least this long
        self.cloud.cancel()
        moved = self._to_replica(seq, result)
        if moved is None:
            moved = self._to_fast(seq, f"cloud_error: {result.error}", degraded=True)
        return moved, None

    def _cloud_step(self, out: pb.Frame, seq: int) -> tuple[pb.StepResult, float]:
        """One frame to the cloud, in the cloud stream's seqs; its answer, as frame ``seq``'s, and the wall ms."""
        s = self.session
        out.seq = self.seqs.sent
        out.deadline_unix_ms = 0  # the router keeps the budget; the cloud must not drop a late step
        self.cloud.step_timeout_s = s.cloud_wait_s(self.history.length)
        started = time.perf_counter()
        result = self.cloud.step(out)
        wall_ms = (time.perf_counter() - started) * 1e3
        if not result.error:
            self.seqs.took()
            if s.tokens_done > 0:  # (a prefill is no decode step)
                self.router.drafting.observe_verify(server_ms(result))
        answer = pb.StepResult()
        answer.CopyFrom(result)
        answer.seq = seq
        return answer, wall_ms

    def _unforked(self, seq: int, refused: pb.StepResult) -> pb.StepResult:
        """The cloud holds no copy of the fork's source: a new stream on the same replica gets the fork's history
        (the source's prompt rows, then its own) in one step, as a replay."""
        s = self.session
        logger.info("session %s: the cloud did not fork %s (%s); replaying its %d positions", s.session_id,
                    self.fork_of, refused.error, self.history.length)
        self.cloud.cancel()
        self.cloud = self.router.cloud.tail(s.kind, self.cloud.replica)
        self.seqs.restart(seq)
        return self._cloud(self.history.replay_frame(s.session_id, s.params, s.tokens), seq)[0]

    def _to_replica(self, seq: int, failed: pb.StepResult) -> pb.StepResult | None:
        if not tracing.enabled:
            return self._move_to_replica(seq, failed)
        with tracing.span("router.failover", session_id=self.session.session_id, seq=seq,
                          failed_replica=self.cloud.target, status=failed.status) as span:
            moved = self._move_to_replica(seq, failed)
            span.set_attributes({"moved": moved is not None, "replica": self.cloud.target})
            return moved

    def _move_to_replica(self, seq: int, failed: pb.StepResult) -> pb.StepResult | None:
        """The cloud replica failed: replay the history on another replica (a new stream), which answers the
        token after it; None when no replica takes it (then the fast path does)."""
        if failed.status == DEADLINE_EXCEEDED or self.router.closed.is_set():
            return None  # a slow cloud, not a dead one: the budget is better spent on the fast path
        s, end = self.session, self.history.length
        for replica in self.router.cloud.replicas_for(self.cloud.replica):
            self.cloud = self.router.cloud.tail(s.kind, replica)
            self.seqs.restart(seq)
            out = self.history.replay_frame(s.session_id, s.params, s.tokens)
            result, wall_ms = self._cloud_step(out, seq)
            if not result.error:
                self.router.count("cloud_failover", outcome="moved")
                logger.warning("session %s: moved to cloud replica %s at token %d (%s); replayed %d positions in "
                               "%.1f ms", s.session_id, replica.target, s.tokens_done, failed.error, end, wall_ms)
                result.next_pos = end  # (after a round's drafts: the owner rewinds to the token after the committed)
                return result
            self.cloud.cancel()
            if result.status in NOT_RETRIED:
                break
        self.router.count("cloud_failover", outcome="none_left")
        return None

    # ---- the fast path ------------------------------------------------------------------------------

    def _to_fast(self, seq: int, reason: str, degraded: bool = False) -> pb.StepResult:
        if not tracing.enabled:
            return self._move_to_fast(seq, reason, degraded)
        with tracing.span("router.switch", session_id=self.session.session_id, seq=seq, to="fast",
                          reason=reason.split(":")[0], degraded=degraded, positions=self.history.length):
            return self._move_to_fast(seq, reason, degraded)

    def _move_to_fast(self, seq: int, reason: str, degraded: bool = False) -> pb.StepResult:
        """Leave the cloud for good: the fast tail replays the history and answers the token after it, as frame
        ``seq``; the owner goes on after the history."""
        s, end = self.session, self.history.length
        if not degraded:
            self.cloud.close(make_frame(s.session_id, self.seqs.sent, end, None, close=True))
        if self.spec is not None:
            self.router.fast.close(s.session_id)  # its draft cache: the fast path's session is new
        self.path, self.spec, self.degraded = "fast", None, self.degraded or degraded
        self.seqs.restart(seq)
        history, self.history = self.history.tensor(), None  # (positions, C)
        started = time.perf_counter()
        result = self._fast_step(seq, 0, history, remaining_params(s.params, s.tokens))
        replay_ms = (time.perf_counter() - started) * 1e3
        if result.error:
            return result
        self.router.estimates.fast.observe_replay(end, replay_ms)
        result.switch_reason = reason
        self.router.count("router_switch", reason=reason.split(":")[0])
        log = logger.warning if degraded else logger.info
        log("session %s: fast path from token %d (%s); replayed %d positions in %.1f ms",
            s.session_id, s.tokens_done, reason, end, replay_ms)
        result.next_pos = end  # (after a round's drafts: the owner rewinds to the token after the committed one)
        return result

    def _fast(self, seq: int, start_pos: int, hidden: torch.Tensor) -> pb.StepResult:
        """A step of a session already on the fast path (seq 0 of a session that started there: its prefill)."""
        first = seq == self.seqs.base
        started = time.perf_counter()
        fork_of = self.fork_of if first else ""
        result = self._fast_step(seq, start_pos, hidden, self.session.params if first else None, fork_of)
        wall_ms = (time.perf_counter() - started) * 1e3
        if fork_of and result.status in FORK_REFUSED:
            return self._forget(result)
        if not result.error and first:
            self.router.estimates.fast.observe_prefill(int(hidden.shape[0]), wall_ms)
        elif not result.error:
            self.router.estimates.fast.observe_step(wall_ms)
        return result

    def _fast_step(self, seq: int, start_pos: int, hidden: torch.Tensor, params, fork_of: str = "") -> pb.StepResult:
        """The fast tail's answer, renumbered from its own seqs to the frame's."""
        s = self.session
        inner = self.router.fast.step(s.session_id, self.seqs.of(seq), start_pos, hidden, params, fork_of)
        result = pb.StepResult()
        result.CopyFrom(inner)
        result.session_id, result.seq, result.degraded = s.session_id, seq, self.degraded
        return result
