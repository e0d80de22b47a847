"""Concurrent callers of one segment share its forward passes (flat combining).

Each caller queues its ``SegmentInput`` and then competes for the segment's
lock; whoever gets it runs everything queued by then (up to ``max_batch``
items, one per session) in one ``segment(items)`` and hands every caller its
rows. While one pass runs, the next callers queue up and go in the next pass
together, so under load the batch grows by itself and alone a call costs what
it did. No thread of its own: the callers' threads do the work.

A pass that fails is retried item by item, so a bad item (an unknown
session, a wrong position) fails only its own caller.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import torch

from partitioner.runtime.segment import SegmentInput

logger = logging.getLogger(__name__)


class SegmentBatcher:
    def __init__(
        self, segment, lock: threading.Lock, max_batch: int = 32, on_pass: Callable[[int], None] | None = None
    ):
        """``on_pass(size)`` is told the size of every pass (metrics)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.segment, self.lock, self.max_batch, self.on_pass = segment, lock, max_batch, on_pass
        self.stats: Counter[str] = Counter()  # passes, items, largest (batch size)
        self._pending: list[tuple[SegmentInput, Future]] = []
        self._mutex = threading.Lock()  # guards _pending and stats

    def __call__(self, item: SegmentInput) -> torch.Tensor:
        """The segment's output rows (T, C) for ``item``, computed in a pass shared with concurrent callers."""
        done: Future = Future()
        with self._mutex:
            self._pending.append((item, done))
        while not done.done():
            with self.lock:
                if not done.done():
                    self._run(self._take())
        return done.result()

    def _take(self) -> list[tuple[SegmentInput, Future]]:
        """Up to max_batch queued items, one per session, oldest first (the rest stay queued)."""
        with self._mutex:
            taken, kept, sessions = [], [], set()
            for entry in self._pending:
                if len(taken) < self.max_batch and entry[0].session_id not in sessions:
                    taken.append(entry)
                    sessions.add(entry[0].session_id)
                else:
                    kept.append(entry)
            self._pending = kept
            self.stats["passes"] += 1
            self.stats["items"] += len(taken)
            self.stats["largest"] = max(self.stats["largest"], len(taken))
        if self.on_pass is not None and taken:
            self.on_pass(len(taken))
        return taken

    def _run(self, batch: list[tuple[SegmentInput, Future]]) -> None:
        try:
            rows = self.segment([item for item, _ in batch])
        except Exception as e:  # noqa: BLE001 -- one bad item must not fail the others: retry them one by one
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            logger.warning("a pass of %d items failed (%r); retrying them one by one", len(batch), e)
            for entry in batch:
                self._run([entry])
            return
        for (_, done), out in zip(batch, rows):
            done.set_result(out)
