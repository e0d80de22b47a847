"""Continuous batching over one segment: every session's short steps, plus prompts in chunks.

One thread owns the segment (its KV pool) and runs step after step. Each step takes every queued short
step (at most ``decode_rows`` positions: a decode step, a speculative verification) of up to
``max_batch`` sessions, plus at most one chunk of ``prefill_chunk`` positions of the oldest long step (a
prompt). A prompt is cut into chunks at fixed offsets from its first position, so it runs the same
arithmetic whatever else shares its steps, and it delays the running sessions by at most one chunk per
step. A session's steps run in the order they were submitted, one at a time.

Callers ``submit`` a ``SegmentInput`` and get a future of what ``segment([item])`` gives for it (for a
chunked step of a segment without the head: the rows of all its chunks; with the head: the last chunk's
answer). A step that fails is retried item by item, so a bad item fails only its own caller.
``submit_job`` defers the item to when the session's turn comes: ``admit()`` runs on the scheduler's
thread once the session's earlier steps are done and gives the item, or a final answer instead (a
repeated frame); ``finish(output, timings)`` turns the output into the answer; a job ``after`` another
session (a fork of its cache) is admitted once that session's steps queued before it are done. ``call(fn)``
runs ``fn`` on the scheduler's thread between steps (closing and forking sessions).

A segment whose short steps and a chunk share one pass (the CUDA engine's ``mixed_passes``) gets more from a
chunk that waits for the running sessions than from one that runs alone just before they come back: where the
sessions' next steps usually arrive within ``chunk_hold_ms`` of their answers (the median of their recent
return gaps), a step that would hold only a chunk waits up to twice that gap for them. Sessions that come back
later (over a network, say) never hold a chunk: the GPU runs it while they are away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from runtime import tracing
from runtime.step import SegmentInput

logger = logging.getLogger(__name__)


class SchedulerClosed(RuntimeError):
    """The scheduler has stopped: the step was not run."""


class QueueFull(RuntimeError):
    """Too many steps are waiting (the caller answers RESOURCE_EXHAUSTED)."""


class StepFuture(Future):
    """A step's future; once done, ``timings`` holds its ms queued and computing and its last batch size."""

    timings: dict[str, float]


@dataclass
class _Entry:
    item: SegmentInput | None  # None until ``admit`` gives it
    last_only: bool
    session_id: str = ""
    admit: Callable[[], object] | None = None
    finish: Callable[[object, dict], object] | None = None
    after: str = ""  # a session whose steps queued before this one run first (the source of a fork)
    future: StepFuture = field(default_factory=StepFuture)
    done: int = 0  # positions of the item already run (chunked steps)
    parts: list = field(default_factory=list)  # outputs of the chunks run so far
    queued: float = field(default_factory=time.perf_counter)
    started: float | None = None  # perf_counter() when its first chunk ran
    compute_ms: float = 0.0  # its steps' compute so far
    batch: int = 0  # sessions in its latest step
    trace: object = None  # (tracing on) the submitter's span context: the steps that run it link to it

    @property
    def left(self) -> int:
        return self.item.num_positions - self.done


@dataclass(frozen=True)
class StepStats:
    """What one step of the scheduler held, for metrics and answers."""

    sessions: int
    rows: int
    compute_ms: float


class Scheduler:
    def __init__(
        self,
        segment,
        *,
        max_batch: int = 32,
        prefill_chunk: int = 256,
        decode_rows: int = 16,
        max_queue: int = 4096,
        lock=None,
        name: str = "scheduler",
        on_step: Callable[[StepStats], None] | None = None,
        chunk_hold_ms: float = 5.0,
    ):
        """``lock``: held around each step and call (two schedulers of one process can share the CPU that way);
        steps queued while it is busy join the next step. ``chunk_hold_ms``: the longest wait of a chunk for the
        running sessions, with a segment of mixed passes (see the module docstring; 0: never)."""
        if max_batch < 1 or prefill_chunk < 1 or decode_rows < 1:
            raise ValueError("max_batch, prefill_chunk and decode_rows must be >= 1")
        self.segment, self.max_batch, self.max_queue = segment, max_batch, max_queue
        self.prefill_chunk = getattr(segment, "prefill_chunk", prefill_chunk)  # an engine's captured chunk wins
        self.decode_rows = max(decode_rows, 1)
        self.lock, self.on_step = lock, on_step
        self.chunk_hold_ms = chunk_hold_ms if getattr(segment, "mixed_passes", False) else 0.0
        self._answered: dict[str, float] = {}  # session -> perf_counter() when its last short step was answered
        self._gaps: deque[float] = deque(maxlen=64)  # ms from a short step's answer to that session's next step
        self.stats: Counter[str] = Counter()  # steps, rows, items, largest, chunks (of long steps: prompts)
        self._queue: deque[_Entry] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False  # no new steps
        self._stopped = False  # the thread is gone: calls run in their caller's thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- the callers' side -------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, item: SegmentInput, last_only: bool = False) -> StepFuture:
        """Queue one session's step; the future gives its output or raises its error."""
        return self._enqueue([_Entry(item, last_only, item.session_id)])[0]

    def submit_all(self, items: list[SegmentInput], last_only: bool = False) -> list[StepFuture]:
        """Queue several sessions' steps at once: the next step takes them together (up to ``max_batch``)."""
        return self._enqueue([_Entry(item, last_only, item.session_id) for item in items])

    def submit_job(self, session_id: str, admit: Callable[[], object], finish: Callable[[object, dict], object],
                   last_only: bool = False, after: str = "") -> StepFuture:
        """Queue a step admitted in the session's turn (see the module docstring), and not before the steps of
        session ``after`` queued earlier are done; the future gives ``finish``'s answer, ``admit``'s final
        answer, or the error either (or the step) raised."""
        return self._enqueue([_Entry(None, last_only, session_id, admit, finish, after)])[0]

    def _enqueue(self, entries: list[_Entry]) -> list[StepFuture]:
        if tracing.enabled:
            origin = tracing.current()
            for entry in entries:
                entry.trace = origin
        with self._wake:
            now = time.perf_counter()
            for entry in entries:
                answered = self._answered.pop(entry.session_id, None)
                if answered is not None:
                    self._gaps.append((now - answered) * 1e3)
                if self._stopping:
                    entry.future.set_exception(SchedulerClosed("the scheduler has stopped"))
                elif len(self._queue) >= self.max_queue:
                    entry.future.set_exception(QueueFull(f"{len(self._queue)} steps are waiting (the limit)"))
                else:
                    self._queue.append(entry)
            self._wake.notify()
        return [entry.future for entry in entries]

    def __call__(self, items: list[SegmentInput], last_only: bool = False) -> list:
        """``segment(items)``, run in the scheduler's steps: blocks until every item is done."""
        return [f.result() for f in self.submit_all(items, last_only)]

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the scheduler's thread before its next step (at once, here, once it has stopped)."""
        done: Future = Future()
        with self._wake:
            if not self._stopped:
                self._calls.append((fn, done))
                self._wake.notify()
                return done
        _settle(done, fn)
        return done

    def close_session(self, session_id: str) -> None:
        """Free a session's KV cache (waits until it is freed)."""
        self.call(lambda: self.segment.close_session(session_id)).result()

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        """Start the new session ``dst`` from ``src``'s cached positions [0, length) (the segment's
        ``fork_session``), between steps; raises what the segment raised. Steps of ``src`` still queued must
        not rewrite those positions (a fork copies a prompt that is done)."""
        self.call(lambda: self.segment.fork_session(src, dst, length, reserve)).result()

    def queued(self) -> int:
        with self._wake:
            return len(self._queue)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the scheduler's thread has ended (stopped, or killed by a bug); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running step, fail what is still queued (SchedulerClosed), end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._wake:
            self._stopped = True
            queued, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
        for entry in queued:
            _fail(entry.future, SchedulerClosed("the scheduler stopped before running this step"))
        for fn, done in calls:  # (closing sessions, mostly): nothing else runs the segment now
            _settle(done, fn)

    # ---- the scheduler's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._queue or self._calls or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            with self.lock or _NoLock():  # what queued while the lock was busy joins this step
                with self._wake:
                    calls, self._calls = list(self._calls), deque()
                    step = self._take()
                    if self._hold(step):
                        step = self._take()
                for fn, done in calls:
                    _settle(done, fn)
                if step:
                    self._step(step)

    def _take(self) -> list[tuple[_Entry, int]]:
        """The next step: (entry, positions to run) for queued short steps, then one chunk of a long one."""
        taken: list[tuple[_Entry, int]] = []
        seen: set[str] = set()
        chunk_taken = False
        for entry in list(self._queue):
            sid = entry.session_id
            if sid in seen:
                continue  # a session's steps run one at a time, in order
            seen.add(sid)
            if entry.item is None and entry.after and entry.after in seen:
                continue  # its source's earlier steps are still queued (or running)
            if entry.item is None and not self._admit(entry):
                seen.discard(sid)  # answered without a step: the session's next step may go now
                continue
            if entry.done == 0 and entry.item.num_positions <= self.decode_rows:
                if len(taken) < self.max_batch:
                    taken.append((entry, entry.item.num_positions))
            elif not chunk_taken and len(taken) < self.max_batch:
                taken.append((entry, min(self.prefill_chunk, entry.left)))
                chunk_taken = True
        return taken

    def _hold(self, step: list[tuple[_Entry, int]]) -> bool:
        """(Under the queue's lock.) For a step of a chunk alone while sessions answered in the last step or two
        are likely back soon: wait for their steps (or a call, or the end) up to twice their median return gap;
        whether it waited."""
        if not self.chunk_hold_ms or not step or not self._answered or len(self._gaps) < 8:
            return False
        if any(entry.done == 0 and entry.item.num_positions <= self.decode_rows for entry, _ in step):
            return False  # short steps are in it already
        gap = sorted(self._gaps)[len(self._gaps) // 2] / 1e3
        now = time.perf_counter()
        self._forget_answered(now)
        if gap > self.chunk_hold_ms / 1e3 or not self._answered:
            return False
        deadline = now + 2 * gap
        while self._answered and not (self._calls or self._stopping):
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wake.wait(left)
        self.stats["chunk_holds"] += 1
        return True

    def _forget_answered(self, now: float) -> None:
        """(Under the queue's lock.) Drop the sessions answered more than 4 holds ago: gone (finished, or slower
        than the hold), nobody waits for them, and finished sessions do not pile up."""
        stale = now - 4 * self.chunk_hold_ms / 1e3
        for sid in [sid for sid, t in self._answered.items() if t < stale]:
            del self._answered[sid]

    def _admit(self, entry: _Entry) -> bool:
        """Run a job's admission (under the queue's lock); False when it answered without a step."""
        try:
            got = entry.admit()
        except Exception as e:  # noqa: BLE001 -- the caller's error
            self._queue.remove(entry)
            _fail(entry.future, e)
            return False
        if isinstance(got, SegmentInput):
            entry.item = got
            return True
        self._queue.remove(entry)
        entry.future.timings = {}
        entry.future.set_result(got)
        return False

    def _step(self, step: list[tuple[_Entry, int]]) -> None:
        items = [_chunk(entry, n) for entry, n in step]
        last_only = [entry.last_only for entry, _ in step]
        started = time.perf_counter()
        for entry, _ in step:
            entry.started = entry.started or started
        try:
            if tracing.enabled:
                outputs = self._traced_segment(step, items, last_only)
            else:
                outputs = self._run_segment(items, last_only)
        except Exception as e:  # noqa: BLE001 -- one bad item must not fail the others: retry them one by one
            if len(step) == 1:
                self._finish(step[0][0], error=e)
                return
            logger.warning("a step of %d items failed (%r); retrying them one by one", len(step), e)
            for one in step:
                self._step([one])
            return
        compute_ms = (time.perf_counter() - started) * 1e3
        chunks = sum(1 for entry, _ in step if entry.item.num_positions > self.decode_rows)
        self._count(len(step), sum(n for _, n in step), compute_ms, chunks)
        if self.chunk_hold_ms:
            answered = time.perf_counter()
            with self._wake:
                self._forget_answered(answered)
                for entry, _ in step:
                    if entry.item.num_positions <= self.decode_rows:
                        self._answered[entry.session_id] = answered
        for (entry, n), out in zip(step, outputs):
            entry.done += n
            entry.compute_ms += compute_ms
            entry.batch = len(step)
            entry.parts.append(out)
            if entry.left == 0:
                self._finish(entry)

    def _traced_segment(self, step: list[tuple[_Entry, int]], items: list[SegmentInput], last_only: list[bool]
                        ) -> list:
        """``_run_segment`` in one span per batched step, linked to the span of every session's step in it."""
        with tracing.span("scheduler.step", links=[entry.trace for entry, _ in step], scheduler=self._thread.name,
                          sessions=len(step), rows=sum(n for _, n in step)):
            return self._run_segment(items, last_only)

    def _run_segment(self, items: list[SegmentInput], last_only: list[bool]) -> list:
        """One segment call per value of last_only among the items (one call, normally)."""
        outputs: list = [None] * len(items)
        for flag in sorted(set(last_only)):
            group = [i for i, f in enumerate(last_only) if f == flag]
            for i, out in zip(group, self.segment([items[i] for i in group], last_only=flag)):
                outputs[i] = out
        return outputs

    def _finish(self, entry: _Entry, error: BaseException | None = None) -> None:
        with self._wake:
            try:
                self._queue.remove(entry)
            except ValueError:
                pass
        if error is not None:
            _fail(entry.future, error)
            return
        parts = entry.parts
        rows = not getattr(self.segment, "has_head", False) or not (entry.last_only or entry.item.sample)
        out = torch.cat(parts) if len(parts) > 1 and rows else parts[-1]  # hidden rows, or every row's logits
        timings = {"queue": (entry.started - entry.queued) * 1e3, "compute": entry.compute_ms,
                   "batch_size": entry.batch}
        entry.future.timings = timings
        if entry.finish is not None:
            try:
                out = entry.finish(out, timings)
            except Exception as e:  # noqa: BLE001 -- the caller's error
                _fail(entry.future, e)
                return
        if not entry.future.done():
            entry.future.set_result(out)

    def _count(self, items: int, rows: int, compute_ms: float, chunks: int) -> None:
        self.stats["steps"] += 1
        self.stats["chunks"] += chunks
        self.stats["items"] += items
        self.stats["rows"] += rows
        self.stats["largest"] = max(self.stats["largest"], items)
        if self.on_step is not None:
            self.on_step(StepStats(items, rows, compute_ms))


def _chunk(entry: _Entry, n: int) -> SegmentInput:
    """Positions [done, done + n) of an entry's step; only the last chunk samples."""
    item = entry.item
    if entry.done == 0 and n == item.num_positions:
        return item
    a, b = entry.done, entry.done + n
    rows = {"input_ids": item.input_ids[a:b]} if item.input_ids is not None else {"hidden": item.hidden[a:b]}
    last = b == item.num_positions
    keep = None if last or not (entry.last_only or item.sample) else 0  # a head's answer comes with the last chunk
    return SegmentInput(item.session_id, item.start_pos + a, sample=item.sample if last else (),
                        reserve=item.reserve if a == 0 else 0, keep=keep, **rows)


def _settle(done: Future, fn: Callable[[], object]) -> None:
    try:
        done.set_result(fn())
    except Exception as e:  # noqa: BLE001 -- handed to the caller
        done.set_exception(e)


def _fail(future: Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class FairLock:
    """A lock its waiters get in the order they asked (threading.Lock lets a busy thread take it again and
    again): two schedulers sharing one CPU through it take turns."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def acquire(self) -> bool:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cond.wait()
        return True

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
