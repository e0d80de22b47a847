"""The terminal tier's bookkeeping: per-session sampling and idempotent step answers.

Shared by the cloud segment (accurate path) and the edge fast tail, so both admit frames, sample, end
generations and answer repeated steps the same way:

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

A sampled token's random draw depends only on the session's seed and the token's position
(``sampling.draw_uniform``), not on the tier or on the draws before it: the fast tail that takes over a
session mid-generation draws exactly what the cloud would have, and a repeated step draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos import splitglm_pb2 as pb
from runtime.ledger import Ledger, StepError, idle
from runtime.sampling import SamplingParams
from runtime.step import Sampled, SegmentInput

__all__ = ["StepError", "TailSession", "TailSessions", "sampling_params"]


@dataclass
class TailSession:
    params: pb.GenerationParams
    sampling: SamplingParams
    generated: int = 0  # tokens sampled so far
    ledger: Ledger = field(default_factory=Ledger)


def sampling_params(params: pb.GenerationParams) -> SamplingParams:
    """Sampling parameters from the wire; StepError INVALID_ARGUMENT if out of range."""
    top_p = params.top_p if 0 < params.top_p < 1 else 1.0
    try:
        return SamplingParams(temperature=params.temperature, top_p=top_p, seed=params.seed)
    except ValueError as e:
        raise StepError("INVALID_ARGUMENT", f"generation parameters: {e}") from None


class TailSessions:
    """Sampling state of the sessions a terminal segment serves."""

    def __init__(self, max_sessions: int = 1024, max_tokens: int = 4096):
        self.max_sessions, self.max_tokens = max_sessions, max_tokens
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
        sampling = sampling_params(frame.params)
        params = pb.GenerationParams()
        params.CopyFrom(frame.params)
        self.sessions[frame.session_id] = TailSession(params, sampling)

    def work(self, frame: pb.Frame, hidden: torch.Tensor) -> SegmentInput:
        """The segment input of an accepted frame: its rows (T, C), sampling the token after the last one
        (after each of its last g + 1 rows for a verification of g drafts)."""
        state = self.sessions[frame.session_id]
        drafts = len(frame.draft_tokens)
        if drafts and drafts + 1 != hidden.shape[0]:
            raise StepError("INVALID_ARGUMENT", f"a verification of {drafts} drafts must carry {drafts + 1} "
                            f"rows; this one carries {hidden.shape[0]}")
        first = frame.start_pos + int(hidden.shape[0]) - drafts  # the position of the first token sampled
        rows = tuple(state.sampling.rows(first, drafts + 1))
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
        state.generated += len(tokens)
        finished = stop is not None and stop < keep or state.generated >= state.params.max_tokens
        result = pb.StepResult(session_id=frame.session_id, seq=frame.seq, tokens=tokens, logprobs=logprobs,
                               path=path, finished=finished, drafted=len(drafts), accepted=min(accepted, keep))
        state.ledger.record(frame.seq, result)
        return result

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def idle(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Sessions without activity for ``ttl_s`` seconds."""
        return idle({sid: s.ledger for sid, s in self.sessions.items()}, ttl_s, now)
