"""The cloud's sessions: a ``runtime.terminal.Terminal`` over the runtime's scheduler, and their expiry.

Streams hand ``submit`` a frame and its decoded hidden states. The segment's ``Scheduler`` batches every
session's decode steps, and prompts in chunks, into shared forward passes and samples on the segment's
device. Each frame is admitted in its session's turn, on the scheduler's thread (the terminal: seq
order, repeats answered from the stored result, limits, the deadline); a new session's first step
reserves its whole KV room (prompt + ``max_tokens`` positions), so a full pool refuses new sessions and
never a running one. A step that cannot be served fails its own future with a ``StepError`` (status
name + message, ``runtime.terminal.status_of``) and touches no other session. Idle sessions are freed
after ``session_ttl_s``. With ``metrics`` (``cloud_service.metrics.CloudMetrics``), each step and each
verification is observed, and the rest is read from here at scrape time.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import torch

from protos import splitglm_pb2 as pb
from runtime.scheduler import Scheduler
from runtime.terminal import Limits, StepError, Terminal, Wording

__all__ = ["Batcher", "Limits"]

logger = logging.getLogger(__name__)
CLOSED = "the cloud service is shutting down"
WORDING = Wording(closed=CLOSED, failed="step {seq} of session {session} failed on the cloud", log="the cloud's log")


class Batcher:
    """Owns the cloud segment's sessions; ``submit`` a step, get a future of its StepResult."""

    def __init__(self, segment, limits: Limits = Limits(), device: torch.device | str = "cpu", grammars=None,
                 metrics=None):
        self.segment, self.limits, self.device = segment, limits, torch.device(device)
        self.metrics = metrics  # CloudMetrics, or None
        self.scheduler = Scheduler(segment, max_batch=limits.max_batch, prefill_chunk=limits.prefill_chunk,
                                   name="cloud-scheduler", on_step=metrics.on_step if metrics is not None else None)
        self.terminal = Terminal(segment, limits, path=pb.ACCURATE, scheduler=self.scheduler, wording=WORDING,
                                 grammars=grammars)  # runtime.grammar.Grammars, or None: grammars are refused
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="cloud-reaper", daemon=True)
        if metrics is not None:
            metrics.watch(self)

    def start(self) -> Batcher:
        self.scheduler.start()
        self._reaper.start()
        return self

    def submit(self, frame: pb.Frame, hidden: torch.Tensor | None) -> Future:
        """Queue a (non-close) frame; the future gives its StepResult or raises StepError."""
        if self._stopping.is_set():
            answer: Future = Future()
            answer.set_exception(StepError("UNAVAILABLE", CLOSED))
            return answer
        answer = self.terminal.submit(frame, hidden)
        if self.metrics is not None and frame.draft_tokens:
            answer.add_done_callback(self.metrics.on_verified)
        return answer

    def free(self, session_id: str) -> Future:
        """Free a session's KV cache and sampling state (after its step in flight, if any); the future is
        done once it is freed."""
        return self.terminal.close(session_id)

    def stats(self) -> dict[str, int]:
        """Sessions with sampling state, sessions with a KV cache, steps waiting (for tests and logs)."""
        return self.terminal.stats()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the scheduler's loop has ended (``stop``, or a bug killed it); whether it has."""
        return self.scheduler.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running step, fail what is still queued (UNAVAILABLE), end the threads."""
        self._stopping.set()
        self.scheduler.stop(timeout)
        if self._reaper.is_alive():
            self._reaper.join(timeout)

    def _reap(self) -> None:
        """Free sessions idle for longer than the TTL (their KV caches and sampling state)."""
        every = min(1.0, max(0.05, self.limits.session_ttl_s / 4))
        while not self._stopping.wait(every):
            for session_id in self.terminal.idle(self.limits.session_ttl_s):
                logger.info("session %s idle for over %.0f s: freed", session_id, self.limits.session_ttl_s)
                self.free(session_id)
