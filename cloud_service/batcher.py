"""The cloud segment's scheduler: steps of many sessions batched into one forward pass.

One thread owns the segment (its KV caches) and the sessions' sampling state
(``TailSessions``); streams hand it steps and wait on futures. Each loop takes
what is queued (at most ``max_batch`` steps, at most one per session, oldest
first), runs one ``segment(items, last_only=True)`` for all of them and samples
each session's next token. A step that cannot be served fails its own future
with a ``StepError`` (status name + message) and touches no other session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from partitioner.runtime.segment import SegmentInput, SessionError
from partitioner.session.terminal import StepError, TailSessions
from protos import splitglm_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 1024  # sessions held at once
    max_batch: int = 32  # sessions per forward pass
    max_tokens: int = 4096  # tokens a session may ask for
    max_positions: int = 8192  # cached positions per session
    session_ttl_s: float = 300.0  # idle sessions are freed after, seconds


@dataclass
class Step:
    """One frame to serve: the validated frame, its decoded hidden states (T, C) and the caller's future."""

    frame: pb.Frame
    hidden: torch.Tensor | None
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)

    @property
    def session_id(self) -> str:
        return self.frame.session_id


class Batcher:
    """Owns the cloud segment; ``submit`` a step, get a future of its StepResult."""

    def __init__(self, segment, limits: Limits = Limits(), device: torch.device | str = "cpu"):
        self.segment, self.limits, self.device = segment, limits, torch.device(device)
        self.tails = TailSessions(limits.max_sessions, limits.max_tokens)
        self._queue: deque[Step] = deque()
        self._frees: list[tuple[str, Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._next_reap = time.monotonic() + self._reap_every
        self._thread = threading.Thread(target=self._run, name="cloud-scheduler", daemon=True)

    # ---- the streams' side -----------------------------------------------------------------------

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def submit(self, frame: pb.Frame, hidden: torch.Tensor | None) -> Future:
        """Queue a (non-close) frame; the future gives its StepResult or raises StepError."""
        step = Step(frame, hidden)
        with self._wake:
            if self._stopping:
                step.future.set_exception(StepError("UNAVAILABLE", "the cloud service is shutting down"))
            else:
                self._queue.append(step)
                self._wake.notify()
        return step.future

    def free(self, session_id: str) -> Future:
        """Free a session's KV cache and sampling state; the future is done once it is freed."""
        done: Future = Future()
        with self._wake:
            if self._stopping:
                done.set_result(None)
            else:
                self._frees.append((session_id, done))
                self._wake.notify()
        return done

    def stats(self) -> dict[str, int]:
        """Sessions with sampling state, sessions with a KV cache, steps waiting (for tests and logs)."""
        return {"sessions": len(self.tails.sessions), "caches": len(self.segment.sessions), "queued": len(self._queue)}

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail what is still queued (UNAVAILABLE), end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the scheduler thread --------------------------------------------------------------------

    @property
    def _reap_every(self) -> float:
        return min(1.0, max(0.05, self.limits.session_ttl_s / 4))

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._queue or self._frees or self._stopping):
                    if not self._wake.wait(timeout=max(0.0, self._next_reap - time.monotonic())):
                        break  # time to look for idle sessions
                if self._stopping:
                    break
                frees, self._frees = self._frees, []
                batch = self._take()
            for session_id, done in frees:
                self._free(session_id)
                done.set_result(None)
            self._reap()
            try:
                self._serve(batch)
            except Exception as e:  # noqa: BLE001 -- a bug here must not leave every stream waiting
                logger.error("scheduler loop failed", exc_info=e)
                for step in batch:
                    if not step.future.done():
                        step.future.set_exception(_step_error(e, step))
        self._fail_queued()

    def _take(self) -> list[Step]:
        """Up to max_batch queued steps, one per session, each session's oldest first (the rest stay queued)."""
        taken: list[Step] = []
        kept: deque[Step] = deque()
        sessions: set[str] = set()
        for step in self._queue:
            if len(taken) < self.limits.max_batch and step.session_id not in sessions:
                taken.append(step)
                sessions.add(step.session_id)
            else:
                kept.append(step)
        self._queue = kept
        return taken

    def _serve(self, steps: list[Step]) -> None:
        """Answer repeats, reject bad steps, run the rest in one forward pass."""
        ready: list[Step] = []
        for step in steps:
            try:
                stored = self._admit(step)
            except StepError as e:
                step.future.set_exception(e)
                continue
            if stored is not None:
                step.future.set_result(stored)
            else:
                ready.append(step)
        if not ready:
            return
        started = time.perf_counter()  # compute: the forward pass of the steps admitted
        try:
            logits = self._forward(ready)  # B x (1, V)
        except Exception as e:  # noqa: BLE001 -- one bad step must not fail the others: retry them one by one
            if len(ready) == 1:
                ready[0].future.set_exception(_step_error(e, ready[0]))
                return
            logger.warning("batch of %d failed (%r); retrying its steps one by one", len(ready), e)
            for step in ready:
                self._serve_alone(step)
            return
        compute_ms = (time.perf_counter() - started) * 1e3
        for step, rows in zip(ready, logits):
            self._answer(step, rows, started, compute_ms, len(ready))

    def _serve_alone(self, step: Step) -> None:
        started = time.perf_counter()
        try:
            logits = self._forward([step])
        except Exception as e:  # noqa: BLE001 -- this step's own failure
            step.future.set_exception(_step_error(e, step))
            return
        self._answer(step, logits[0], started, (time.perf_counter() - started) * 1e3, 1)

    def _admit(self, step: Step) -> pb.StepResult | None:
        """Check a step against its deadline, its session and the limits; the stored answer of a repeat."""
        frame = step.frame
        if frame.deadline_unix_ms and time.time() * 1e3 > frame.deadline_unix_ms:
            late = time.time() * 1e3 - frame.deadline_unix_ms
            raise StepError("DEADLINE_EXCEEDED", f"step {frame.seq} of session {frame.session_id!r} "
                            f"arrived {late:.0f} ms after its deadline; retry it with a later deadline")
        if step.hidden is None:
            raise StepError("INVALID_ARGUMENT", f"step {frame.seq} of session {frame.session_id!r} carries no "
                            "hidden states (only a close frame may be empty)")
        stored = self.tails.accept(frame)
        if stored is not None:
            return stored
        state = self.tails.sessions[frame.session_id]
        if state.generated >= state.params.max_tokens:
            raise StepError("RESOURCE_EXHAUSTED", f"session {frame.session_id!r} has already generated its "
                            f"max_tokens {state.params.max_tokens} tokens")
        end = frame.start_pos + step.hidden.shape[0]
        if end > self.limits.max_positions:
            raise StepError("RESOURCE_EXHAUSTED", f"session {frame.session_id!r} would hold {end} positions; "
                            f"the limit is {self.limits.max_positions}")
        cached = self.segment.sessions.get(frame.session_id)
        length = 0 if cached is None else cached.length
        if frame.start_pos > length:
            raise StepError("FAILED_PRECONDITION", f"session {frame.session_id!r} has {length} positions cached; "
                            f"step {frame.seq} cannot start at position {frame.start_pos}")
        return None

    def _forward(self, steps: list[Step]) -> list[torch.Tensor]:
        items = [SegmentInput(s.session_id, s.frame.start_pos, hidden=s.hidden) for s in steps]
        logits = self.segment(items, last_only=True)  # B x (1, V)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return logits

    def _answer(self, step: Step, logits: torch.Tensor, started: float, compute_ms: float, batch: int) -> None:
        """Sample the step's token from its (1, V) logits and resolve its future."""
        try:
            position = step.frame.start_pos + int(step.hidden.shape[0])  # the sampled token's
            result = self.tails.answer(step.session_id, step.frame.seq, logits[-1].float().cpu(), pb.ACCURATE,
                                       position=position)
        except Exception as e:  # noqa: BLE001 -- this step's own failure
            step.future.set_exception(_step_error(e, step))
            return
        result.timings_ms["queue"] = (started - step.queued) * 1e3
        result.timings_ms["compute"] = compute_ms
        result.timings_ms["batch_size"] = batch
        step.future.set_result(result)

    def _free(self, session_id: str) -> None:
        self.tails.close(session_id)
        self.segment.close_session(session_id)

    def _reap(self) -> None:
        """Free sessions idle for longer than the TTL (their KV caches and sampling state)."""
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + self._reap_every
        for session_id in self.tails.idle(self.limits.session_ttl_s, now):
            logger.info("session %s idle for over %.0f s: freed", session_id, self.limits.session_ttl_s)
            self._free(session_id)

    def _fail_queued(self) -> None:
        with self._wake:
            queued, self._queue = list(self._queue), deque()
            frees, self._frees = self._frees, []
        for step in queued:
            step.future.set_exception(StepError("UNAVAILABLE", "the cloud service is shutting down"))
        for _, done in frees:
            done.set_result(None)


def _step_error(error: Exception, step: Step) -> StepError:
    """A step's own failure as a StepError: positions that do not follow the cache, or an internal error."""
    if isinstance(error, StepError):
        return error
    if isinstance(error, SessionError):
        return StepError("FAILED_PRECONDITION", str(error))
    logger.error("step %d of session %s failed", step.frame.seq, step.session_id, exc_info=error)
    return StepError("INTERNAL", f"step {step.frame.seq} of session {step.session_id!r} failed: {error!r}")
