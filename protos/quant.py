"""Pure tensor maths of the hidden-state codecs (no protobuf, no validation).

Tensors are (T, C): T tokens, C hidden channels. Work on large tensors is done
in blocks of rows (``row_blocks``) so temporaries stay small and are reused:
on CPU, touching fresh memory costs more than the arithmetic itself.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import torch

FP16_MAX = 65504.0
BLOCK_ELEMENTS = 1 << 18  # elements per row block of temporaries
MAX_ROTATION_BLOCK = 1024


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Slices of about BLOCK_ELEMENTS elements covering ``rows`` rows."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def absmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Largest |x| of each row: (T, C) -> (T,)."""
    return torch.maximum(x.amax(1), x.amin(1).neg())


def fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Positive float32 -> float16 rounded up, so the stored scale is >= s."""
    h = s.to(torch.float16)
    low = h.float() < s
    return torch.where(low, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def safe_reciprocal(s: torch.Tensor) -> torch.Tensor:
    """1/s with 0 where s == 0 (all-zero rows quantise to 0)."""
    s = s.float()
    return torch.where(s > 0, 1.0 / s.clamp_min(1e-38), torch.zeros_like(s))


def quantize(x: torch.Tensor, inv_scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x * inv_scale) clamped to [-qmax, qmax] as int8: (T, C), (T, G) -> (T, C).

    ``inv_scale`` has one entry per group of C // G consecutive channels.
    """
    T, C = x.shape
    G = inv_scale.shape[1]
    out = torch.empty(T, C, dtype=torch.int8)
    buf = torch.empty(row_blocks(T, C)[0].stop if T else 0, G, C // G)
    for rows in row_blocks(T, C):
        b = buf[: rows.stop - rows.start]  # (R, G, C/G)
        torch.mul(x[rows].view(-1, G, C // G), inv_scale[rows, :, None], out=b)
        b.round_().clamp_(-qmax, qmax)
        out[rows].view(-1, G, C // G).copy_(b)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale per group: (T, C) int, (T, G) -> (T, C) float32."""
    T, C = q.shape
    G = scale.shape[1]
    out = torch.empty(T, C)
    out.copy_(q)
    out.view(T, G, C // G).mul_(scale.float()[:, :, None])
    return out


def top_outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-|x| channels of each row and the (k+1)-th largest |x|.

    Returns idx (T, k) int64 and next_abs (T,) float32 (0 when k == C).
    """
    T, C = x.shape
    m = min(k + 1, C)
    vals = torch.empty(T, m)
    idx = torch.empty(T, m, dtype=torch.long)
    buf = torch.empty(row_blocks(T, C)[0].stop if T else 0, C)
    for rows in row_blocks(T, C):
        a = buf[: rows.stop - rows.start]  # (R, C)
        torch.abs(x[rows], out=a)
        vals[rows], idx[rows] = _topk_by_blocks(a, m)
    next_abs = vals[:, k] if k < C else torch.zeros(T)
    return idx[:, :k].contiguous(), next_abs


def _topk_by_blocks(a: torch.Tensor, m: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(a, m, dim=1) for a >= 0, faster for small m: (R, C) -> (R, m), (R, m).

    The m largest values of a row lie in the m blocks with the largest maxima
    (those maxima are m values of the row), so topk runs on m * block candidates.
    """
    R, C = a.shape
    b = math.gcd(C, block)
    if C // b <= m or b == 1:
        return torch.topk(a, m, dim=1)
    blocks = a.view(R, C // b, b)  # (R, NB, b)
    top_blocks = blocks.amax(2).topk(m, dim=1).indices  # (R, m)
    cand = blocks.gather(1, top_blocks[:, :, None].expand(R, m, b)).view(R, m * b)
    v, ci = cand.topk(m, dim=1)  # (R, m)
    return v, top_blocks.gather(1, ci // b) * b + ci % b


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], even count -> uint8 bytes, low nibble first."""
    u = (q.reshape(-1, 2).to(torch.int16) + 8).to(torch.uint8)  # (N/2, 2)
    return u[:, 0] | (u[:, 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N/2,) -> int8 (N,) in [-8, 7]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)


@functools.lru_cache(maxsize=8)
def hadamard(b: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (b, b); b a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


@functools.lru_cache(maxsize=32)
def random_signs(n: int, seed: int) -> torch.Tensor:
    """n signs in {-1, +1} from splitmix64(seed + i): stable across versions."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(63)).astype(np.float32) * 2 - 1)


def default_rotation_block(c: int, largest: int = 64) -> int:
    """Largest power of two <= ``largest`` dividing c."""
    return math.gcd(c, largest)


def rotate(x: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """x * signs, then each block of channels times H: (T, C) -> (T, C)."""
    T, C = x.shape
    y = x * random_signs(C, seed)
    return (y.view(T, C // block, block) @ hadamard(block)).view(T, C)


def unrotate(y: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """Inverse of ``rotate`` (H is symmetric and orthonormal): (T, C) -> (T, C)."""
    T, C = y.shape
    x = (y.reshape(T, C // block, block) @ hadamard(block)).view(T, C)
    return x.mul_(random_signs(C, seed))


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row: (T, C) -> (T,)."""
    return torch.linalg.vector_norm(x, dim=1) / math.sqrt(x.shape[1])


def deflate(data: bytes, lz77: bool = False) -> bytes:
    """Raw DEFLATE; Huffman-only by default (quantised symbols are i.i.d.-like,
    LZ77 finds nothing in them but costs time)."""
    strategy = zlib.Z_DEFAULT_STRATEGY if lz77 else zlib.Z_HUFFMAN_ONLY
    c = zlib.compressobj(6, zlib.DEFLATED, -15, 9, strategy)
    return c.compress(data) + c.flush()


def inflate(data: bytes, size: int) -> bytes:
    """Inverse of ``deflate``; returns at most size + 1 bytes (bomb-safe).

    Raises zlib.error on corrupt input or when the stream does not end there;
    the caller checks the length.
    """
    d = zlib.decompressobj(-15)
    out = d.decompress(data, size + 1)
    if not d.eof or d.unused_data:
        raise zlib.error(f"stream did not end after {size} bytes")
    return out


def channel_classes(q: torch.Tensor, k: int) -> torch.Tensor:
    """Split channels into k equally populated classes by spread: (T, C) -> (C,) in [0, k)."""
    C = q.shape[1]
    if k <= 1:
        return torch.zeros(C, dtype=torch.long)
    spread = q.float().pow_(2).mean(0)  # (C,)
    rank = torch.argsort(spread, stable=True)
    cls = torch.empty(C, dtype=torch.long)
    cls[rank] = torch.arange(C) * k // C
    return cls
