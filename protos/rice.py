"""Golomb-Rice bit strings of integer symbols, vectorised with numpy (no tables, no loops over symbols).

A symbol q with parameter r is coded as |q| >> r zero bits and a one bit (the
unary part), the low r bits of |q| (most significant first) and, when q != 0,
a sign bit (1 = negative). The three parts of all symbols are kept in three
consecutive sections of one bit string, so each part decodes with whole-array
operations: the unary parts end at the first N one bits, the low bits have a
known length, and so do the signs once the magnitudes are known.
"""

from __future__ import annotations

import numpy as np

from protos.errors import PayloadLengthError

MAX_PARAMETER = 15  # largest Rice parameter r


def best_parameters(m: np.ndarray) -> np.ndarray:
    """Per row the r in 0..MAX_PARAMETER that codes magnitudes m (T, n) in the fewest bits: (T,) int64."""
    T, n = m.shape
    guess = np.floor(np.log2(np.maximum(m.mean(1), 1.0))).astype(np.int64)  # (T,)
    cand = np.clip(guess[:, None] + np.arange(-1, 2), 0, MAX_PARAMETER)  # (T, 3)
    bits = np.stack([(m >> cand[:, j:j + 1]).sum(1) + n * cand[:, j] for j in range(3)], 1)  # (T, 3)
    return cand[np.arange(T), bits.argmin(1)]


def encode(q: np.ndarray, r: np.ndarray) -> bytes:
    """Symbols q (N,) int64 with parameters r (N,) int64 -> the bit string as bytes."""
    m = np.abs(q)
    hi = m >> r  # (N,)
    unary = np.zeros(int(hi.sum()) + q.size, dtype=np.uint8)
    unary[np.cumsum(hi + 1) - 1] = 1
    low = _low_bits(m, r)
    signs = (q[m > 0] < 0).astype(np.uint8)
    return np.packbits(np.concatenate([unary, low, signs])).tobytes()


def _low_bits(m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The low r bits of each m, most significant first, concatenated: (sum r,) uint8."""
    out = np.empty(int(r.sum()), dtype=np.uint8)
    start = np.cumsum(r) - r
    for b in range(int(r.max(initial=0))):
        sel = r > b
        out[start[sel] + b] = (m[sel] >> (r[sel] - 1 - b)) & 1
    return out


def decode(data: bytes, r: np.ndarray, field: str) -> np.ndarray:
    """Inverse of ``encode`` for N = len(r) symbols: (N,) int64. Every bit must be used, padding zero."""
    n = r.size
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    ones = np.flatnonzero(bits)
    if ones.size < n:
        raise PayloadLengthError(f"{field}: bit string ends after {ones.size} of {n} symbols")
    ends = ones[:n]
    hi = np.diff(ends, prepend=-1) - 1  # (N,)
    pos = int(ends[-1]) + 1 if n else 0
    total_low = int(r.sum())
    if pos + total_low > bits.size:
        raise PayloadLengthError(f"{field}: bit string ends inside the low bits of the symbols")
    m = (hi << r) | _read_low(bits[pos:pos + total_low], r)
    pos += total_low
    nonzero = m > 0
    k = int(nonzero.sum())
    if pos + k > bits.size:
        raise PayloadLengthError(f"{field}: bit string ends inside the signs ({k} expected)")
    q = m.copy()
    q[nonzero] *= 1 - 2 * bits[pos:pos + k].astype(np.int64)
    pos += k
    if (pos + 7) // 8 != len(data) or bits[pos:].any():
        raise PayloadLengthError(f"{field}: expected {(pos + 7) // 8} bytes with zero padding for "
                                 f"{n} symbols, got {len(data)}")
    return q


def _read_low(bits: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inverse of ``_low_bits``: (sum r,) bits -> (N,) int64."""
    out = np.zeros(r.size, dtype=np.int64)
    start = np.cumsum(r) - r
    for b in range(int(r.max(initial=0))):
        sel = r > b
        out[sel] = (out[sel] << 1) | bits[start[sel] + b]
    return out
