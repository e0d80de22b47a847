"""Codecs below one byte per element: int4 groups, rotated int4, entropy coded (DEFLATE, Golomb-Rice).

Each codec is an encoder ``(x (T, C) float32, msg, **options) -> None`` that
fills the EncodedTensor, and a decoder ``(msg, T, C) -> (T, C) float32``
that validates every field it reads.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protos import quant, rice, wire
from protos import splitglm_pb2 as pb
from protos.errors import CorruptPayloadError, OptionError, PayloadLengthError

ROTATION_SEED = 0x5EED6C6D  # default seed of the rotation signs
DEFAULT_CONTEXTS = 4  # channel classes of ec+outliers for frames of many tokens
CONTEXT_MIN_TOKENS = 64  # below this the class map costs more than it saves
MAX_CONTEXTS = 16
# gr+outliers: quantisation MSE relative to the token's mean square (outliers left out). Chosen on
# Python source (argparse.py) as the largest of 0.0052..0.0075 within +1% perplexity at splits 10,20
# of the demo model; judged on GPL-3 (README).
DEFAULT_DISTORTION = 0.0065
MIN_DISTORTION = 1e-8  # below this the symbols outgrow MAX_SYMBOL
FP16_TINY = 2.0**-24  # smallest positive fp16
MAX_SYMBOL = 1 << 24  # largest |symbol|: |x| / step is at most sqrt(C) / sqrt(12 * D)


def _without_outliers(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Copy of x (T, C) with the outlier channels of each row set to 0."""
    return x.clone().scatter_(1, idx, 0.0)


# ---------------------------------------------------------------- int4+outliers


def encode_int4(x: torch.Tensor, msg: pb.EncodedTensor, outliers_per_token: int = 8,
                group_size: int = 32) -> None:
    """Group-wise symmetric int4 (levels -7..7) of the non-outlier channels."""
    T, C = x.shape
    wire.check_group_size(group_size, C)
    idx, _ = wire.encode_outliers(x, msg, outliers_per_token)
    r = _without_outliers(x, idx)  # (T, C)
    amax = quant.absmax_rows(r.view(-1, group_size)).view(T, C // group_size)
    s = wire.to_fp16(quant.fp16_round_up(amax / 7), "scales")  # (T, G)
    msg.group_size = group_size
    msg.scales = wire.tobytes(s, "<f2")
    msg.values = quant.pack_int4(quant.quantize(r, quant.safe_reciprocal(s), 7)).numpy().tobytes()


def decode_int4(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ("outliers_per_token", "group_size"))
    wire.expect_empty(msg, ("channel_class",))
    g = msg.group_size
    wire.check_group_size(g, C)
    s = wire.read_scales(msg, T * (C // g)).view(T, C // g)
    idx, vals = wire.decode_outliers(msg, T, C)
    q = quant.unpack_int4(wire.read(msg, "values", torch.uint8, T * C // 2)).view(T, C)
    return wire.put_outliers(quant.dequantize(q, s), idx, vals)


# ---------------------------------------------------------------- rot-int4+outliers


def encode_rot_int4(x: torch.Tensor, msg: pb.EncodedTensor, outliers_per_token: int = 4,
                    rotation_block: int | None = None, rotation_seed: int = ROTATION_SEED,
                    clip: float = 2.5) -> None:
    """Outliers out, block-Hadamard rotation, int4 with scale clip * rms / 7 per token."""
    T, C = x.shape
    block = rotation_block or quant.default_rotation_block(C)
    wire.check_rotation(block, C)
    if not clip > 0:
        raise OptionError(f"clip: expected > 0, got {clip}")
    idx, _ = wire.encode_outliers(x, msg, outliers_per_token)
    y = quant.rotate(_without_outliers(x, idx), block, rotation_seed)  # (T, C)
    s = wire.to_fp16(quant.row_rms(y) * (clip / 7), "scales")  # (T,)
    msg.rotation_block, msg.rotation_seed = block, rotation_seed
    msg.scales = wire.tobytes(s, "<f2")
    msg.values = quant.pack_int4(quant.quantize(y, quant.safe_reciprocal(s)[:, None], 7)).numpy().tobytes()


def decode_rot_int4(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ("outliers_per_token", "rotation_block", "rotation_seed"))
    wire.expect_empty(msg, ("channel_class",))
    wire.check_rotation(msg.rotation_block, C)
    s = wire.read_scales(msg, T)  # (T,)
    idx, vals = wire.decode_outliers(msg, T, C)
    q = quant.unpack_int4(wire.read(msg, "values", torch.uint8, T * C // 2)).view(T, C)
    y = quant.dequantize(q, s[:, None])
    return wire.put_outliers(quant.unrotate(y, msg.rotation_block, msg.rotation_seed), idx, vals)


# ---------------------------------------------------------------- ec+outliers


def encode_ec(x: torch.Tensor, msg: pb.EncodedTensor, outliers_per_token: int = 4,
              step: float = 0.28, contexts: int | None = None, rotation_block: int = 0,
              rotation_seed: int = ROTATION_SEED, entropy: str = "deflate") -> None:
    """Uniform step = step * rms per token, int8 symbols, DEFLATE per channel class.

    ``contexts`` channel classes (default DEFAULT_CONTEXTS for frames of at
    least CONTEXT_MIN_TOKENS tokens, else 1) each get their own Huffman table.
    """
    T, C = x.shape
    if not step > 0:
        raise OptionError(f"step: expected > 0, got {step}")
    if entropy not in ("deflate", "none"):
        raise OptionError(f"entropy: expected 'deflate' or 'none', got {entropy!r}")
    wire.check_rotation(rotation_block, C, allow_none=True)
    compress = entropy == "deflate"
    idx, _ = wire.encode_outliers(x, msg, outliers_per_token, compress=compress)
    y = _without_outliers(x, idx)  # (T, C)
    if rotation_block:
        y = quant.rotate(y, rotation_block, rotation_seed)
        msg.rotation_block, msg.rotation_seed = rotation_block, rotation_seed
    s = wire.to_fp16(quant.row_rms(y) * step, "scales")  # (T,)
    msg.scales = wire.tobytes(s, "<f2")
    q = quant.quantize(y, quant.safe_reciprocal(s)[:, None], 127)  # (T, C)
    if not compress:
        msg.values = q.numpy().tobytes()
        return
    k = contexts if contexts is not None else (DEFAULT_CONTEXTS if T >= CONTEXT_MIN_TOKENS else 1)
    if not 1 <= k <= min(MAX_CONTEXTS, C):
        raise OptionError(f"contexts: expected 1..{min(MAX_CONTEXTS, C)}, got {k}")
    _deflate_classes(q, quant.channel_classes(q, k), k, msg)


def _deflate_classes(q: torch.Tensor, cls: torch.Tensor, k: int, msg: pb.EncodedTensor) -> None:
    """One Huffman-only DEFLATE stream per channel class: q (T, C), cls (C,) in [0, k)."""
    streams = [quant.deflate(q[:, cls == c].numpy().tobytes()) for c in range(k)]
    msg.entropy = pb.ENTROPY_DEFLATE
    if k > 1:
        msg.channel_class = cls.to(torch.uint8).numpy().tobytes()
    msg.stream_bytes.extend(len(s) for s in streams)
    msg.values = b"".join(streams)


def _inflate_classes(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    """Inverse of _deflate_classes: validated symbols (T, C) int8."""
    sizes = list(msg.stream_bytes)
    k = len(sizes)
    if not 1 <= k <= MAX_CONTEXTS:
        raise OptionError(f"stream_bytes: expected 1..{MAX_CONTEXTS} streams, got {k}")
    if sum(sizes) != len(msg.values):
        raise PayloadLengthError(f"values: stream_bytes add up to {sum(sizes)}, got {len(msg.values)} bytes")
    if k == 1:
        wire.expect_empty(msg, ("channel_class",))
        cls = torch.zeros(C, dtype=torch.long)
    else:
        cls = wire.read(msg, "channel_class", torch.uint8, C).long()  # (C,)
        if cls.max() >= k:
            raise CorruptPayloadError(f"channel_class: expected < {k} streams, got {cls.max().item()}")
    counts = torch.bincount(cls, minlength=k).tolist()
    grouped = torch.empty(T, C, dtype=torch.int8)  # channels grouped by class
    start = col = 0
    for c, (size, n) in enumerate(zip(sizes, counts)):
        raw = wire.inflate_exact(msg.values[start:start + size], T * n, f"values stream {c}")
        if n:
            grouped[:, col:col + n] = torch.frombuffer(bytearray(raw), dtype=torch.int8).view(T, n)
        start, col = start + size, col + n
    q = torch.empty_like(grouped)
    q[:, torch.argsort(cls, stable=True)] = grouped
    return q


def decode_ec(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ("outliers_per_token", "rotation_block", "rotation_seed",
                              "entropy", "stream_bytes"))
    wire.check_rotation(msg.rotation_block, C, allow_none=True)
    if not msg.rotation_block and msg.rotation_seed:
        raise OptionError(f"rotation_seed: must be 0 without rotation, got {msg.rotation_seed}")
    s = wire.read_scales(msg, T)  # (T,)
    if msg.entropy == pb.ENTROPY_DEFLATE:
        q = _inflate_classes(msg, T, C)
    elif msg.entropy == pb.ENTROPY_NONE:
        wire.expect_empty(msg, ("channel_class",))
        if len(msg.stream_bytes):
            raise OptionError(f"stream_bytes: must be unset without entropy coding, "
                              f"got {list(msg.stream_bytes)}")
        q = wire.read(msg, "values", torch.int8, T * C).view(T, C)
    else:
        raise OptionError(f"entropy: expected ENTROPY_NONE or ENTROPY_DEFLATE, got {msg.entropy}")
    idx, vals = wire.decode_outliers(msg, T, C, compressed=msg.entropy == pb.ENTROPY_DEFLATE)
    y = quant.dequantize(q, s[:, None])
    if msg.rotation_block:
        y = quant.unrotate(y, msg.rotation_block, msg.rotation_seed)
    return wire.put_outliers(y, idx, vals)


# ---------------------------------------------------------------- gr+outliers


def encode_gr(x: torch.Tensor, msg: pb.EncodedTensor, outliers_per_token: int = 4,
              distortion: float = DEFAULT_DISTORTION) -> None:
    """Uniform step sqrt(12 * distortion) * rms per token, Golomb-Rice coded with one parameter per token.

    ``distortion`` is the quantisation MSE (step^2 / 12) relative to the mean square
    of the token without its outliers.
    """
    T, C = x.shape
    if not MIN_DISTORTION <= distortion <= 1:
        raise OptionError(f"distortion: expected {MIN_DISTORTION}..1, got {distortion}")
    idx, _ = wire.encode_outliers(x, msg, outliers_per_token)
    y = _without_outliers(x, idx)  # (T, C)
    rms = quant.row_rms(y)  # (T,)
    step = torch.where(rms > 0, (rms * math.sqrt(12 * distortion)).clamp_min(FP16_TINY), rms)
    s = wire.to_fp16(step, "scales")  # (T,): never rounded to 0 for a non-zero token
    q = torch.round(y * quant.safe_reciprocal(s)[:, None]).clamp_(-MAX_SYMBOL, MAX_SYMBOL)  # (T, C)
    sym = _coded(q.numpy(), idx.numpy(), C - outliers_per_token)  # (T, C - k)
    r = rice.best_parameters(np.abs(sym))  # (T,)
    msg.scales = wire.tobytes(s, "<f2")
    msg.rice_parameter = r.astype(np.uint8).tobytes()
    msg.values = rice.encode(sym.ravel(), np.repeat(r, sym.shape[1]))


def _coded(q: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """The symbols of the non-outlier channels of each row, channels increasing: (T, C), (T, k) -> (T, n)."""
    keep = np.ones(q.shape, dtype=bool)
    np.put_along_axis(keep, idx, False, axis=1)
    return q[keep].astype(np.int64).reshape(q.shape[0], n)


def decode_gr(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ("outliers_per_token", "rice_parameter"))
    wire.expect_empty(msg, ("channel_class",))
    s = wire.read_scales(msg, T)  # (T,)
    idx, vals = wire.decode_outliers(msg, T, C)
    r = wire.read(msg, "rice_parameter", torch.uint8, T).numpy().astype(np.int64)  # (T,)
    if r.size and r.max() > rice.MAX_PARAMETER:
        raise CorruptPayloadError(f"rice_parameter: expected <= {rice.MAX_PARAMETER}, got {r.max()}")
    n = C - msg.outliers_per_token
    sym = rice.decode(msg.values, np.repeat(r, n), f"values ({wire.codec_label(msg)})")  # (T * n,)
    keep = torch.ones(T, C, dtype=torch.bool).scatter_(1, idx, False)
    y = torch.zeros(T, C)
    y[keep] = (torch.from_numpy(sym).view(T, n).float() * s[:, None]).view(-1)
    return wire.put_outliers(y, idx, vals)
