"""The ranks of a tensor-parallel replica: process groups, the leader/follower protocol, the watchdogs.

Rank 0, the leader, serves as on one rank: its scheduler calls a ``Leader``, which broadcasts each call (a
step's items, a session closed, forked or reserved) to the other ranks and then runs it on its own shard.
The followers (``follow``) run every call on their shard in the same order, so each collective of a step
meets its peers, and their pools' bookkeeping stays the leader's. Only rank 0 samples: a follower's items
ask for the rows rank 0 samples as logits (the head's gather runs on every rank) and carry no sampling rows.

Two process groups: ``compute``, the default group (NCCL on GPUs, gloo on CPUs), whose collectives time out
after ``timeout_s``; ``control`` (gloo), on which followers wait for the next call as long as the service
idles.

Failure: a collective that fails (a peer died, or hung past ``timeout_s``) marks the replica failed
(``Ranks.fail``: the ``on_failure`` callbacks run once); every call after that raises ``ReplicaDown``, which
the edge sees as UNAVAILABLE and fails over. A follower exits once rank 0's process is gone
(``watch_parent``); rank 0 watches its followers' processes (``watch_processes``).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.scheduler import SchedulerClosed
from runtime.step import SegmentInput

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)  # a follower waits this long for rank 0's next call (the service may idle)
CALLS = ("forward", "close_session", "fork_session", "reserve")  # what a leader forwards to its followers


class ReplicaDown(SchedulerClosed):
    """A rank of this tensor-parallel replica has failed: nothing more runs on it."""


@dataclass
class Ranks:
    """This process's place in a tensor-parallel replica, and the collectives its shard runs."""

    rank: int
    world: int
    compute: object = None  # process group of the steps' collectives (None: the default group)
    control: object = None  # gloo group that carries the leader's calls
    failure: str = ""  # why the replica failed ("" while it works)
    on_failure: list[Callable[[str], None]] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        """Mark the replica failed (once) and tell the callbacks."""
        if self.failure:
            return
        self.failure = reason
        logger.error("rank %d of %d: the tensor-parallel replica is down: %s", self.rank, self.world, reason)
        for callback in self.on_failure:
            callback(reason)

    def check(self) -> None:
        if self.failure:
            raise ReplicaDown(f"the tensor-parallel replica is down ({self.failure})")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        self._collective(dist.all_reduce, x, group=self.compute)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (..., P), joined along the last dim: (..., W * P)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._collective(dist.all_gather, parts, x.contiguous(), group=self.compute)
        return torch.cat(parts, dim=-1)

    def broadcast(self, call: object = None) -> object:
        """Rank 0's ``call``, on every rank (followers wait for it without a time limit)."""
        box = [call]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Leave the process groups; call it before the process exits (a group still held then can abort the
        exit: "terminate called without an active exception")."""
        if not dist.is_initialized():
            return
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 -- a failed replica's groups: the process is leaving anyway
            logger.warning("rank %d: leaving the process groups failed: %r", self.rank, e)

    def _collective(self, fn, *args, **kwargs) -> None:
        self.check()
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a peer is gone or hung: the whole replica is
            self.fail(f"{fn.__name__} failed: {e!r}")
            raise ReplicaDown(f"the tensor-parallel replica is down ({self.failure})") from e


def init_ranks(rank: int, world: int, store: dist.Store, backend: str, timeout_s: float) -> Ranks:
    """Join the replica's process groups through ``store`` (blocks until every rank has joined)."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Ranks(rank, world, compute=None, control=control)


def rendezvous(host: str, port: int, world: int, timeout_s: float, serve: bool) -> dist.TCPStore:
    """The store the ranks meet at: rank 0 ``serve``s it (port 0: a free one, ``store.port``); the others
    connect to it."""
    return dist.TCPStore(host, port, world, is_master=serve, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class Leader:
    """Rank 0's segment: every call goes to the followers first, then runs on this rank's shard."""

    def __init__(self, shard, ranks: Ranks):
        self.shard, self.ranks = shard, ranks
        self.spec, self.has_embed, self.has_head = shard.spec, shard.has_embed, shard.has_head
        self.start, self.end = shard.start, shard.end
        self.masks_while_running = getattr(shard, "masks_while_running", False)
        self.mixed_passes = getattr(shard, "mixed_passes", False)  # (the scheduler's chunk hold reads it)
        if hasattr(shard, "prefill_chunk"):  # the CUDA engine's captured chunk (the scheduler reads it)
            self.prefill_chunk = shard.prefill_chunk
        self._lock = threading.Lock()  # a call is broadcast and run before the next one starts

    def __call__(self, items: list[SegmentInput], last_only: bool = False) -> list:
        with self._lock:
            self._send("forward", [follower_item(item) for item in items], last_only)
            return self.shard(items, last_only)

    def close_session(self, session_id: str) -> None:
        self._both("close_session", session_id)

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        self._both("fork_session", src, dst, length, reserve)

    def reserve(self, session_id: str, positions: int) -> None:
        self._both("reserve", session_id, positions)

    @property
    def sessions(self) -> dict:
        return self.shard.sessions

    @property
    def pool(self):
        return self.shard.pool

    @property
    def stats(self):
        return self.shard.stats

    def stop(self) -> None:
        """Tell the followers to exit (a clean shutdown); nothing to tell once the replica has failed."""
        with self._lock:
            if not self.ranks.failure:
                self.ranks.broadcast(("stop", ()))

    def _both(self, op: str, *args) -> None:
        with self._lock:
            self._send(op, *args)
            getattr(self.shard, op)(*args)

    def _send(self, op: str, *args) -> None:
        self.ranks.broadcast((op, args))


def follower_item(item: SegmentInput) -> SegmentInput:
    """A step's item as a follower runs it: the rows rank 0 samples come back as logits, nothing is sampled."""
    if not item.sample:
        return item
    return replace(item, sample=(), keep=len(item.sample))


def follow(shard, ranks: Ranks) -> int:
    """Run rank 0's calls on this shard until it says stop (0) or the replica fails (1)."""
    while True:
        try:
            op, args = ranks.broadcast()
        except ReplicaDown:
            return 1
        if op == "stop":
            return 0
        if op not in CALLS:
            ranks.fail(f"rank 0 sent an unknown call {op!r}")
            return 1
        try:
            shard(*args) if op == "forward" else getattr(shard, op)(*args)
        except ReplicaDown:
            return 1
        except Exception as e:  # noqa: BLE001 -- rank 0 ran the same call and answers its caller with this error
            logger.debug("rank %d: %s failed as on rank 0: %r", ranks.rank, op, e)


def watch_parent() -> None:
    """Exit this process (code 1) as soon as its parent (rank 0) is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.error("rank 0's process is gone: this rank exits")
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def watch_processes(procs: list[multiprocessing.Process], on_exit: Callable[[str], None]) -> threading.Event:
    """Call ``on_exit(reason)`` when any of ``procs`` exits; set the returned event first to exit them quietly."""
    quiet = threading.Event()

    def watch() -> None:
        ready = multiprocessing.connection.wait([p.sentinel for p in procs])
        if quiet.is_set():
            return
        gone = next(p for p in procs if p.sentinel in ready)
        gone.join(1.0)
        on_exit(f"{gone.name} (pid {gone.pid}) exited with code {gone.exitcode}")

    threading.Thread(target=watch, name="tp-rank-watch", daemon=True).start()
    return quiet
