"""``--tensor-parallel N``: the cloud segment split across N processes (one per GPU), rank 0 serving gRPC.

The service's own process is rank 0: it spawns ranks 1 .. N-1 (``torch.multiprocessing``, spawn), meets
them at a TCP store on loopback, loads its shard and serves exactly as one rank does, its scheduler calling
a ``runtime.tp_ranks.Leader`` that broadcasts each call to the followers. Collectives run over NCCL on
cuda (rank r on GPU r), over gloo on cpu. Each rank keeps only its slices of the plan's cloud tier and only
its KV heads; it reads the whole tier on the host first, then slices it (host memory: N copies while loading).

Failure: a follower that exits, or a collective that fails or hangs past ``tp_timeout_s``, takes the replica
down: health NOT_SERVING, the process exits with code 1 (after ``grace_s``), the edge fails over. A follower
exits as soon as rank 0's process is gone. Settings this machine or model cannot take exit 2 before anything
starts (``check``).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from runtime.checkpoint import CheckpointError, load_spec
from runtime.tensor_parallel import spec_problem
from runtime.tp_ranks import Leader, Ranks, follow, init_ranks, rendezvous, watch_parent, watch_processes

from .server import CloudServer, load_segment, resolve_device, serve
from .settings import CloudSettings, SettingsError

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"  # the ranks meet on loopback: one replica is one machine
JOIN_S = 30.0  # longest wait of a process for the others to start, seconds


def check(settings: CloudSettings) -> None:
    """SettingsError for a tensor-parallel size this machine or the plan's model cannot take."""
    n = settings.tensor_parallel
    if n == 1:
        return
    device = resolve_device(settings.device)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise SettingsError(f"tensor_parallel {n}: this machine has {torch.cuda.device_count()} GPU(s), and each "
                            "rank needs its own")
    if settings.dtype == "fp8":
        raise SettingsError("tensor_parallel does not take fp8 weights yet: pass --dtype bfloat16")
    try:
        spec = load_spec(Path(settings.plan) / "cloud")
    except CheckpointError:
        return  # not a plan folder: serving it says so (exit 1)
    problem = spec_problem(spec, n)
    if problem:
        raise SettingsError(f"tensor_parallel {n}: {problem} ({spec.num_heads} query heads, {spec.num_kv_heads} KV "
                            f"heads, MLP width {spec.intermediate_size})")


class Replica:
    """Rank 0's view of the other ranks: their processes and the leader that drives them."""

    def __init__(self, ranks: Ranks, procs: list, leader: Leader | None = None):
        self.ranks, self.procs, self.leader = ranks, procs, leader
        self.quiet = watch_processes(procs, ranks.fail)  # a follower gone: the replica fails

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the followers to exit and wait for them (those left after ``timeout`` are terminated)."""
        self.quiet.set()
        if self.leader is not None:
            try:
                self.leader.stop()
            except Exception as e:  # noqa: BLE001 -- a replica that failed while stopping: terminated below
                logger.warning("the followers did not take the stop: %r", e)
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning("%s (pid %d) did not exit: terminated", proc.name, proc.pid)
                proc.terminate()
                proc.join(timeout)
        self.ranks.close()


def backend(settings: CloudSettings) -> str:
    return "nccl" if resolve_device(settings.device).type == "cuda" else "gloo"


def serve_parallel(settings: CloudSettings, on_failure: Callable[[], None]) -> CloudServer:
    """Spawn the followers, join them as rank 0, load its shard and serve; ``on_failure()`` once the replica
    fails (the process then stops with code 1)."""
    check(settings)
    n = settings.tensor_parallel
    store = rendezvous(HOST, 0, n, JOIN_S, serve=True)
    context = mp.get_context("spawn")
    procs = [context.Process(target=follower_main, args=(settings, rank, store.port), name=f"rank {rank}",
                             daemon=True) for rank in range(1, n)]
    for proc in procs:
        proc.start()
        logger.info("tensor parallel: %s of %d runs as pid %d", proc.name, n, proc.pid)
    try:
        ranks = init_ranks(0, n, store, backend(settings), settings.tp_timeout_s)
    except RuntimeError as e:  # a rank did not come (torch.distributed's errors are RuntimeErrors)
        _end(procs)
        raise OSError(f"the {n} tensor-parallel ranks did not meet: {e}") from None
    replica = Replica(ranks, procs)
    try:
        shard, _ = load_segment(settings.plan, settings, ranks)
        replica.leader = Leader(shard, ranks)
        server = serve(settings, segment=replica.leader)
    except BaseException:
        replica.stop(1.0)
        raise
    server.replica = replica
    ranks.on_failure.append(lambda reason: (server.fail(f"tensor parallel: {reason}"), on_failure()))
    if ranks.failure:  # (a rank died while this one loaded)
        server.fail(ranks.failure)
        on_failure()
    logger.info("tensor parallel: %d ranks over %s, each with %d of %d KV heads", n, backend(settings),
                shard.kv_heads, shard.spec.num_kv_heads)
    return server


def _end(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join(5.0)


def follower_main(settings: CloudSettings, rank: int, port: int) -> None:
    """A follower's process: join the replica, load this rank's shard, run rank 0's calls until it stops."""
    for number in (signal.SIGINT, signal.SIGTERM):  # (Ctrl-C, or a stop of the process group): rank 0 stops them
        signal.signal(number, signal.SIG_IGN)
    settings.setup_logging()
    watch_parent()
    n = settings.tensor_parallel
    try:
        torch.set_num_threads(settings.threads)
        ranks = init_ranks(rank, n, rendezvous(HOST, port, n, JOIN_S, serve=False), backend(settings),
                           settings.tp_timeout_s)
        shard, _ = load_segment(settings.plan, settings, ranks)
    except Exception:
        logger.exception("rank %d of %d could not start", rank, n)
        sys.exit(1)
    logger.info("rank %d of %d: ready, %d of %d KV heads", rank, n, shard.kv_heads, shard.spec.num_kv_heads)
    code = follow(shard, ranks)
    ranks.close()
    sys.exit(code)
