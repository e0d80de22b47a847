"""The terminal tier: the one type that samples (the cloud, the edge fast tail and the local chain wrap it).

``Terminal`` is a segment with the head, the sampling state of its sessions (``TailSessions``) and, for
the cloud, the runtime's ``Scheduler``: ``step(frame, hidden)`` answers a frame now (the fast tail, the
local chain), ``submit(frame, hidden)`` queues it for a batched forward pass (the cloud). ``status_of`` is
the one mapping from a step's failure to its gRPC status and message; every tier answers errors with it.

``TailSessions`` admits frames, samples, ends generations and answers repeated steps the same way on
every terminal:

- ``accept(frame)``: checks the frame against the session (new sessions start at seq 0 with parameters;
  seq follows; a repeated seq is answered again from the stored result without recomputing; a session
  that has generated its ``max_tokens`` takes no more steps);
- ``work(frame, hidden)``: the segment input of an accepted frame, asking the segment to sample the token
  after its last position with the session's parameters -- and, for a speculative verification (a frame
  with ``draft_tokens``: the last committed token and g drafts), after each of its g + 1 positions;
- ``answer(frame, sampled, path)``: records the sampled token(s) and says whether the generation ended (a
  stop token, or ``max_tokens`` tokens). A verification accepts the longest prefix of drafts equal to the
  tokens sampled at their positions and answers that prefix plus its own next token (1 to g + 1 tokens);
  the next frame then starts after the accepted positions, which rewinds the cache (a length change).

A new session may fork another's cache (``Frame.fork_of``: several completions of one prompt): its first
frame carries only the rows from ``start_pos`` on; the segment starts it from the source's positions
[0, start_pos), shared copy-on-write. For sampling it is a new session like any other. ``counts`` tells
the positions run by first frames and those forked instead (a prompt shared by n completions is
prefilled once).

A sampled token's random draw depends only on the session's seed and the token's position
(``sampling.draw_uniform``), not on the tier or on the draws before it: the fast tail that takes over a
session mid-generation draws exactly what the cloud would have, and a repeated step draws the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from protos import splitglm_pb2 as pb
from protos.errors import CodecError, SizeLimitError
from protos.status import error_result
from runtime.generation import TokenState, prefetches_masks
from runtime.grammar import GrammarError, Grammars
from runtime.kv_pool import PoolExhausted
from runtime.ledger import Ledger, StepError, idle
from runtime.sampling import SamplingParams
from runtime.scheduler import QueueFull, Scheduler, SchedulerClosed
from runtime.step import Sampled, SegmentInput, SessionError

__all__ = ["DRAFT", "Limits", "StepError", "TailSession", "TailSessions", "Terminal", "Wording", "sampling_params",
           "status_of"]

logger = logging.getLogger(__name__)
DRAFT = "#draft"  # a draft session's id: the session's, with this after it


def status_of(error: BaseException, *, closed: str = "the service is shutting down", failed: str = "step failed",
              log: str = "") -> tuple[str, str]:
    """The gRPC status name and message that answer a step's failure: the one mapping every tier uses.

    A refusal keeps its own message: a ``StepError`` its status, a bad frame INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED when too large), a step that does not follow its session's cache
    FAILED_PRECONDITION, a full KV pool or queue RESOURCE_EXHAUSTED. A stopped scheduler is UNAVAILABLE
    with ``closed``. Anything else is a bug: INTERNAL, ``failed`` followed by the error's type (and by
    ``log``, the log that holds its traceback, logged here).
    """
    if isinstance(error, StepError):
        return error.status, str(error)
    if isinstance(error, CodecError):
        return "RESOURCE_EXHAUSTED" if isinstance(error, SizeLimitError) else "INVALID_ARGUMENT", str(error)
    if isinstance(error, SessionError):
        return "FAILED_PRECONDITION", str(error)
    if isinstance(error, (PoolExhausted, QueueFull)):
        return "RESOURCE_EXHAUSTED", str(error)
    if isinstance(error, SchedulerClosed):
        return "UNAVAILABLE", closed
    logger.error("%s", failed, exc_info=error)
    return "INTERNAL", f"{failed} ({type(error).__name__}{f'; see {log}' if log else ''})"


@dataclass(frozen=True)
class Wording:
    """How a terminal words the failures it answers (``status_of``'s arguments, per frame)."""

    prefix: str = ""  # put before every message
    closed: str = "the service is shutting down"  # its scheduler has stopped
    failed: str = "step failed"  # an unexpected error; may name the frame's {seq} and {session}
    log: str = ""  # the log that holds an unexpected error's traceback

    def status(self, error: BaseException, frame: pb.Frame) -> tuple[str, str]:
        failed = self.failed.format(seq=frame.seq, session=repr(frame.session_id))
        status, message = status_of(error, closed=self.closed, failed=failed, log=self.log)
        return status, self.prefix + message


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 1024  # sessions held at once
    max_batch: int = 32  # sessions per forward pass
    max_tokens: int = 4096  # tokens a session may ask for
    max_positions: int = 8192  # cached positions per session
    session_ttl_s: float = 300.0  # idle sessions are freed after, seconds
    prefill_chunk: int = 256  # prompt positions per step (a long prompt delays decode steps by one chunk)
    max_draft: int = 8  # drafted tokens a verification frame may carry


@dataclass
class TailSession:
    params: pb.GenerationParams
    state: TokenState  # the sampling parameters, the tokens generated (replayed ones too), the grammar
    generated: int = 0  # tokens sampled so far by this tier (max_tokens counts what is left at a replay)
    ledger: Ledger = field(default_factory=Ledger)
    compile_ms: float = 0.0  # the grammar's compile time (reported once, with the first answer)

    @property
    def sampling(self) -> SamplingParams:
        return self.state.sampling


def sampling_params(params: pb.GenerationParams) -> SamplingParams:
    """Sampling parameters from the wire; StepError INVALID_ARGUMENT if out of range."""
    top_p = params.top_p if 0 < params.top_p < 1 else 1.0
    repetition = params.repetition_penalty if params.repetition_penalty else 1.0
    try:
        return SamplingParams(temperature=params.temperature, top_p=top_p, seed=params.seed, top_k=params.top_k,
                              min_p=params.min_p, presence_penalty=params.presence_penalty,
                              frequency_penalty=params.frequency_penalty, repetition_penalty=repetition,
                              logit_bias=tuple(sorted(params.logit_bias.items())), top_logprobs=params.top_logprobs)
    except ValueError as e:
        raise StepError("INVALID_ARGUMENT", f"generation parameters: {e}") from None


def token_state(params: pb.GenerationParams, grammars: Grammars | None, prefetch: bool = True) -> TokenState:
    """A new generation's TokenState from its first frame's params (replayed tokens included); StepError
    INVALID_ARGUMENT for bad parameters or a grammar that cannot be used (the reason named). ``prefetch``:
    ``TokenState``'s."""
    sampling = sampling_params(params)
    matcher = None
    if params.HasField("grammar") and params.grammar.kind:
        if grammars is None:
            raise StepError("INVALID_ARGUMENT", "this tier cannot apply a grammar (it has no vocabulary)")
        try:
            matcher = grammars.matcher(params.grammar.kind, params.grammar.text)
        except GrammarError as e:
            raise StepError("INVALID_ARGUMENT", str(e)) from None
    bad = next((t for t in list(params.generated_tokens) + list(params.logit_bias) if grammars is not None
                and t >= grammars.vocab.vocab_size), None)
    if bad is not None:
        raise StepError("INVALID_ARGUMENT", f"token id {bad} is not in the vocabulary")
    try:
        return TokenState(sampling, matcher, params.generated_tokens, prefetch=prefetch)
    except GrammarError as e:
        raise StepError("INVALID_ARGUMENT", f"the replayed tokens do not follow the grammar: {e}") from None


class TailSessions:
    """Sampling state of the sessions a terminal segment serves."""

    def __init__(self, max_sessions: int = 1024, max_tokens: int = 4096, grammars: Grammars | None = None,
                 prefetch: bool = True):
        self.max_sessions, self.max_tokens, self.grammars = max_sessions, max_tokens, grammars
        self.prefetch = prefetch  # (``TokenState``'s: ``prefetches_masks`` of the segment)
        self.sessions: dict[str, TailSession] = {}

    def accept(self, frame: pb.Frame) -> pb.StepResult | None:
        """Check a (non-close) frame; return the stored answer if it repeats the last step, else None."""
        state = self.sessions.get(frame.session_id)
        if state is None:
            if frame.seq != 0:
                raise StepError("NOT_FOUND", f"unknown session {frame.session_id!r} (a session starts at seq 0)")
            self._open(frame)
            return None
        stored = state.ledger.repeat(frame.session_id, frame.seq)
        if stored is None and state.generated >= state.params.max_tokens:
            raise StepError("RESOURCE_EXHAUSTED", f"session {frame.session_id!r} has already generated its "
                            f"max_tokens {state.params.max_tokens} tokens")
        return stored

    def _open(self, frame: pb.Frame) -> None:
        if not frame.session_id or len(frame.session_id) > 128:
            raise StepError("INVALID_ARGUMENT", "session_id must be 1-128 characters")
        if len(self.sessions) >= self.max_sessions:
            raise StepError("RESOURCE_EXHAUSTED", f"too many sessions: the limit is {self.max_sessions}")
        if not frame.HasField("params") or frame.params.max_tokens == 0:
            raise StepError("INVALID_ARGUMENT", "the first frame of a session carries params with max_tokens >= 1")
        if frame.params.max_tokens > self.max_tokens:
            raise StepError(
                "RESOURCE_EXHAUSTED", f"max_tokens {frame.params.max_tokens} exceeds the limit {self.max_tokens}"
            )
        started = time.perf_counter()
        state = token_state(frame.params, self.grammars, self.prefetch)
        compile_ms = (time.perf_counter() - started) * 1e3 if state.matcher is not None else 0.0
        params = pb.GenerationParams()
        params.CopyFrom(frame.params)
        params.ClearField("generated_tokens")
        self.sessions[frame.session_id] = TailSession(params, state, compile_ms=compile_ms)

    def work(self, frame: pb.Frame, hidden: torch.Tensor) -> SegmentInput:
        """The segment input of an accepted frame: its rows (T, C), sampling the token after the last one
        (after each of its last g + 1 rows for a verification of g drafts)."""
        state = self.sessions[frame.session_id]
        drafts = len(frame.draft_tokens)
        if drafts and drafts + 1 != hidden.shape[0]:
            raise StepError("INVALID_ARGUMENT", f"a verification of {drafts} drafts must carry {drafts + 1} "
                            f"rows; this one carries {hidden.shape[0]}")
        first = frame.start_pos + int(hidden.shape[0]) - drafts  # the position of the first token sampled
        try:
            rows = state.state.rows(first, list(frame.draft_tokens))
        except GrammarError as e:
            raise StepError("INVALID_ARGUMENT", str(e)) from None
        return SegmentInput(frame.session_id, frame.start_pos, hidden=hidden, sample=rows)

    def answer(self, frame: pb.Frame, sampled: Sampled, path: int = pb.ACCURATE) -> pb.StepResult:
        """Record the token(s) sampled for ``frame`` and the step's answer."""
        state = self.sessions[frame.session_id]
        drafts = list(frame.draft_tokens)
        accepted = 0
        while accepted < len(drafts) and sampled.tokens[accepted] == drafts[accepted]:
            accepted += 1
        tokens, logprobs = sampled.tokens[: accepted + 1], sampled.logprobs[: accepted + 1]
        left = state.params.max_tokens - state.generated
        stop = next((i for i, t in enumerate(tokens) if t in state.params.stop_token_ids), None)
        keep = min(len(tokens), left, len(tokens) if stop is None else stop + 1)
        tokens, logprobs = tokens[:keep], logprobs[:keep]
        try:
            state.state.commit(tokens)
        except GrammarError as e:  # (the mask allows only what the grammar does: a bug if it happens)
            raise StepError("INTERNAL", str(e)) from None
        state.generated += len(tokens)
        finished = stop is not None and stop < keep or state.generated >= state.params.max_tokens
        result = pb.StepResult(session_id=frame.session_id, seq=frame.seq, tokens=tokens, logprobs=logprobs,
                               path=path, finished=finished, drafted=len(drafts), accepted=min(accepted, keep))
        if state.sampling.top_logprobs:
            for ids, values in sampled.top[:keep]:
                result.top_logprobs.add(tokens=ids, logprobs=values)
        if state.compile_ms:
            result.timings_ms["grammar"], state.compile_ms = state.compile_ms, 0.0
        state.ledger.record(frame.seq, result)
        return result

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def idle(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Sessions without activity for ``ttl_s`` seconds."""
        return idle({sid: s.ledger for sid, s in self.sessions.items()}, ttl_s, now)


class Terminal:
    """A terminal tier: the sessions of a segment with the head, and the segment (and scheduler) they run on.

    ``step`` runs a frame now, one at a time under ``lock`` (the segment is not shared); ``submit`` runs it
    through ``scheduler`` (the segment's own thread batches every session's steps). A new session's first
    submitted step reserves its whole KV room (prompt + ``max_tokens`` positions, within
    ``max_positions``), so a full pool refuses new sessions and never a running one.
    """

    def __init__(self, segment, limits: Limits = Limits(), *, path: int = pb.ACCURATE,
                 scheduler: Scheduler | None = None, wording: Wording = Wording(), grammars: Grammars | None = None):
        self.segment, self.limits, self.path = segment, limits, path
        self.scheduler, self.wording = scheduler, wording
        self.tails = TailSessions(limits.max_sessions, limits.max_tokens, grammars, prefetches_masks(segment))
        self.lock = threading.Lock()  # guards tails; in ``step`` and ``draft``, the segment too
        self.counts: Counter[str] = Counter()  # prefill_positions (rows of first frames run), forked_positions

    def step(self, frame: pb.Frame, hidden: torch.Tensor) -> pb.StepResult:
        """Run a (non-close) frame's rows (T, C) now and sample; never raises for a bad step: the answer then
        carries ``error`` and its gRPC ``status``."""
        with self.lock:
            try:
                self._check_fork(frame)
                stored = self.tails.accept(frame)
                if stored is not None:
                    return stored
                started = time.perf_counter()
                work = self.tails.work(frame, hidden)
                self._fork(frame)
                sampled = self.segment([work])[0]
                result = self.tails.answer(frame, sampled, self.path)
                self._count(frame, work.num_positions)
            except Exception as e:  # noqa: BLE001 -- this session's own failure, answered with its status
                return error_result(frame.session_id, frame.seq, *self.wording.status(e, frame))
        result.timings_ms["compute"] = (time.perf_counter() - started) * 1e3
        return result

    def submit(self, frame: pb.Frame, hidden: torch.Tensor | None) -> Future:
        """Queue a (non-close) frame on the scheduler; the future gives its StepResult or raises StepError."""
        answer: Future = Future()
        rows = 0 if hidden is None else int(hidden.shape[0])
        step = self.scheduler.submit_job(frame.session_id, lambda: self._admit(frame, hidden),
                                         lambda out, timings: self._answer(frame, out, timings, rows),
                                         after=frame.fork_of if frame.seq == 0 else "")
        step.add_done_callback(lambda done: self._settle(frame, done, answer))
        return answer

    def draft(self, session_id: str, start_pos: int, hidden: torch.Tensor, state: TokenState) -> int:
        """Draft the token after the last of ``hidden`` (T, C) rows at positions start_pos.. of the session's
        draft cache (a start before its end rewinds it), drawn as any terminal would draw it there after the
        tokens of ``state`` (the committed ones and the round's drafts so far)."""
        item = SegmentInput(session_id + DRAFT, start_pos, hidden=hidden,
                            sample=state.rows(start_pos + int(hidden.shape[0])))
        with self.lock:
            return self.segment([item])[0].tokens[-1]

    def close(self, session_id: str) -> Future:
        """Free a session's sampling state and KV cache (and its draft cache); with a scheduler, on its thread
        after the session's step in flight. The future is done once it is freed."""

        def forget() -> None:
            with self.lock:
                self.tails.close(session_id)
                self.segment.close_session(session_id)
                self.segment.close_session(session_id + DRAFT)

        if self.scheduler is not None:
            return self.scheduler.call(forget)
        done: Future = Future()
        done.set_result(forget())
        return done

    def idle(self, ttl_s: float) -> list[str]:
        """Sessions without activity for ``ttl_s`` seconds."""
        with self.lock:
            return self.tails.idle(ttl_s)

    def stats(self) -> dict[str, int]:
        """Sessions with sampling state, sessions with a KV cache, steps waiting (for tests and logs)."""
        with self.lock:
            sessions = len(self.tails.sessions)
        queued = self.scheduler.queued() if self.scheduler is not None else 0
        return {"sessions": sessions, "caches": len(self.segment.sessions), "queued": queued}

    # ---- a submitted step, on the scheduler's thread ------------------------------------------------

    def _admit(self, frame: pb.Frame, hidden: torch.Tensor | None):
        """In the session's turn: the stored answer of a repeat, or the step to run (StepError if refused)."""
        if frame.deadline_unix_ms and time.time() * 1e3 > frame.deadline_unix_ms:
            late = time.time() * 1e3 - frame.deadline_unix_ms
            raise StepError("DEADLINE_EXCEEDED", f"step {frame.seq} of session {frame.session_id!r} "
                            f"arrived {late:.0f} ms after its deadline; retry it with a later deadline")
        if hidden is None:
            raise StepError("INVALID_ARGUMENT", f"step {frame.seq} of session {frame.session_id!r} carries no "
                            "hidden states (only a close frame may be empty)")
        end = frame.start_pos + hidden.shape[0]
        self._check_drafts(frame)
        with self.lock:
            self._check_fork(frame)
            stored = self.tails.accept(frame)
            if stored is not None:
                return stored
            if end > self.limits.max_positions:
                raise StepError("RESOURCE_EXHAUSTED", f"session {frame.session_id!r} would hold {end} positions; "
                                f"the limit is {self.limits.max_positions}")
            work = self.tails.work(frame, hidden)
        if frame.seq == 0:  # a new session takes its whole room in the KV pool now, or is refused
            work.reserve = min(end + frame.params.max_tokens, self.limits.max_positions)
            self._fork(frame, work.reserve)
        return work

    def _check_fork(self, frame: pb.Frame) -> None:
        """A new session forking another's cache: StepError unless that session's cache here holds start_pos
        positions (NOT_FOUND, FAILED_PRECONDITION)."""
        if not frame.fork_of or frame.seq != 0 or frame.session_id in self.tails.sessions:
            return
        source = self.segment.sessions.get(frame.fork_of)
        if source is None or frame.fork_of == frame.session_id:
            raise StepError("NOT_FOUND", f"session {frame.session_id!r} forks {frame.fork_of!r}, which this tier "
                            "does not hold")
        if frame.start_pos > source.length:
            raise StepError("FAILED_PRECONDITION", f"session {frame.session_id!r} forks {frame.start_pos} "
                            f"positions of {frame.fork_of!r}, which holds {source.length}")

    def _fork(self, frame: pb.Frame, reserve: int = 0) -> None:
        """Start a forking session's cache from its source's (once: a retried first frame finds it)."""
        if frame.fork_of and frame.seq == 0 and frame.session_id not in self.segment.sessions:
            self.segment.fork_session(frame.fork_of, frame.session_id, frame.start_pos, reserve)

    def _count(self, frame: pb.Frame, rows: int) -> None:
        """A first frame ran: its rows were prefilled here, the positions before them forked (or none)."""
        if frame.seq == 0:
            self.counts["prefill_positions"] += rows
            self.counts["forked_positions"] += frame.start_pos if frame.fork_of else 0

    def _check_drafts(self, frame: pb.Frame) -> None:
        """A verification frame's drafts: at most max_draft, each a token id of the model."""
        drafts = frame.draft_tokens
        if not drafts:
            return
        if len(drafts) > self.limits.max_draft:
            raise StepError("INVALID_ARGUMENT", f"step {frame.seq} of session {frame.session_id!r} carries "
                            f"{len(drafts)} drafts; the limit is {self.limits.max_draft}")
        vocab = self.segment.spec.vocab_size
        bad = next((d for d in drafts if d >= vocab), None)
        if bad is not None:
            raise StepError("INVALID_ARGUMENT", f"step {frame.seq} of session {frame.session_id!r}: draft token "
                            f"{bad} is not in the vocabulary ({vocab} ids)")

    def _answer(self, frame: pb.Frame, sampled: Sampled, timings: dict, rows: int) -> pb.StepResult:
        """Turn a finished step (its ``Sampled`` tokens, ``rows`` positions) into the session's StepResult."""
        with self.lock:
            result = self.tails.answer(frame, sampled, self.path)
            self._count(frame, rows)
        for name, ms in timings.items():
            result.timings_ms[name] = ms
        return result

    def _settle(self, frame: pb.Frame, done: Future, answer: Future) -> None:
        """The scheduler's outcome as the caller's: a StepResult, or a StepError with its status."""
        error = done.exception()
        if error is None:
            answer.set_result(done.result())
            return
        if frame.seq == 0 and isinstance(error, PoolExhausted):  # refused: nothing of it stays
            with self.lock:
                self.tails.close(frame.session_id)
        answer.set_exception(StepError(*self.wording.status(error, frame)))
