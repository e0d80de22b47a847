"""What the device keeps of a session so a new edge can take it over: its committed rows, replayed in one frame.

An edge holds a device session's caches of [k1, k2) (and its cloud stream).
When that edge is gone -- it restarted and answers NOT_FOUND, or it stopped
answering -- the device sends the new edge one frame: seq 0, start_pos 0,
every committed row exactly as it was first sent (``protos.codecs.join_rows``:
the bytes untouched, so the new edge decodes what the old one did) and the
session's ``GenerationParams``. Sampling draws are keyed by position, so the
new edge's tails answer the tokens the old ones would have.

A row is committed when its input token is: the prompt's rows, and the row of
each verified token. While the edge drafts (``StepResult.draft_tokens``), the
rows of draft tokens wait; a verification's ``next_pos`` commits those before
it and drops the rest (the owner rewinds there too). A replay sent while a
draft row was in flight carries only the committed rows, and its answer names
``next_pos`` so the owner rewinds to them.

Seqs are renumbered for the new edge (the replay is its seq 0, the owner's
next frame its seq 1), and the session gets a new wire id (``<id>-r<n>``), so
an old edge that was only slow cannot mix its late answers in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import splitglm_pb2 as pb
from protos.codecs import decode, encode, join_rows


class NoHistory(RuntimeError):
    """The session's rows are not all known here (it cannot be replayed)."""


def _rows(msg: pb.EncodedTensor) -> int:
    return int(msg.shape[0]) if msg.shape else 0


def first_rows(msg: pb.EncodedTensor, n: int) -> pb.EncodedTensor:
    """The first ``n`` rows of an encoding (as fp32 of what it decodes to)."""
    return encode(decode(msg, int(msg.shape[1]))[:n], "fp32")


@dataclass
class SessionHistory:
    """One session as its owner sent it: committed rows, waiting draft rows, and the wire's numbering."""

    session_id: str
    params: pb.GenerationParams
    committed: list[pb.EncodedTensor] = field(default_factory=list)  # rows of positions [0, length), in order
    length: int = 0  # positions the committed rows cover
    drafts: list[pb.EncodedTensor] = field(default_factory=list)  # rows of draft tokens, from position length
    draft_next: bool = False  # the last answer named a draft: the owner's next frame is a draft row
    emitted: int = 0  # verified tokens answered so far
    replays: int = 0  # replays sent so far
    seq_base: int = 0  # the owner's seq that the current edge knows as seq 0
    broken: str = ""  # why the rows are not all known (then no replay)

    @property
    def wire_id(self) -> str:
        """The session id the current edge knows."""
        return self.session_id if not self.replays else f"{self.session_id}-r{self.replays}"

    def wire_seq(self, seq: int) -> int:
        return seq - self.seq_base

    # ---- bookkeeping of each answered step -----------------------------------------------------

    def answered(self, frame: pb.Frame, result: pb.StepResult) -> None:
        """Keep ``frame``'s rows as its answer commits them."""
        if not frame.HasField("hidden") or self.broken:
            return
        if self.draft_next:  # a draft row: it waits for the verification
            if frame.start_pos != self.length + len(self.drafts):
                self.broken = f"draft row at {frame.start_pos}, expected {self.length + len(self.drafts)}"
                return
            self.drafts.append(_copy(frame.hidden))
        else:
            self._commit(frame.start_pos, frame.hidden)
        self._follow(result)

    def _follow(self, result: pb.StepResult) -> None:
        """What an answer says of the rows: verified tokens settle the drafts at ``next_pos`` (a verification, a
        switch; unset: nothing was drafted); a draft of its own makes the next frame a draft row."""
        if result.tokens:
            self._settle(int(result.next_pos) or self.length)
        self.draft_next = bool(result.draft_tokens)
        self.emitted += len(result.tokens)

    def _commit(self, start: int, hidden: pb.EncodedTensor) -> None:
        if start > self.length:
            self.broken = f"rows from {start}, but only {self.length} committed"
            return
        self.drafts.clear()
        self._truncate(start)
        self.committed.append(_copy(hidden))
        self.length += _rows(hidden)

    def _settle(self, next_pos: int) -> None:
        """Drafts before ``next_pos`` were accepted; those after it, and committed rows past it, are dropped."""
        accepted = max(0, min(next_pos - self.length, len(self.drafts)))
        self.committed.extend(self.drafts[:accepted])
        self.length += accepted
        self.drafts.clear()
        self._truncate(next_pos)

    def _truncate(self, n: int) -> None:
        while self.committed and self.length - _rows(self.committed[-1]) >= n:
            self.length -= _rows(self.committed.pop())
        if self.length > n:  # the last entry straddles n
            last = self.committed.pop()
            keep = _rows(last) - (self.length - n)
            self.committed.append(first_rows(last, keep))
            self.length = n

    # ---- the replay -----------------------------------------------------------------------------

    def replay(self, frame: pb.Frame) -> pb.Frame:
        """The new edge's seq 0 standing in for owner frame ``frame``: every committed row (and ``frame``'s own
        rows unless they are a draft's); the session is renumbered so ``frame``'s seq is the new seq 0."""
        if self.broken:
            raise NoHistory(f"session {self.session_id!r} cannot be replayed: {self.broken}")
        rows = list(self.committed)
        if not self.draft_next and frame.HasField("hidden"):
            if frame.start_pos != self.length:
                raise NoHistory(f"session {self.session_id!r}: frame at {frame.start_pos}, {self.length} committed")
            rows.append(frame.hidden)
        if not rows:
            raise NoHistory(f"session {self.session_id!r} has no rows to replay")
        self.replays += 1
        self.seq_base = int(frame.seq)
        params = pb.GenerationParams()
        params.CopyFrom(self.params)
        params.max_tokens = max(self.params.max_tokens - self.emitted, 1)  # what is still to come
        out = pb.Frame(session_id=self.wire_id, seq=0, start_pos=0, deadline_unix_ms=frame.deadline_unix_ms,
                       reply_to=frame.reply_to)
        out.hidden.CopyFrom(join_rows(rows))
        out.params.CopyFrom(params)
        return out

    def replayed(self, replay: pb.Frame, result: pb.StepResult) -> None:
        """Book the replay's answer: its rows are the committed ones; the owner goes on after them."""
        if not result.next_pos:
            result.next_pos = _rows(replay.hidden)  # the owner rewinds there when its frame was a draft row
        self.committed, self.length = [replay.hidden], _rows(replay.hidden)
        self.drafts.clear()
        self.draft_next = False
        self._follow(result)


def _copy(msg: pb.EncodedTensor) -> pb.EncodedTensor:
    out = pb.EncodedTensor()
    out.CopyFrom(msg)
    return out
