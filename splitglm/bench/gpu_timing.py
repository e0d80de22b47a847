"""Timing on a GPU shared by the cloud benches: GPU seconds of a call, the copy bandwidth, a lockstep decode rate."""

from __future__ import annotations

import time

import torch

from .stats import median


def gpu_seconds(fn, repeats: int, before=None) -> float:
    """Median GPU time of ``fn()`` in seconds (CUDA events) over ``repeats`` runs after one warm-up run;
    ``before()`` runs untimed ahead of each (an L2 flush)."""
    times = []
    for _ in range(repeats + 1):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times[1:])


def copy_gbps(gib: float = 4.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, GB/s, counting bytes read and written (median of ``repeats``)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / gpu_seconds(lambda: dst.copy_(src), repeats) / 1e9


def random_rows(n: int, width: int) -> torch.Tensor:
    """(n, width) random hidden states (on the host, as frames arrive)."""
    return torch.randn(n, width)


def decode_rate(engine, prompts: list[int], steps: int) -> tuple[float, float]:
    """(decode tokens/s over all sessions, median step ms): one session per prompt length in ``prompts``, its
    prompt first, then ``steps`` lockstep steps of them all."""
    from runtime.sampling import SamplingParams
    from runtime.segment import SegmentInput

    C, greedy, batch = engine.spec.hidden_size, SamplingParams(), len(prompts)
    sids = [f"b{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for sid, prompt in zip(sids, prompts):
        engine([SegmentInput(sid, 0, hidden=random_rows(prompt, C), sample=tuple(greedy.rows(prompt)))])
    step_inputs = [random_rows(batch, C) for _ in range(4)]
    times = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        t0 = time.perf_counter()
        rows = step_inputs[s % 4]
        engine([SegmentInput(sid, n + s, hidden=rows[i : i + 1], sample=tuple(greedy.rows(n + s + 1)))
                for i, (sid, n) in enumerate(zip(sids, prompts))])
        times.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - start
    for sid in sids:
        engine.close_session(sid)
    return batch * steps / wall, median(times)
