"""What one step of a segment is: the new positions of several sessions, and how they are checked and laid out.

``SegmentInput`` is one session's part of a step (its rows, its first position, and -- on a segment with
the head -- which of its last rows to sample). ``check_items`` is the one validation every backend runs
before it touches a cache. ``StepBatch`` is the step as flat tensors, built once: the rows' positions and
KV slots, and per session its row offset and the pool runs it attends to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from runtime.checkpoint import GlmSpec
from runtime.sampling import SampleRow, sample_batch


class SessionError(ValueError):
    """A request names an unknown session or a position that does not follow its cache."""


@dataclass
class SegmentInput:
    """New positions of one session: token ids for a segment with the embedding, else hidden states."""

    session_id: str
    start_pos: int  # absolute position of the first new row; < cached length rewinds (retry / replay)
    hidden: torch.Tensor | None = None  # (T, C)
    input_ids: torch.Tensor | None = None  # (T,)
    sample: tuple[SampleRow, ...] = ()  # head segments: sample the last len(sample) rows, one row each
    reserve: int = 0  # positions to hold room for now (a new session's whole room); 0: this step's
    keep: int | None = None  # head segments: the last rows whose logits are wanted (None: by last_only; 0: none)

    @cached_property
    def num_positions(self) -> int:  # (read many times a step; an item's rows are set once, at creation)
        rows = self.input_ids if self.input_ids is not None else self.hidden
        return int(rows.shape[0])

    @cached_property
    def plain_sampling(self) -> bool:
        """No row it samples asks for logit processing (``SampleRow.plain``)."""
        return all(r.plain for r in self.sample)


@dataclass
class Sampled:
    """Tokens sampled from a session's last rows, in position order, their log-probabilities and, per token,
    its top alternatives as (ids, log-probabilities) when the row asked for them."""

    tokens: list[int]
    logprobs: list[float]
    top: list[tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=list)


def check_items(items: list[SegmentInput], spec: GlmSpec, has_embed: bool, has_head: bool, start: int) -> None:
    """Refuse a malformed step before any cache changes (every backend calls this first)."""
    if len({item.session_id for item in items}) != len(items):
        raise SessionError("a batch holds at most one step per session")
    for item in items:
        if has_embed:
            if item.input_ids is None:
                raise ValueError("this segment starts with the embedding: give input_ids, not hidden states")
            if item.input_ids.ndim != 1:
                raise ValueError(f"input_ids must be (T,), got {tuple(item.input_ids.shape)}")
        else:
            if item.hidden is None:
                raise ValueError(f"this segment starts at layer {start}: give hidden states")
            if item.hidden.ndim != 2 or item.hidden.shape[1] != spec.hidden_size:
                raise ValueError(f"hidden states must be (T, {spec.hidden_size}), got {tuple(item.hidden.shape)}")
        if item.num_positions < 1:
            raise ValueError(f"a step of session {item.session_id!r} holds no positions")
        if item.start_pos < 0:
            raise SessionError(f"session {item.session_id!r}: a step cannot start at position {item.start_pos}")
        if item.sample and not has_head:
            raise ValueError("only a segment with the head samples tokens")
        if len(item.sample) > item.num_positions:
            raise ValueError(f"session {item.session_id!r}: {len(item.sample)} rows to sample, only "
                             f"{item.num_positions} in the step")


def check_continues(session_id: str, start_pos: int, cached: int | None) -> None:
    """A step must start at position 0 of a new session, or within what the session has cached."""
    if cached is None:
        if start_pos != 0:
            raise SessionError(f"unknown session {session_id!r}: no positions cached, so a step cannot start at "
                               f"position {start_pos} (a new session starts at position 0)")
        return
    if not 0 <= start_pos <= cached:
        raise SessionError(
            f"session {session_id!r} has {cached} positions cached; a step cannot start at position {start_pos}"
        )


def begin_step(pool, items: list[SegmentInput]) -> None:
    """Check that each step follows its session's cache, then rewind each session to its step's start and
    reserve its new positions in ``pool`` (a ``KVPool``); sessions this opens are closed again if the pool
    lacks room (PoolExhausted)."""
    for item in items:
        state = pool.sessions.get(item.session_id)
        check_continues(item.session_id, item.start_pos, None if state is None else state.length)
    pool.reserve_all([(item.session_id, item.start_pos, max(item.start_pos + item.num_positions, item.reserve))
                      for item in items])


def end_step(pool, items: list[SegmentInput]) -> None:
    """The step ran: each session's cache now ends after its new positions."""
    for item in items:
        pool.sessions[item.session_id].length = item.start_pos + item.num_positions


@dataclass
class StepBatch:
    """A step as flat tensors: N rows, the new positions of each session in turn."""

    items: list[SegmentInput]
    offsets: list[int]  # per session: the first of its rows
    positions: torch.Tensor  # (N,) int64: each row's absolute position
    slots: torch.Tensor  # (N,) int64: each row's slot in the KV pool
    runs: list[list[tuple[int, int]]] = field(default_factory=list)  # per session: pool slot ranges of [0, end)

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])


def build_step(pool, items: list[SegmentInput], device) -> StepBatch:
    """Lay out a step whose sessions have room reserved in ``pool`` (a ``KVPool``)."""
    offsets, positions, slots, runs, n = [], [], [], [], 0
    for item in items:
        count = item.num_positions
        offsets.append(n)
        positions.extend(range(item.start_pos, item.start_pos + count))
        slots.extend(pool.slots(item.session_id, item.start_pos, count))
        runs.append(pool.runs(item.session_id, item.start_pos + count))
        n += count
    table = torch.tensor([positions, slots], dtype=torch.int64).to(device, non_blocking=True)  # (2, N)
    return StepBatch(items, offsets, table[0], table[1], runs)


def output_rows(items: list[SegmentInput], offsets: list[int], last_only: bool) -> list[range]:
    """Per session, the rows whose head output is wanted: the rows it samples, else its last or all rows."""
    wanted = []
    for item, first in zip(items, offsets):
        n = item.num_positions
        keep = len(item.sample) or (item.keep if item.keep is not None else (1 if last_only else n))
        wanted.append(range(first + n - keep, first + n))
    return wanted


def sample_outputs(items: list[SegmentInput], parts: list[torch.Tensor]) -> list:
    """Replace the logits (k, V) of every session that asks to sample by its ``Sampled`` (one batched draw)."""
    asking = [i for i, item in enumerate(items) if item.sample]
    if not asking:
        return parts
    rows = [row for i in asking for row in items[i].sample]
    logits = torch.cat([parts[i] for i in asking])  # (S, V)
    tokens, logprobs, top = sample_batch(logits, rows)  # the step's one host sync
    out, at = list(parts), 0
    for i in asking:
        k = len(items[i].sample)
        out[i] = Sampled(tokens[at : at + k], logprobs[at : at + k], top[at : at + k])
        at += k
    return out
