"""Per-session step bookkeeping every tier shares: seq order, repeated frames, idle expiry.

A frame repeats the last one when its seq is the last answered seq (a duplicate delivery, a retry after
a lost answer): it gets the stored answer again, with no second step. Any other seq but the next is out
of order. Sessions idle for longer than a TTL are found by ``idle``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from protos import splitglm_pb2 as pb


class StepError(ValueError):
    """A frame a tier cannot serve; ``status`` is the gRPC status code name."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Ledger:
    """The seq the next new frame of a session must carry, and the answer to the one before."""

    next_seq: int = 0
    last: pb.StepResult | None = None
    touched: float = field(default_factory=time.monotonic)  # last activity, for idle expiry

    def repeat(self, session_id: str, seq: int, strict: bool = True) -> pb.StepResult | None:
        """The stored answer if ``seq`` repeats the last step, else None; out of order raises (``strict``)."""
        self.touched = time.monotonic()
        if self.last is not None and seq == self.next_seq - 1:
            return self.last
        if strict and seq != self.next_seq:
            raise StepError("FAILED_PRECONDITION", f"session {session_id!r} expects seq {self.next_seq}, got {seq}")
        return None

    def record(self, seq: int, result: pb.StepResult) -> None:
        self.next_seq, self.last, self.touched = seq + 1, result, time.monotonic()


def idle(ledgers: Mapping[str, Ledger], ttl_s: float, now: float | None = None) -> list[str]:
    """The sessions whose ledger saw no activity for ``ttl_s`` seconds."""
    now = time.monotonic() if now is None else now
    return [session_id for session_id, ledger in ledgers.items() if now - ledger.touched > ttl_s]
