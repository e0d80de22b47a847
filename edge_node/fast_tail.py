"""The edge's fast tail: the plan's compressed copy of the cloud tier ([k2, L) + norm + head) run at the edge.

One ``FastTail`` per edge process, shared by every session the router sends down the fast path: a
``runtime.terminal.Terminal`` that admits and samples exactly like the cloud (the session's parameters,
position-keyed draws, penalties, logit bias and grammar, ``max_tokens`` and stop tokens counted per
session) and answers with ``path = FAST``. A session moved here mid-generation is built by one step at
seq 0 and position 0 carrying the whole split-point history, with ``max_tokens`` set to the tokens still
to come and the tokens generated so far (``edge_node.router`` numbers those seqs). Its grammars compile
against the vocabulary of the plan's ``fast_tail`` folder, or of the ``edge`` folder in plans that ship
none with the fast tail. A session may start from another's cache (``fork_of``: n completions of one
prompt), and a draft cache from another's draft cache (``fork_draft``).
"""

from __future__ import annotations

import os

import torch

from protos import splitglm_pb2 as pb
from runtime.artifacts import load_tier
from runtime.cpu_decode import CpuDecode
from runtime.generation import TokenState
from runtime.grammar import GrammarLimits, Grammars, tier_grammars
from runtime.kv_pool import PoolExhausted
from runtime.step import SessionError
from runtime.terminal import DRAFT, Limits, Terminal, Wording

__all__ = ["DRAFT", "FastTail"]


class FastTail:
    """``step(session_id, seq, start_pos, hidden, params) -> StepResult`` on the fast-tail segment."""

    def __init__(self, segment, max_sessions: int = 1024, max_tokens: int = 4096, grammars: Grammars | None = None):
        self.segment = segment  # [k2, L) + norm + head, compressed
        self.grammars = grammars  # None: requests with a grammar are refused
        self.terminal = Terminal(segment, Limits(max_sessions=max_sessions, max_tokens=max_tokens), path=pb.FAST,
                                 wording=Wording(prefix="edge fast tail: "), grammars=grammars)

    @classmethod
    def load(cls, plan_dir: str | os.PathLike, grammar_limits: GrammarLimits = GrammarLimits(),
             cpu_decode: CpuDecode | None = None, **limits) -> FastTail:
        """The plan's ``fast_tail`` tier, verified against its manifest, with its grammars (``cpu_decode``: its
        decode path, default eager)."""
        segment = load_tier(plan_dir, "fast_tail", cpu_decode=cpu_decode)
        folders = [os.path.join(plan_dir, "fast_tail"), os.path.join(plan_dir, "edge")]
        return cls(segment, grammars=tier_grammars(folders, segment.spec.vocab_size, grammar_limits), **limits)

    def step(self, session_id: str, seq: int, start_pos: int, hidden: torch.Tensor,
             params: pb.GenerationParams | None = None, fork_of: str = "") -> pb.StepResult:
        """Run ``hidden`` (T, C) from ``start_pos`` and sample the next token; ``params`` on seq 0 only, and
        ``fork_of``: a seq 0 that starts from that session's positions [0, start_pos) (``Frame.fork_of``).

        Never raises for a bad step: the answer then carries ``error`` and its gRPC ``status``.
        """
        frame = pb.Frame(session_id=session_id, seq=seq, start_pos=start_pos, fork_of=fork_of)
        if params is not None:
            frame.params.CopyFrom(params)
        return self.terminal.step(frame, hidden)

    def close(self, session_id: str) -> None:
        """Free the session's KV cache and sampling state (and its draft session's cache)."""
        self.terminal.close(session_id)

    def draft(self, session_id: str, start_pos: int, hidden: torch.Tensor, state: TokenState) -> int:
        """Draft the token after the last of ``hidden`` (T, C) rows at positions start_pos.. of the session's
        draft cache (a start before its end rewinds it), drawn as the cloud would draw it there after the tokens
        of ``state`` (its penalties and grammar state; GrammarError if the grammar fails)."""
        return self.terminal.draft(session_id, start_pos, hidden, state)

    def fork_draft(self, src: str, dst: str, length: int) -> bool:
        """Start ``dst``'s draft cache from ``src``'s positions [0, length), shared copy-on-write; False (and
        nothing done) where ``src``'s draft cache holds fewer, ``dst`` has one, or the pool has no room."""
        segment = self.segment
        with self.terminal.lock:  # (the lock of ``draft``)
            source = segment.sessions.get(src + DRAFT)
            if source is None or source.length < length or dst + DRAFT in segment.sessions:
                return False
            try:
                segment.fork_session(src + DRAFT, dst + DRAFT, length)
            except (SessionError, PoolExhausted):
                return False
        return True

    def sessions(self) -> int:
        """Sessions held now."""
        return self.terminal.stats()["sessions"]
