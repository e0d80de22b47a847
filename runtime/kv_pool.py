"""One preallocated key/value pool per segment: pages of ``page_size`` positions and a page table per session.

Storage is two tensors, keys and values, of shape (layers, pages, page_size, K, D), allocated once (a
setting in tokens or MiB). A session holds a list of pages in position order: position p lives in slot
``pages[p // page_size] * page_size + p % page_size`` of the flat (pages * page_size, K, D) view.

- Attention reads the pool in place: the CUDA kernel through the page table, the PyTorch path through
  ``runs`` (contiguous slot ranges, each a view), so nothing is gathered or padded per step.
- A rewind (a retried step, a replay, rejected speculative positions) only sets ``length``.
- ``reserve`` takes pages for a session up front or fails with ``PoolExhausted`` without taking any, so
  a full pool refuses new work and never corrupts a running session; ``reserve_all`` does it for several
  sessions at once, opening those it lacks and closing them again if it fails. Page 0 is never handed
  out: padding rows of a captured CUDA graph write their keys there.
- ``grow="double"`` (the CPU default) reserves room in doubling steps, preferring the pages right after a
  session's last one, so a session's pages stay in few contiguous runs; ``"exact"`` takes what is asked.
- ``fork(src, dst, length)`` starts a session from another's positions [0, length) (several completions of
  one prompt): the full pages are shared, each page counting its holders, and the partial last page is
  copied, so neither session's next positions land in a shared page. A step that writes into a shared
  page anyway (a rewind below the fork's length) copies it first (copy-on-write, in ``reserve_all``); a
  page returns to the free list when its last holder closes. ``stats`` counts forks, pages shared, copies.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from runtime.step import SessionError

DEFAULT_PAGE_SIZE = 16  # positions per page
DEFAULT_POOL_TOKENS = 32768  # positions a segment's pool holds when no size is given


class PoolExhausted(RuntimeError):
    """The KV pool has no room for what a session asks (the caller answers RESOURCE_EXHAUSTED)."""


@dataclass
class SessionPages:
    """One session's place in the pool."""

    pages: list[int] = field(default_factory=list)  # page ids, in position order
    runs: list[list[int]] = field(default_factory=list)  # [first page, pages] of consecutive page ids
    length: int = 0  # positions cached (valid keys/values)
    replaced: int | None = None  # the first index of ``pages`` replaced by a copy since a page table read them


def pool_tokens(per_token_bytes: int, tokens: int | None = None, mib: float | None = None) -> int:
    """The pool's capacity in positions: ``tokens`` if given, else what ``mib`` MiB hold, else the default."""
    if tokens is not None and mib is not None:
        raise ValueError("give the KV pool's size in tokens or in MiB, not both")
    if mib is not None:
        tokens = int(mib * 2**20 // max(per_token_bytes, 1))
    tokens = DEFAULT_POOL_TOKENS if tokens is None else tokens
    if tokens < 1:
        raise ValueError(f"the KV pool must hold at least one position, got {tokens}")
    return tokens


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        tokens: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        grow: str = "double",
    ):
        if page_size < 1 or tokens < 1:
            raise ValueError(f"a KV pool needs page_size >= 1 and tokens >= 1, got {page_size}, {tokens}")
        if grow not in ("double", "exact"):
            raise ValueError(f"grow must be 'double' or 'exact', got {grow!r}")
        self.page_size, self.grow = page_size, grow
        self.num_pages = math.ceil(tokens / page_size) + 1  # + the scratch page 0
        shape = (num_layers, self.num_pages, page_size, num_kv_heads, head_dim)
        # torch.empty: on the CPU, memory is committed only as pages are first written
        self.k = torch.empty(shape, dtype=dtype, device=device)  # (layers, pages, page_size, K, D)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.sessions: dict[str, SessionPages] = {}
        self._free = list(range(1, self.num_pages))  # sorted
        self._holders: dict[int, int] = {}  # page -> sessions holding it, for the pages held by more than one
        self.stats: Counter[str] = Counter()  # forks, pages_shared (at forks), pages_copied (forks and writes)

    @property
    def free_positions(self) -> int:
        return len(self._free) * self.page_size

    @property
    def capacity_positions(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ---- sessions ---------------------------------------------------------------------------------

    def open(self, session_id: str) -> SessionPages:
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already in the pool")
        state = self.sessions[session_id] = SessionPages()
        return state

    @property
    def shared_pages(self) -> int:
        """Pages held by more than one session now."""
        return len(self._holders)

    def close(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is not None:
            for page in state.pages:
                self._drop(page)

    def fork(self, src: str, dst: str, length: int, positions: int = 0) -> None:
        """Open ``dst`` holding ``src``'s positions [0, length): full pages shared, the partial last one copied;
        with room for ``positions`` positions. All of it, or nothing (SessionError, PoolExhausted)."""
        source = self.sessions.get(src)
        check_fork(None if source is None else source.length, src, dst, dst in self.sessions, length)
        full, partial = divmod(length, self.page_size)
        state = self.open(dst)
        try:
            if partial and not self._free:
                raise PoolExhausted(f"the KV pool has no free page to fork session {src!r} into {dst!r}")
            for page in source.pages[:full]:
                self._holders[page] = self._holders.get(page, 1) + 1
                state.pages.append(page)
            if partial:
                self._take(state)
                self._copy(source.pages[full], state.pages[-1])
            state.runs, state.length = _runs(state.pages), length
            self.reserve(dst, positions)
        except PoolExhausted:
            self.close(dst)
            raise
        self.stats["forks"] += 1
        self.stats["pages_shared"] += full

    def capacity(self, session_id: str) -> int:
        return len(self.sessions[session_id].pages) * self.page_size

    def reserve(self, session_id: str, positions: int) -> None:
        """Make room for ``positions`` positions of the session (all of it, or nothing: PoolExhausted)."""
        state = self.sessions[session_id]
        need = math.ceil(positions / self.page_size) - len(state.pages)
        if need <= 0:
            return
        if need > len(self._free):
            raise PoolExhausted(
                f"the KV pool has {self.free_positions} free positions of {self.capacity_positions}; session "
                f"{session_id!r} needs {positions - self.capacity(session_id)} more"
            )
        if self.grow == "double":  # room ahead: as many pages again as it holds alone, if they are free
            own = sum(1 for page in state.pages if page not in self._holders) if self._holders else len(state.pages)
            need = max(need, min(own, len(self._free)))
        for _ in range(need):
            self._take(state)

    def reserve_all(self, rooms: Iterable[tuple[str, int | None, int]]) -> list[str]:
        """Make room for several sessions, opening those the pool lacks; the sessions it opened.

        Each ``(session, start, positions)`` is rewound to ``start`` (None: its length stays) and given room
        for ``positions`` positions; the shared pages among those of positions [start, positions) (the ones
        the step writes) are copied first. On PoolExhausted the sessions it opened are closed again (the
        rewinds, copies and room of the sessions it did not open stay) and the error is raised.
        """
        opened = []
        try:
            for session_id, start, positions in rooms:
                if session_id not in self.sessions:
                    self.open(session_id)
                    opened.append(session_id)
                if start is not None:
                    self.sessions[session_id].length = start  # a rewind drops what followed, even on failure
                    self._unshare(session_id, start, positions)
                self.reserve(session_id, positions)
        except PoolExhausted:
            for session_id in opened:
                self.close(session_id)
            raise
        return opened

    def _unshare(self, session_id: str, start: int, end: int) -> None:
        """Copy-on-write: give the session its own copy of each shared page among those of [start, end)."""
        if not self._holders:
            return
        state, ps = self.sessions[session_id], self.page_size
        for i in range(start // ps, min(math.ceil(end / ps), len(state.pages))):
            page = state.pages[i]
            if page not in self._holders:
                continue
            if not self._free:
                raise PoolExhausted(f"the KV pool has no free page to copy a shared page of session {session_id!r}")
            copy = self._free.pop(0)
            self._copy(page, copy)
            self._drop(page)
            state.pages[i] = copy
            state.runs = _runs(state.pages)
            state.replaced = i if state.replaced is None else min(state.replaced, i)

    @torch.inference_mode()  # (the pool's tensors may be inference tensors: made in a segment's first step)
    def _copy(self, page: int, to: int) -> None:
        """Copy a page's keys and values (every layer) into another page."""
        self.k[:, to].copy_(self.k[:, page])
        self.v[:, to].copy_(self.v[:, page])
        self.stats["pages_copied"] += 1

    def _drop(self, page: int) -> None:
        """One holder lets go of a page: free it if it was the last."""
        holders = self._holders.pop(page, 1) - 1
        if holders > 1:
            self._holders[page] = holders
        elif holders == 0:
            bisect.insort(self._free, page)

    def _take(self, state: SessionPages) -> None:
        """Give the session one more page: the one after its last if free, else the lowest free one."""
        after = state.pages[-1] + 1 if state.pages else None
        i = bisect.bisect_left(self._free, after) if after is not None else 0
        if after is None or i >= len(self._free) or self._free[i] != after:
            i = 0
        page = self._free.pop(i)
        state.pages.append(page)
        if state.runs and state.runs[-1][0] + state.runs[-1][1] == page:
            state.runs[-1][1] += 1
        else:
            state.runs.append([page, 1])

    # ---- addressing ---------------------------------------------------------------------------------

    def slots(self, session_id: str, start: int, count: int) -> list[int]:
        """Flat slot ids of positions [start, start + count) of a session (room must be reserved)."""
        pages, ps = self.sessions[session_id].pages, self.page_size
        return [pages[p // ps] * ps + p % ps for p in range(start, start + count)]

    def runs(self, session_id: str, length: int) -> list[tuple[int, int]]:
        """Contiguous flat slot ranges [a, b) that hold positions [0, length) of a session, in order."""
        out, left, ps = [], length, self.page_size
        for first, n in self.sessions[session_id].runs:
            if left <= 0:
                break
            take = min(n * ps, left)
            out.append((first * ps, first * ps + take))
            left -= take
        return out

    def holders(self, page: int) -> int:
        """Sessions holding a page (0 for a free page)."""
        free = bisect.bisect_left(self._free, page)
        if free < len(self._free) and self._free[free] == page:
            return 0
        return self._holders.get(page, 1)

    def page_table(self, session_id: str) -> list[int]:
        return list(self.sessions[session_id].pages)

    # ---- storage ------------------------------------------------------------------------------------

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one (local) layer as (pages * page_size, K, D) views."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (N, K, D) keys and values of new rows at their (N,) slots."""
        keys, values = self.flat(layer)
        keys.index_copy_(0, slots, k.to(keys.dtype))
        values.index_copy_(0, slots, v.to(values.dtype))


def check_fork(src_length: int | None, src: str, dst: str, dst_exists: bool, length: int) -> None:
    """A fork names a session that holds ``length`` positions, and a new session (SessionError otherwise)."""
    if src_length is None:
        raise SessionError(f"unknown session {src!r}: there is no cache to fork")
    if dst_exists or dst == src:
        raise SessionError(f"session {dst!r} already has a cache: a fork starts a new session")
    if not 0 <= length <= src_length:
        raise SessionError(f"session {src!r} has {src_length} positions cached; a fork cannot take {length}")


def _runs(pages: list[int]) -> list[list[int]]:
    """[first page, pages] of each run of consecutive page ids, in order."""
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return runs
