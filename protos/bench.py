"""Codec micro-benchmark: bytes per element and encode/decode time.

``bench_codecs()`` uses hidden-state-like data: standard normal values with a
few fixed channels of magnitude 1e3..2e4 (as in GLM / Llama-family models) and
an attention-sink first token.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from protos.codecs import CODECS, decode, encode
from protos.frames import frame_to_bytes, make_frame

log = logging.getLogger(__name__)


def hidden_like(shape: tuple[int, int], seed: int = 0, outlier_channels: int = 6) -> torch.Tensor:
    """Random (T, C) float32 with a few huge channels and a huge first token."""
    T, C = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g)  # (T, C)
    chans = torch.randperm(C, generator=g)[:min(outlier_channels, C)]
    mags = torch.logspace(3, 4.3, len(chans))  # 1e3 .. 2e4
    x[0] *= 30  # attention sink: a first token with a large bulk
    x[:, chans] = mags * (1 + 0.1 * torch.randn(T, len(chans), generator=g))
    return x


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of fn() over repeats runs (after one warm-up) and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def bench_codec(x: torch.Tensor, codec: str, repeats: int = 5, **options: Any) -> dict[str, Any]:
    """Bytes per element (whole Frame) and median encode/decode ms of one codec."""
    enc_ms, msg = _median_ms(lambda: encode(x, codec, **options), repeats)
    dec_ms, y = _median_ms(lambda: decode(msg, x.shape[1]), repeats)
    frame = make_frame("0" * 32, 1, 0, None)
    frame.hidden.CopyFrom(msg)
    err = (y - x).pow(2).sum() / x.pow(2).sum()
    return {
        "codec": codec,
        "options": options,
        "bytes_per_element": len(frame_to_bytes(frame)) / x.numel(),
        "tensor_bytes_per_element": msg.ByteSize() / x.numel(),
        "encode_ms": enc_ms,
        "decode_ms": dec_ms,
        "relative_mse": err.item(),
    }


def bench_codecs(shape: tuple[int, int] = (2048, 4096), codecs: Iterable[str] = CODECS,
                 threads: int = 1, repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Benchmark each codec on hidden-state-like data with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = hidden_like(shape, seed)
        rows = []
        for codec in codecs:
            rows.append(bench_codec(x, codec, repeats))
            log.info("%s", rows[-1])
        return rows
    finally:
        torch.set_num_threads(previous)
