"""The edge's fast tail: the plan's compressed copy of the cloud tier ([k2, L) + norm + head) run at the edge.

One ``FastTail`` per edge process, shared by every session the router sends down the fast path. It
admits and samples exactly like the cloud (``TailSessions``: the session's parameters, position-keyed
draws, ``max_tokens`` and stop tokens counted per session) and answers with ``path = FAST``. A session
moved here mid-generation is built by one step at seq 0 and position 0 carrying the whole split-point
history, with ``max_tokens`` set to the tokens still to come (``edge_node.router`` numbers those seqs).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from protos import splitglm_pb2 as pb
from protos.status import error_result
from runtime.artifacts import load_tier
from runtime.kv_pool import PoolExhausted
from runtime.sampling import SamplingParams
from runtime.step import SegmentInput, SessionError
from runtime.terminal import StepError, TailSessions

logger = logging.getLogger(__name__)
DRAFT = "#draft"  # the draft session's id: the session's, with this after it


class FastTail:
    """``step(session_id, seq, start_pos, hidden, params) -> StepResult`` on the fast-tail segment."""

    def __init__(self, segment, max_sessions: int = 1024, max_tokens: int = 4096):
        self.segment = segment  # [k2, L) + norm + head, compressed
        self.tails = TailSessions(max_sessions, max_tokens)
        self.lock = threading.Lock()  # one torch call at a time; guards the sessions too

    @classmethod
    def load(cls, plan_dir: str | os.PathLike, **limits) -> FastTail:
        """The plan's ``fast_tail`` tier, verified against its manifest."""
        return cls(load_tier(plan_dir, "fast_tail"), **limits)

    def step(
        self, session_id: str, seq: int, start_pos: int, hidden: torch.Tensor, params: pb.GenerationParams | None = None
    ) -> pb.StepResult:
        """Run ``hidden`` (T, C) from ``start_pos`` and sample the next token; ``params`` on seq 0 only.

        Never raises for a bad step: the answer then carries ``error`` and its gRPC ``status``.
        """
        frame = pb.Frame(session_id=session_id, seq=seq, start_pos=start_pos)
        if params is not None:
            frame.params.CopyFrom(params)
        with self.lock:
            try:
                stored = self.tails.accept(frame)
                if stored is not None:
                    return stored
                started = time.perf_counter()
                sampled = self.segment([self.tails.work(frame, hidden)])[0]
                result = self.tails.answer(frame, sampled, pb.FAST)
            except StepError as e:
                return error_result(session_id, seq, e.status, f"edge fast tail: {e}")
            except SessionError as e:
                return error_result(session_id, seq, "FAILED_PRECONDITION", f"edge fast tail: {e}")
            except PoolExhausted as e:
                return error_result(session_id, seq, "RESOURCE_EXHAUSTED", f"edge fast tail: {e}")
            except Exception as e:  # noqa: BLE001 -- this session's own failure, answered like the cloud would
                logger.exception("fast tail step %d of session %s failed", seq, session_id)
                return error_result(session_id, seq, "INTERNAL", f"edge fast tail: step failed ({type(e).__name__})")
        result.timings_ms["compute"] = (time.perf_counter() - started) * 1e3
        return result

    def close(self, session_id: str) -> None:
        """Free the session's KV cache and sampling state (and its draft session's cache)."""
        with self.lock:
            self.tails.close(session_id)
            self.segment.close_session(session_id)
            self.segment.close_session(session_id + DRAFT)

    def draft(self, session_id: str, start_pos: int, hidden: torch.Tensor, sampling: SamplingParams) -> int:
        """Draft the token after the last of ``hidden`` (T, C) rows at positions start_pos.. of the session's
        draft cache (a start before its end rewinds it), drawn as the cloud would draw it there."""
        item = SegmentInput(session_id + DRAFT, start_pos, hidden=hidden,
                            sample=tuple(sampling.rows(start_pos + int(hidden.shape[0]))))
        with self.lock:
            return self.segment([item])[0].tokens[-1]

    def sessions(self) -> int:
        """Sessions held now."""
        with self.lock:
            return len(self.tails.sessions)
