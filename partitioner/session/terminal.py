"""The terminal tier's bookkeeping: per-session sampling and idempotent step answers.

Shared by the cloud segment (accurate path) and the edge fast tail, so both
sample, end generations and answer repeated steps the same way:

- ``accept(frame)``: checks the frame against the session (new sessions start
  at seq 0 with parameters; seq follows; a repeated seq is answered again
  from the stored result without recomputing);
- ``answer(session_id, seq, logits, path, position)``: samples the next token
  from the last position's logits with the session's parameters, and says
  whether the generation ended (a stop token, or ``max_tokens`` tokens).

A sampled token's random draw depends only on the session's seed and the
token's position in the sequence (``sampling.draw_generator``), not on the tier or on the
draws before it: the fast tail that takes over a session mid-generation
draws exactly what the cloud would have, and a repeated step draws the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from partitioner.runtime.sampling import SamplingParams, draw_generator, sample
from protos import splitglm_pb2 as pb


class StepError(ValueError):
    """A frame the terminal cannot serve; ``status`` is the gRPC status code name."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class TailSession:
    params: pb.GenerationParams
    sampling: SamplingParams
    next_seq: int = 0  # the seq the next new frame must carry
    generated: int = 0  # tokens sampled so far
    last: pb.StepResult | None = None  # answer to seq next_seq - 1, for a repeated frame
    touched: float = field(default_factory=time.monotonic)  # last activity, for the idle TTL


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
        state.touched = time.monotonic()
        if frame.seq == state.next_seq - 1 and state.last is not None:
            return state.last
        if frame.seq != state.next_seq:
            raise StepError(
                "FAILED_PRECONDITION",
                f"session {frame.session_id!r} expects seq {state.next_seq}, got {frame.seq}",
            )
        return None

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

    def answer(
        self, session_id: str, seq: int, logits: torch.Tensor, path: int = pb.ACCURATE, *, position: int
    ) -> pb.StepResult:
        """Sample the token at ``position`` (the step's start_pos + its positions) from (V,) logits and
        record the step's answer."""
        state = self.sessions[session_id]
        generator = draw_generator(state.params.seed, position) if state.sampling.temperature > 0 else None
        token, logprob = sample(logits, state.sampling, generator)
        state.generated += 1
        finished = token in state.params.stop_token_ids or state.generated >= state.params.max_tokens
        result = pb.StepResult(
            session_id=session_id, seq=seq, tokens=[token], logprobs=[logprob], path=path, finished=finished
        )
        state.next_seq, state.last, state.touched = seq + 1, result, time.monotonic()
        return result

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def idle(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Sessions without activity for ``ttl_s`` seconds."""
        now = time.monotonic() if now is None else now
        return [sid for sid, s in self.sessions.items() if now - s.touched > ttl_s]
