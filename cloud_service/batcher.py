"""The cloud's sessions: admission and sampling state over the runtime's scheduler.

Streams hand ``submit`` a frame and its decoded hidden states. The segment's ``Scheduler`` batches every
session's decode steps, and prompts in chunks, into shared forward passes and samples on the segment's
device. Each frame is admitted in its session's turn, on the scheduler's thread (``TailSessions``: seq
order, repeats answered from the stored result, limits, the deadline); a new session's first step
reserves its whole KV room (prompt + ``max_tokens`` positions), so a full pool refuses new sessions and
never a running one. A step that cannot be served fails its own future with a ``StepError`` (status
name + message) and touches no other session. Idle sessions are freed after ``session_ttl_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from protos import splitglm_pb2 as pb
from runtime.kv_pool import PoolExhausted
from runtime.scheduler import QueueFull, Scheduler, SchedulerClosed
from runtime.step import SessionError
from runtime.terminal import StepError, TailSessions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 1024  # sessions held at once
    max_batch: int = 32  # sessions per forward pass
    max_tokens: int = 4096  # tokens a session may ask for
    max_positions: int = 8192  # cached positions per session
    session_ttl_s: float = 300.0  # idle sessions are freed after, seconds
    prefill_chunk: int = 256  # prompt positions per step (a long prompt delays decode steps by one chunk)
    max_draft: int = 8  # drafted tokens a verification frame may carry


class Batcher:
    """Owns the cloud segment's sessions; ``submit`` a step, get a future of its StepResult."""

    def __init__(self, segment, limits: Limits = Limits(), device: torch.device | str = "cpu"):
        self.segment, self.limits, self.device = segment, limits, torch.device(device)
        self.tails = TailSessions(limits.max_sessions, limits.max_tokens)
        self.scheduler = Scheduler(segment, max_batch=limits.max_batch, prefill_chunk=limits.prefill_chunk,
                                   name="cloud-scheduler")
        self._lock = threading.Lock()  # guards tails
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="cloud-reaper", daemon=True)

    def start(self) -> Batcher:
        self.scheduler.start()
        self._reaper.start()
        return self

    def submit(self, frame: pb.Frame, hidden: torch.Tensor | None) -> Future:
        """Queue a (non-close) frame; the future gives its StepResult or raises StepError."""
        answer: Future = Future()
        if self._stopping.is_set():
            answer.set_exception(StepError("UNAVAILABLE", "the cloud service is shutting down"))
            return answer
        step = self.scheduler.submit_job(frame.session_id, lambda: self._admit(frame, hidden),
                                         lambda out, timings: self._answer(frame, out, timings))
        step.add_done_callback(lambda done: self._settle(frame, done, answer))
        return answer

    def free(self, session_id: str) -> Future:
        """Free a session's KV cache and sampling state (after its step in flight, if any); the future is
        done once it is freed."""

        def forget() -> None:
            with self._lock:
                self.tails.close(session_id)
            self.segment.close_session(session_id)

        return self.scheduler.call(forget)

    def stats(self) -> dict[str, int]:
        """Sessions with sampling state, sessions with a KV cache, steps waiting (for tests and logs)."""
        with self._lock:
            sessions = len(self.tails.sessions)
        return {"sessions": sessions, "caches": len(self.segment.sessions), "queued": self.scheduler.queued()}

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running step, fail what is still queued (UNAVAILABLE), end the threads."""
        self._stopping.set()
        self.scheduler.stop(timeout)
        if self._reaper.is_alive():
            self._reaper.join(timeout)

    # ---- admission ---------------------------------------------------------------------------------

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
        with self._lock:
            stored = self.tails.accept(frame)
            if stored is not None:
                return stored
            if end > self.limits.max_positions:
                raise StepError("RESOURCE_EXHAUSTED", f"session {frame.session_id!r} would hold {end} positions; "
                                f"the limit is {self.limits.max_positions}")
            work = self.tails.work(frame, hidden)
        if frame.seq == 0:  # a new session takes its whole room in the KV pool now, or is refused
            work.reserve = min(end + frame.params.max_tokens, self.limits.max_positions)
        return work

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

    def _answer(self, frame: pb.Frame, sampled, timings: dict) -> pb.StepResult:
        """Turn a finished step (its ``Sampled`` tokens) into the session's StepResult."""
        with self._lock:
            result = self.tails.answer(frame, sampled, pb.ACCURATE)
        for name, ms in timings.items():
            result.timings_ms[name] = ms
        return result

    def _settle(self, frame: pb.Frame, done, answer: Future) -> None:
        """The scheduler's outcome as the stream's: a StepResult, or a StepError with the right status."""
        error = done.exception()
        if error is None:
            answer.set_result(done.result())
            return
        if frame.seq == 0 and isinstance(error, PoolExhausted):  # refused: nothing of it stays
            with self._lock:
                self.tails.close(frame.session_id)
        answer.set_exception(_step_error(error, frame))

    def _reap(self) -> None:
        """Free sessions idle for longer than the TTL (their KV caches and sampling state)."""
        every = min(1.0, max(0.05, self.limits.session_ttl_s / 4))
        while not self._stopping.wait(every):
            with self._lock:
                idle = self.tails.idle(self.limits.session_ttl_s)
            for session_id in idle:
                logger.info("session %s idle for over %.0f s: freed", session_id, self.limits.session_ttl_s)
                self.free(session_id)


def _step_error(error: BaseException, frame: pb.Frame) -> StepError:
    """A step's own failure as a StepError with the right status."""
    if isinstance(error, StepError):
        return error
    if isinstance(error, SessionError):
        return StepError("FAILED_PRECONDITION", str(error))
    if isinstance(error, (PoolExhausted, QueueFull)):
        return StepError("RESOURCE_EXHAUSTED", str(error))
    if isinstance(error, SchedulerClosed):
        return StepError("UNAVAILABLE", "the cloud service is shutting down")
    logger.error("step %d of session %s failed", frame.seq, frame.session_id, exc_info=error)
    return StepError("INTERNAL", f"step {frame.seq} of session {frame.session_id!r} failed on the cloud "
                     f"({type(error).__name__}; see the cloud's log)")
