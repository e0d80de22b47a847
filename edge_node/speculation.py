"""Speculative split decoding at the edge: how many tokens to draft (pure maths), and the rounds themselves.

A round of speculative split decoding: the owner runs its layers on the last committed token and on g
drafted ones (g + 1 owner steps), the edge's fast tail drafts g tokens, and the cloud verifies the g + 1
positions in one step. With each draft accepted with probability alpha, as long as the ones before it
were (the standard model of speculative decoding), a round yields on average

    E(g) = (1 - alpha^(g+1)) / (1 - alpha)          tokens (g + 1 when alpha = 1)

and takes

    T(g) = (g + 1) * owner + g * draft + rtt + verify + g * verify_row     milliseconds

(owner: the owner's step and its hops to the edge; draft: a fast-tail step; rtt: the edge-cloud round
trip; verify: the cloud's step; verify_row: what each extra verified position adds to it). The edge
maximises the expected accurate tokens per second, E(g) / T(g), over 0 <= g <= max_draft; g = 0 is the
plain accurate path (one token per round trip), chosen whenever no g > 0 beats it.

``Speculation`` runs one session's rounds at the edge (``edge_node.router``'s RoutedTail delegates to it
while the session is on the accurate path): the frame of a committed token starts a round of g drafts; the
fast tail drafts each token (``draft_tokens``: the owner runs it, nothing is emitted); the row of the last
draft sends the round's g + 1 rows to the cloud in one verification frame; the accepted drafts' rows are
committed to the split-point history and the owner rewinds to ``next_pos``, after them. ``Drafting`` is
what the sessions share: the settings and the cloud's verify time.

Drafts are sampled with the session's whole state, as the cloud samples: a ``runtime.generation.TokenState``
of the session's parameters (penalties, logit bias, top-k / min-p, the grammar compiled by the fast tail's
``Grammars``), committed to the tokens the session has emitted at each round's start; the round drafts
into a fork of it, each draft committed to the fork. So a draft is the token the cloud samples there
whenever the fast tail's logits agree, and the output is the plain path's either way (the cloud accepts
only drafts equal to its own tokens).

The draft cache of a fork (n completions of one prompt) starts from its source's draft cache where that
one holds the prompt (``FastTail.fork_draft``); else it catches up from the history like any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from protos import splitglm_pb2 as pb
from protos.codecs import join_rows
from protos.status import error_result
from runtime import tracing
from runtime.generation import TokenState
from runtime.grammar import GrammarError
from runtime.history import SplitHistory
from runtime.terminal import token_state

from .estimates import RobustStat
from .session import Session, server_ms


@dataclass(frozen=True)
class RoundCosts:
    """What one round costs, milliseconds (see the module docstring)."""

    owner_ms: float
    draft_ms: float
    rtt_ms: float
    verify_ms: float
    verify_row_ms: float = 0.0


def expected_tokens(alpha: float, g: int) -> float:
    """Mean tokens a round of g drafts yields (accepted drafts + the cloud's own token)."""
    if alpha >= 1.0:
        return g + 1.0
    return (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


def round_ms(costs: RoundCosts, g: int) -> float:
    c = costs
    return (g + 1) * c.owner_ms + g * c.draft_ms + c.rtt_ms + c.verify_ms + g * c.verify_row_ms


def tokens_per_s(alpha: float, costs: RoundCosts, g: int) -> float:
    return 1e3 * expected_tokens(alpha, g) / max(round_ms(costs, g), 1e-6)


def best_draft(alpha: float, costs: RoundCosts, max_draft: int, at_least: int = 0) -> int:
    """The g in [at_least, max_draft] with the most expected tokens per second (0, with at_least 0, unless
    speculating beats it by more than 2%)."""
    rates = {g: tokens_per_s(alpha, costs, g) for g in range(at_least, max_draft + 1)}
    best = max(rates, key=lambda g: (rates[g], -g))
    if at_least == 0 and rates[best] <= rates[0] * 1.02:  # a margin: not for a 2% gain
        return 0
    return best


class Acceptance:
    """Per-draft acceptance probability, estimated from verifications (thread-safe).

    A verification of g drafts that accepted a of them saw a successes and, when a < g, one failure (the
    first rejected draft; the ones after it were never judged). alpha = successes / trials, starting from a
    prior worth ``prior_weight`` trials at ``prior``, everything decayed by ``decay`` per verification.
    """

    def __init__(self, prior: float = 0.8, prior_weight: float = 4.0, decay: float = 0.95):
        self.decay = decay
        self._successes, self._trials = prior * prior_weight, prior_weight
        self._lock = threading.Lock()

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        with self._lock:
            self._successes = self._successes * self.decay + accepted
            self._trials = self._trials * self.decay + accepted + (1 if accepted < drafted else 0)

    @property
    def alpha(self) -> float:
        with self._lock:
            return min(max(self._successes / max(self._trials, 1e-9), 0.0), 0.999)


class Drafting:
    """What a router's sessions share for speculation: its settings, and the cloud's time for a verification
    step, ms (thread-safe). ``max_draft``: drafts a round at most; ``fixed``: > 0 drafts that many every round
    instead of choosing; ``alpha_prior``: the acceptance assumed before any is seen."""

    def __init__(self, enabled: bool, max_draft: int, fixed: int, alpha_prior: float, verify_ms: float):
        self.enabled, self.max_draft, self.fixed, self.alpha_prior = enabled, max_draft, fixed, alpha_prior
        self._verify_ms = RobustStat(max(verify_ms, 1.0))
        self._lock = threading.Lock()

    def wanted(self, params: pb.GenerationParams) -> bool:
        """Whether a session with ``params`` drafts for the cloud (its own ``speculate`` wins)."""
        return self.enabled and params.speculate != pb.SPECULATE_OFF or params.speculate == pb.SPECULATE_ON

    def observe_verify(self, ms: float) -> None:
        with self._lock:
            self._verify_ms.observe(ms)

    def verify_ms(self) -> float:
        with self._lock:
            return self._verify_ms.value("mean")


@dataclass
class Round:
    """A speculative round in progress: the committed token's row, and the drafts so far (their rows wait in
    the history's drafts)."""

    base: int  # position of the committed token
    g: int  # drafts this round
    head: pb.EncodedTensor  # the committed token's row as it arrived
    state: TokenState  # the committed tokens and this round's drafts
    drafts: list[int] = field(default_factory=list)
    tails_ms: float = 0.0  # time this round's frames spent at the edge's tails


Verify = Callable[[pb.Frame, int], tuple[pb.StepResult, float | None]]


class Speculation:
    """One session's speculative rounds; ``verify(frame, seq)`` sends a verification to the cloud and gives its
    answer and wall ms (None when the cloud failed: the answer then came from the session's new tail).
    StepError INVALID_ARGUMENT when the session's parameters or grammar cannot be drafted with."""

    def __init__(self, router: object, session: Session, history: SplitHistory, verify: Verify,
                 fork: tuple[str, int] | None = None):
        self.router, self.session = router, session  # router: edge_node.router.Router
        self.history, self.verify = history, verify
        self.fork = fork  # (source session, positions): a fork's draft cache may start from its source's
        self.state = token_state(session.params, router.fast.grammars)  # at the tokens the session emitted
        self.synced = 0  # of session.tokens, those committed to ``state``
        self.acceptance = Acceptance(router.drafting.alpha_prior)
        self.round: Round | None = None
        self.draft_len = 0  # positions the fast tail's draft session holds

    def drafts_for_round(self) -> int:
        """g for the round starting now (0: a plain accurate step), from the acceptance and the costs."""
        s, r = self.session, self.router
        d = r.drafting
        cap = min(d.max_draft, s.params.max_tokens - s.tokens_done - 1)
        if cap <= 0:
            return 0
        if d.fixed:
            return min(d.fixed, cap)
        est = r.estimates.accurate
        costs = RoundCosts(owner_ms=r.upstream.get(s.kind), draft_ms=r.estimates.fast.get("step"),
                           rtt_ms=est.get("rtt"), verify_ms=d.verify_ms(), verify_row_ms=est.get("prefill"))
        forced = 1 if s.params.speculate == pb.SPECULATE_ON else 0  # asked for: at least one draft
        return best_draft(self.acceptance.alpha, costs, cap, at_least=forced)

    def start(self, frame: pb.Frame, hidden: torch.Tensor, g: int) -> pb.StepResult:
        """A round of ``g`` drafts starts: ``frame``'s row (committed) is the last committed token's."""
        emitted = self.session.tokens
        try:
            self.state.commit(emitted[self.synced :])
        except GrammarError as e:
            return self._refused(frame, e)
        self.synced = len(emitted)
        self.round = Round(frame.start_pos, g, pb.EncodedTensor(), self.state.fork())
        self.round.head.CopyFrom(frame.hidden)
        return self._draft_step(frame, hidden)

    def step(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """The row of the latest draft: draft again, or send the round to the cloud for verification."""
        r, h = self.round, self.history
        expected = h.length + len(h.drafts)  # (r.base + 1 + the draft rows so far)
        if frame.start_pos != expected or hidden.shape[0] != 1:
            return error_result(frame.session_id, frame.seq, "FAILED_PRECONDITION",
                                f"session {self.session.session_id!r}: the draft of position {expected} "
                                f"comes as one row there, not {hidden.shape[0]} at {frame.start_pos}")
        h.draft(frame.start_pos, frame.hidden, hidden)
        stopped = r.drafts[-1] in self.session.params.stop_token_ids
        if len(r.drafts) < r.g and not stopped:
            return self._draft_step(frame, hidden)
        return self._verify(frame)

    def spent(self, ms: float) -> None:
        """A frame of the round in progress (if any) spent ``ms`` at the edge's tails."""
        if self.round is not None:
            self.round.tails_ms += ms

    def _draft(self, start_pos: int, hidden: torch.Tensor) -> int:
        """The fast tail's draft after ``hidden`` (one row at start_pos), catching its cache up first."""
        rows, at = hidden, start_pos
        if self.fork is not None:  # a fork's first draft: its source's draft cache, if it holds the prompt
            (source, length), self.fork = self.fork, None
            if self.draft_len < length and self.router.fast.fork_draft(source, self.session.session_id, length):
                self.draft_len = length
        if self.draft_len < start_pos:  # positions it has not seen: from the cloud-bound history
            rows, at = torch.cat([self.history.tensor()[self.draft_len : start_pos], hidden]), self.draft_len
        started = time.perf_counter()
        token = self.router.fast.draft(self.session.session_id, at, rows, self.round.state)
        self.round.state.commit([token])
        if rows.shape[0] == 1:  # a draft is a fast-tail decode step
            self.router.estimates.fast.observe_step((time.perf_counter() - started) * 1e3)
        self.draft_len = start_pos + 1
        return token

    def _draft_step(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """Draft one token and hand it to the owner to run (not emitted: it is not verified yet)."""
        try:
            token = self._draft(frame.start_pos, hidden)
        except GrammarError as e:
            return self._refused(frame, e)
        self.round.drafts.append(token)
        return pb.StepResult(session_id=frame.session_id, seq=frame.seq, draft_tokens=[token],
                             next_pos=frame.start_pos + 1, path=pb.ACCURATE)

    def _refused(self, frame: pb.Frame, error: GrammarError) -> pb.StepResult:
        """The session's grammar failed at the fast tail: the round ends, the step answers INVALID_ARGUMENT."""
        self.round = None
        return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT",
                            f"edge fast tail: session {self.session.session_id!r}: {error}")

    def _verify(self, frame: pb.Frame) -> pb.StepResult:
        if not tracing.enabled:
            return self._verify_round(frame)
        with tracing.span("speculation.round", session_id=self.session.session_id, seq=frame.seq,
                          start_pos=self.round.base, drafts=len(self.round.drafts)) as span:
            result = self._verify_round(frame)
            span.set_attributes({"accepted": result.accepted, "tokens": len(result.tokens), "status": result.status})
            return result

    def _verify_round(self, frame: pb.Frame) -> pb.StepResult:
        """One cloud step over the round's g + 1 rows; the accepted tokens, and where the owner goes on."""
        r, self.round = self.round, None
        out = pb.Frame(session_id=frame.session_id, seq=frame.seq, start_pos=r.base, draft_tokens=r.drafts)
        out.hidden.CopyFrom(join_rows([r.head, *self.history.drafts]))  # the rows exactly as they came
        result, wall_ms = self.verify(out, frame.seq)
        if wall_ms is None:  # no verification: the drafts' rows go; the owner rewinds to r.base + 1
            self.history.settle(r.base + 1)
            return result
        self.history.settle(r.base + 1 + result.accepted)  # the cloud now holds the accepted drafts' rows too
        self.acceptance.observe(len(r.drafts), result.accepted)
        self._observe_round(r, wall_ms, result)
        result.next_pos = r.base + 1 + result.accepted  # the owner rewinds there: rejected drafts are dropped
        return result

    def _observe_round(self, r: Round, wall_ms: float, result: pb.StepResult) -> None:
        """The estimates see a round as steps of (the tails' time of the round) / (tokens it gave)."""
        per_token = (r.tails_ms + wall_ms) / max(len(result.tokens), 1)
        self.router.estimates.accurate.observe_step(per_token, max(wall_ms - server_ms(result), 0.0))
        self.router.last_accurate = time.monotonic()
        if self.router.metrics is not None:
            self.router.metrics.speculation(len(r.drafts), result.accepted, len(result.tokens))
