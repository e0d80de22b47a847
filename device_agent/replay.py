"""What the device keeps of a session so a new edge can take it over: its committed rows, replayed in one frame.

An edge holds a device session's caches of [k1, k2) (and its cloud stream).
When that edge is gone -- it restarted and answers NOT_FOUND, or it stopped
answering -- the device sends the new edge one frame: seq 0, start_pos 0,
every committed row exactly as it was first sent and the session's
``GenerationParams`` with the tokens answered so far (``runtime.history``: the
split-point history the edge's router keeps too). Sampling draws are keyed by
position, and the new edge's tails restore the penalties and the grammar's
state from the tokens, so they answer the tokens the old ones would have.

A row is committed when its input token is. While the edge drafts
(``StepResult.draft_tokens``), the rows of draft tokens wait; a verification's
``next_pos`` commits those before it and drops the rest (the owner rewinds
there too). A replay sent while a draft row was in flight carries only the
committed rows, and its answer names ``next_pos`` so the owner rewinds to them.

Seqs are renumbered for the new edge (the replay is its seq 0, the owner's
next frame its seq 1), and the session gets a new wire id (``<id>-r<n>``), so
an old edge that was only slow cannot mix its late answers in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import splitglm_pb2 as pb
from runtime.history import Seqs, SplitHistory, count_rows


class NoHistory(RuntimeError):
    """The session's rows are not all known here (it cannot be replayed)."""


@dataclass
class SessionHistory:
    """One session as its owner sent it: its split-point rows, and the wire's numbering."""

    session_id: str
    params: pb.GenerationParams
    rows: SplitHistory = field(default_factory=SplitHistory)
    seqs: Seqs = field(default_factory=Seqs)  # the owner's seqs as the current edge knows them
    draft_next: bool = False  # the last answer named a draft: the owner's next frame is a draft row
    tokens: list[int] = field(default_factory=list)  # verified tokens answered so far, in order
    replays: int = 0  # replays sent so far
    broken: str = ""  # why the rows are not all known (then no replay)

    @property
    def wire_id(self) -> str:
        """The session id the current edge knows."""
        return self.session_id if not self.replays else f"{self.session_id}-r{self.replays}"

    def wire_seq(self, seq: int) -> int:
        return self.seqs.of(seq)

    def answered(self, frame: pb.Frame, result: pb.StepResult) -> None:
        """Keep ``frame``'s rows as its answer commits them."""
        if not frame.HasField("hidden") or self.broken:
            return
        try:
            if self.draft_next:  # a draft row: it waits for the verification
                self.rows.draft(frame.start_pos, frame.hidden)
            else:
                self.rows.commit(frame.start_pos, frame.hidden)
        except ValueError as e:
            self.broken = str(e)
            return
        self._follow(result)

    def replay(self, frame: pb.Frame) -> pb.Frame:
        """The new edge's seq 0 standing in for owner frame ``frame``: every committed row (and ``frame``'s own
        rows unless they are a draft's); the session is renumbered so ``frame``'s seq is the new seq 0."""
        if self.broken:
            raise NoHistory(f"session {self.session_id!r} cannot be replayed: {self.broken}")
        current = None
        if not self.draft_next and frame.HasField("hidden"):
            if frame.start_pos != self.rows.length:
                raise NoHistory(f"session {self.session_id!r}: frame at {frame.start_pos}, "
                                f"{self.rows.length} committed")
            current = frame.hidden
        if not self.rows.rows and current is None:
            raise NoHistory(f"session {self.session_id!r} has no rows to replay")
        self.replays += 1
        self.seqs.restart(int(frame.seq))
        out = self.rows.replay_frame(self.wire_id, self.params, self.tokens, current)
        out.deadline_unix_ms, out.reply_to = frame.deadline_unix_ms, frame.reply_to
        return out

    def replayed(self, replay: pb.Frame, result: pb.StepResult) -> None:
        """Book the replay's answer: its rows are the committed ones; the owner goes on after them."""
        if not result.next_pos:
            result.next_pos = count_rows(replay.hidden)  # the owner rewinds there when its frame was a draft row
        self.rows.commit(0, replay.hidden)
        self.draft_next = False
        self._follow(result)

    def _follow(self, result: pb.StepResult) -> None:
        """What an answer says of the rows: verified tokens settle the drafts at ``next_pos`` (a verification, a
        switch; unset: nothing was drafted); a draft of its own makes the next frame a draft row."""
        if result.tokens:
            self.rows.settle(int(result.next_pos) or self.rows.length)
        self.draft_next = bool(result.draft_tokens)
        self.tokens.extend(result.tokens)
