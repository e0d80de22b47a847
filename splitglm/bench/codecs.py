"""``splitglm bench codecs``: bytes per element and encode/decode time of every codec.

``bench_codecs()`` uses hidden-state-like data: standard normal values with a
few fixed channels of magnitude 1e3..2e4 (as in GLM / Llama-family models) and
an attention-sink first token.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from protos.codecs import CODECS, decode, encode
from protos.frames import frame_to_bytes, make_frame

from .options import add_command
from .stats import median

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
    return median(times), result


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


def add_parser(sub) -> None:
    p = add_command(sub, "codecs", run, "encode/decode time and size of every codec")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    rows = bench_codecs(shape=(args.tokens, args.hidden), threads=args.threads)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"encode + decode of a {args.tokens} x {args.hidden} fp32 tensor, {args.threads} thread(s)")
    print(f"{'codec':<20} {'B/elt':>7} {'encode ms':>10} {'decode ms':>10} {'total ms':>9}")
    for r in rows:
        total = r["encode_ms"] + r["decode_ms"]
        print(
            f"{r['codec']:<20} {r['bytes_per_element']:>7.4f} {r['encode_ms']:>10.2f} "
            f"{r['decode_ms']:>10.2f} {total:>9.2f}"
        )
    return 0
