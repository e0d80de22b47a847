"""``splitglm bench cloud-gpu --tensor-parallel N``: the CUDA engine split across N GPUs of this machine.

NOT YET RUN: no machine with several GPUs has been lent to this project; the code is untested.

This process is rank 0. It spawns ranks 1 .. N-1 (``torch.multiprocessing``, NCCL), and each rank builds
its shard's engine (``runtime.cuda.CudaEngine`` with ``ranks``): random weights of a shard's shape, or its
slices of ``--model``. Rank 0 drives ``decode_rate`` through a ``runtime.tp_ranks.Leader``, so every step's
inputs are broadcast to the other ranks, as the cloud service does.

Figures:
- decode tokens/s at batch 1 and 32;
- the fraction of the N-card bound: N x one card's copy bandwidth / the whole segment's weight bytes;
- the all-reduce time per step: 2 per layer of (B, C) bf16 rows, timed alone on every rank at once.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .gpu_timing import copy_gbps, decode_rate, gpu_seconds
from .stats import median

HOST, JOIN_S, TIMEOUT_S = "127.0.0.1", 120.0, 600.0


def problem(spec, n: int) -> str | None:
    """Why this machine or shape cannot run ``n`` ranks, or None."""
    from runtime.tensor_parallel import spec_problem

    if n > torch.cuda.device_count():
        return f"--tensor-parallel {n}: this machine has {torch.cuda.device_count()} GPU(s)"
    return spec_problem(spec, n)


def shard_engine(args: argparse.Namespace, spec, ranks):
    """This rank's engine: random weights of a shard's shape, or its slices of ``--model``."""
    from runtime.cuda import CudaEngine
    from runtime.cuda_weights import random_weights

    common = {"dtype": torch.bfloat16, "pool_mib": args.pool_mib, "prefill_chunk": args.prefill_chunk,
              "max_batch": 32, "max_positions": 8192, "ranks": ranks}
    if args.model:
        from runtime.segment import Segment
        from runtime.tensor_parallel import shard_segment

        segment = Segment.from_checkpoint(args.model, 0, spec.num_layers, head=True, dtype=torch.bfloat16)
        return CudaEngine(shard_segment(segment, ranks), **common)
    weights = random_weights(spec, spec.num_layers, embed=False, head=True, dtype=torch.bfloat16, device="cuda",
                             seed=ranks.rank, world=ranks.world)
    return CudaEngine(weights=weights, spec=spec, start=0, head=True, **common)


def all_reduce_ms(spec, batch: int, repeats: int) -> float:
    """GPU ms of one step's all-reduces (2 per layer) of (batch, C) bf16 rows; every rank calls it together."""
    x = torch.randn(batch, spec.hidden_size, dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        for _ in range(2 * spec.num_layers):
            dist.all_reduce(x)

    return gpu_seconds(step, repeats) * 1e3


def _follower(rank: int, n: int, port: int, args: argparse.Namespace, spec) -> None:
    from runtime.tp_ranks import follow, init_ranks, rendezvous, watch_parent

    watch_parent()
    ranks = init_ranks(rank, n, rendezvous(HOST, port, n, JOIN_S, serve=False), "nccl", TIMEOUT_S)
    follow(shard_engine(args, spec, ranks), ranks)
    for batch in (1, 32):
        all_reduce_ms(spec, batch, args.repeats)
    ranks.close()


def run_parallel(args: argparse.Namespace, spec) -> dict:
    """The figures of ``args.tensor_parallel`` ranks (see the module docstring)."""
    from runtime.tp_ranks import Leader, init_ranks, rendezvous

    n = args.tensor_parallel
    store = rendezvous(HOST, 0, n, JOIN_S, serve=True)
    context = mp.get_context("spawn")
    procs = [context.Process(target=_follower, args=(rank, n, store.port, args, spec), daemon=True)
             for rank in range(1, n)]
    for proc in procs:
        proc.start()
    ranks = init_ranks(0, n, store, "nccl", TIMEOUT_S)
    engine = shard_engine(args, spec, ranks)
    leader = Leader(engine, ranks)
    bandwidth = copy_gbps()
    weight_gb = engine.nbytes() * n / 1e9  # every shard holds as many bytes (the head's padding aside)
    bound = n * bandwidth / weight_gb
    out = {"card": torch.cuda.get_device_name(), "cards": n, "torch": torch.__version__,
           "shape": args.model or args.shape, "random_weights": not args.model, "dtype": args.dtype,
           "tensor_parallel": n, "copy_gbps_one_card": round(bandwidth, 1), "weight_gb": round(weight_gb, 3),
           "bound_tok_s": round(bound, 1), "prompt_tokens": 128, "decode_steps": 128, "repeats": args.repeats}
    for b in (1, 32):
        decode_rate(leader, [128] * b, 8)  # captures the graphs of this batch size
        runs = [decode_rate(leader, [128] * b, 128) for _ in range(args.repeats)]
        out[f"tokens_per_s_b{b}"] = round(median(r[0] for r in runs), 1)
        out[f"step_ms_b{b}"] = round(median(r[1] for r in runs), 3)
    out["bound_fraction_b1"] = round(out["tokens_per_s_b1"] / bound, 3)
    leader.stop()  # the followers leave ``follow`` and time the all-reduces with this rank
    for b in (1, 32):
        out[f"all_reduce_ms_per_step_b{b}"] = round(all_reduce_ms(spec, b, args.repeats), 3)
    out["graphs"] = dict(engine.stats)
    for proc in procs:
        proc.join(60)
    ranks.close()
    return out
