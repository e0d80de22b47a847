"""A session's split-point history: the hidden-state rows its owner sent, position by position, as they came.

Whoever may have to rebuild a session's caches on another tail keeps one: the
device agent (a new edge takes the session over: ``device_agent.replay``) and
the edge's router (another cloud replica or the fast tail takes it over; the
fast tail also drafts from it: ``edge_node.router``, ``edge_node.speculation``).
Both replay it the same way: one frame, seq 0 at position 0, of every committed
row joined by ``protos.codecs.join_rows`` (the bytes as they came where the
codec allows, else exactly what they decode to, as fp32: the new tail decodes
what the old one did), with ``max_tokens`` cut to what is still to come and
the tokens generated so far (``remaining_params``: the new tail restores the
penalties' counts and the grammar's state from them). Sampling draws are keyed
by position, so the new tail answers the tokens the old one would have.

A row is committed when its input token is: the prompt's rows, and the row of
each verified token. Rows of draft tokens (speculation) wait in ``drafts``
until a verification settles them at ``next_pos``: those before it are
committed, the rest dropped. A step sent again from an earlier position
rewinds (``truncate``; a rewind inside a frame's rows keeps its first rows, as
fp32 of what they decoded to).

The rows are stored encoded, as they arrived; ``tensor()`` is their decoded
(length, C) form, kept from what the caller decoded on arrival (the edge) or
decoded when first asked.

``Seqs`` is how the tail a session talks to now numbers its frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from protos import splitglm_pb2 as pb
from protos.codecs import decode, encode, join_rows


def remaining_params(params: pb.GenerationParams, generated: Sequence[int]) -> pb.GenerationParams:
    """``params`` for a replay after the tokens ``generated`` since them: max_tokens cut to what is still to
    come (>= 1), and ``generated_tokens`` = every token before the replay (``params``' own, then these)."""
    out = pb.GenerationParams()
    out.CopyFrom(params)
    out.max_tokens = max(params.max_tokens - len(generated), 1)
    out.generated_tokens.extend(int(t) for t in generated)
    return out


def count_rows(msg: pb.EncodedTensor) -> int:
    return int(msg.shape[0]) if msg.shape else 0


def first_rows(msg: pb.EncodedTensor, n: int) -> pb.EncodedTensor:
    """The first ``n`` rows of an encoding (as fp32 of what it decodes to)."""
    return encode(decode(msg, int(msg.shape[1]))[:n], "fp32")


def _copy(msg: pb.EncodedTensor) -> pb.EncodedTensor:
    out = pb.EncodedTensor()
    out.CopyFrom(msg)
    return out


class SplitHistory:
    """Committed rows of positions [0, length) and waiting draft rows from ``length``, as they arrived."""

    def __init__(self):
        self.rows: list[pb.EncodedTensor] = []  # committed, consecutive positions from 0
        self.length = 0  # positions the committed rows cover
        self.drafts: list[pb.EncodedTensor] = []  # rows of draft tokens, from position length, one frame each
        self._decoded: list[torch.Tensor] | None = []  # the committed rows as (T_i, C) tensors (None: decode them)
        self._draft_decoded: list[torch.Tensor | None] = []  # the drafts' rows as (T_i, C), where given

    def commit(self, start: int, rows: pb.EncodedTensor, decoded: torch.Tensor | None = None) -> None:
        """Rows from ``start`` (<= length; below it rewinds, as a retried step does); waiting drafts are dropped.
        ``decoded``: what ``rows`` decode to, (T, C), if the caller has it."""
        if start > self.length:
            raise ValueError(f"the history holds {self.length} positions; a step cannot start at {start}")
        self.drafts, self._draft_decoded = [], []
        self.truncate(start)
        self._append(rows, decoded)

    def draft(self, start: int, rows: pb.EncodedTensor, decoded: torch.Tensor | None = None) -> None:
        """The row of a draft token: it waits for the verification (``settle``)."""
        expected = self.length + len(self.drafts)
        if start != expected:
            raise ValueError(f"draft row at {start}, expected {expected}")
        self.drafts.append(_copy(rows))
        self._draft_decoded.append(decoded)

    def settle(self, next_pos: int) -> None:
        """Drafts before ``next_pos`` were accepted; those after it, and committed rows past it, are dropped."""
        accepted = max(0, min(next_pos - self.length, len(self.drafts)))
        for rows, decoded in zip(self.drafts[:accepted], self._draft_decoded[:accepted]):
            self._append(rows, decoded)
        self.drafts, self._draft_decoded = [], []
        self.truncate(next_pos)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` committed positions."""
        if self.length <= n:
            return
        if self._decoded is not None:
            self._decoded = [self.tensor()[:n]]
        while self.rows and self.length - count_rows(self.rows[-1]) >= n:
            self.length -= count_rows(self.rows.pop())
        if self.length > n:  # the last frame's rows straddle n
            last = self.rows.pop()
            self.rows.append(first_rows(last, count_rows(last) - (self.length - n)))
            self.length = n

    def tensor(self) -> torch.Tensor:
        """The committed rows decoded: (length, C)."""
        if self._decoded is None:
            self._decoded = [decode(m, int(m.shape[1])) for m in self.rows]
        if len(self._decoded) > 1:
            self._decoded = [torch.cat(self._decoded)]
        return self._decoded[0]

    def replay_frame(self, session_id: str, params: pb.GenerationParams, generated: Sequence[int],
                     current: pb.EncodedTensor | None = None) -> pb.Frame:
        """Seq 0 at position 0 for the tail that takes the session over after the tokens ``generated`` since
        ``params``: every committed row, then ``current``'s (the rows of the frame being answered, when not
        committed yet)."""
        rows = self.rows + ([current] if current is not None else [])
        if not rows:
            raise ValueError("no rows to replay")
        out = pb.Frame(session_id=session_id, seq=0, start_pos=0)
        out.hidden.CopyFrom(join_rows(rows))
        out.params.CopyFrom(remaining_params(params, generated))
        return out

    def _append(self, rows: pb.EncodedTensor, decoded: torch.Tensor | None) -> None:
        self.rows.append(_copy(rows))
        self.length += count_rows(rows)
        if self._decoded is not None and decoded is not None:
            self._decoded.append(decoded)
        else:
            self._decoded = None  # decoded from the rows when asked


class Seqs:
    """A session's seqs as the tail it talks to now knows them: that tail started it at the owner's seq ``base``
    (seq 0, a replay, a switch) as its seq 0.

    ``of(seq)``: the tail's seq for owner seq ``seq`` when every frame since ``base`` goes to it (the device's
    edge, the edge's fast tail). ``sent``: its seq for the next frame when not every frame does (the edge
    answers draft steps itself: the cloud sees only plain steps and verifications), counted by ``took``.
    """

    def __init__(self, base: int = 0):
        self.base, self.sent = base, 0

    def restart(self, base: int) -> None:
        self.base, self.sent = base, 0

    def of(self, seq: int) -> int:
        return seq - self.base

    def took(self) -> None:
        """The tail answered frame ``sent``."""
        self.sent += 1
