"""The edge's fast tail: the plan's compressed copy of the cloud tier ([k2, L) + norm + head) run at the edge.

One ``FastTail`` per edge process, shared by every session the router sends down the fast path: a
``runtime.terminal.Terminal`` that admits and samples exactly like the cloud (the session's parameters,
position-keyed draws, ``max_tokens`` and stop tokens counted per session) and answers with
``path = FAST``. A session moved here mid-generation is built by one step at seq 0 and position 0
carrying the whole split-point history, with ``max_tokens`` set to the tokens still to come
(``edge_node.router`` numbers those seqs).
"""

from __future__ import annotations

import os

import torch

from protos import splitglm_pb2 as pb
from runtime.artifacts import load_tier
from runtime.sampling import SamplingParams
from runtime.terminal import DRAFT, Limits, Terminal, Wording

__all__ = ["DRAFT", "FastTail"]


class FastTail:
    """``step(session_id, seq, start_pos, hidden, params) -> StepResult`` on the fast-tail segment."""

    def __init__(self, segment, max_sessions: int = 1024, max_tokens: int = 4096):
        self.segment = segment  # [k2, L) + norm + head, compressed
        self.terminal = Terminal(segment, Limits(max_sessions=max_sessions, max_tokens=max_tokens), path=pb.FAST,
                                 wording=Wording(prefix="edge fast tail: "))

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
        return self.terminal.step(frame, hidden)

    def close(self, session_id: str) -> None:
        """Free the session's KV cache and sampling state (and its draft session's cache)."""
        self.terminal.close(session_id)

    def draft(self, session_id: str, start_pos: int, hidden: torch.Tensor, sampling: SamplingParams) -> int:
        """Draft the token after the last of ``hidden`` (T, C) rows at positions start_pos.. of the session's
        draft cache (a start before its end rewinds it), drawn as the cloud would draw it there."""
        return self.terminal.draft(session_id, start_pos, hidden, sampling)

    def sessions(self) -> int:
        """Sessions held now."""
        return self.terminal.stats()["sessions"]
