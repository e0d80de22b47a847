"""Reading, writing and validating EncodedTensor fields (shared by all codecs).

Readers check byte lengths against the shape and raise ``CodecError``
subclasses whose message names the field, the expected and the actual value.
"""

from __future__ import annotations

import zlib

import torch

from protos import quant
from protos import splitglm_pb2 as pb
from protos.errors import (
    CorruptPayloadError,
    NonFiniteError,
    OptionError,
    OutlierIndexError,
    PayloadLengthError,
    ShapeError,
)

OPTION_FIELDS = ("outliers_per_token", "group_size", "rotation_block", "rotation_seed",
                 "entropy", "stream_bytes", "rice_parameter")
MAX_INDEXED_HIDDEN = 65536  # outlier indices are uint16


def codec_label(msg: pb.EncodedTensor) -> str:
    """Codec enum name for messages (e.g. 'INT8_OUTLIERS')."""
    return pb.Codec.Name(msg.codec) if msg.codec in pb.Codec.values() else str(msg.codec)


def tobytes(t: torch.Tensor, dtype: str) -> bytes:
    """Tensor -> little-endian bytes of numpy dtype ``dtype`` (e.g. '<f2')."""
    return t.contiguous().numpy().astype(dtype, copy=False).tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, count: int, field: str) -> torch.Tensor:
    """Bytes -> 1-D tensor of ``count`` items, checking the length."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise PayloadLengthError(
            f"{field}: expected {count * itemsize} bytes ({count} x {dtype}), got {len(data)}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def read(msg: pb.EncodedTensor, field: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A byte field of msg -> 1-D tensor of ``count`` items."""
    return from_bytes(getattr(msg, field), dtype, count, f"{field} ({codec_label(msg)})")


def inflate_exact(data: bytes, size: int, field: str) -> bytes:
    """Raw DEFLATE stream -> exactly ``size`` bytes, else a CodecError."""
    try:
        raw = quant.inflate(data, size)
    except zlib.error as e:
        raise CorruptPayloadError(f"{field}: invalid DEFLATE stream: {e}") from e
    if len(raw) != size:
        raise PayloadLengthError(f"{field}: expected {size} bytes after inflating, got {len(raw)}")
    return raw


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError unless every element is finite (two reductions)."""
    if t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
        raise NonFiniteError(f"{what}: contains NaN or infinity")


def read_scales(msg: pb.EncodedTensor, count: int) -> torch.Tensor:
    """fp16 scales: finite and >= 0; returned as float32 (count,)."""
    s = read(msg, "scales", torch.float16, count)
    check_finite(s, "scales")
    if s.numel() and s.amin() < 0:
        raise CorruptPayloadError(f"scales: expected >= 0, got {s.amin().item()}")
    return s.float()


def to_fp16(t: torch.Tensor, field: str) -> torch.Tensor:
    """float32 -> float16, raising NonFiniteError where |t| overflows fp16."""
    h = t.to(torch.float16)
    if h.numel() and not torch.isfinite(h).all():
        raise NonFiniteError(f"{field}: |value| {t.abs().max().item():.6g} overflows fp16 "
                             f"(max {quant.FP16_MAX})")
    return h


def expect_options(msg: pb.EncodedTensor, used: tuple[str, ...]) -> None:
    """Option fields a codec does not use must be left at zero / empty."""
    for name in OPTION_FIELDS:
        value = getattr(msg, name)
        if name not in used and (len(value) if name == "stream_bytes" else value):
            raise OptionError(f"{name}: must be unset for codec {codec_label(msg)}, got {value}")


def expect_empty(msg: pb.EncodedTensor, fields: tuple[str, ...]) -> None:
    """Byte fields a codec does not use must be empty."""
    for name in fields:
        if getattr(msg, name):
            raise PayloadLengthError(f"{name}: expected 0 bytes for codec {codec_label(msg)}, "
                                     f"got {len(getattr(msg, name))}")


def check_group_size(g: int, C: int) -> None:
    if g < 2 or g % 2 or C % g:
        raise OptionError(f"group_size: expected an even divisor of hidden {C}, got {g}")


def check_rotation(block: int, C: int, allow_none: bool = False) -> None:
    if allow_none and block == 0:
        return
    if block < 1 or block > quant.MAX_ROTATION_BLOCK or block & (block - 1) or C % block:
        raise OptionError(f"rotation_block: expected a power of two <= {quant.MAX_ROTATION_BLOCK} "
                          f"dividing hidden {C}{' or 0' if allow_none else ''}, got {block}")


def check_outlier_count(k: int, C: int) -> None:
    if not 0 <= k <= C or (k and C > MAX_INDEXED_HIDDEN):
        raise OptionError(f"outliers_per_token: expected 0..{min(C, MAX_INDEXED_HIDDEN)} "
                          f"for hidden {C}, got {k}")


def encode_outliers(x: torch.Tensor, msg: pb.EncodedTensor, k: int,
                    compress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the k largest-|x| channels of each row (indices ascending).

    Returns idx (T, k) int64 and the (k+1)-th largest |x| of each row (T,).
    """
    check_outlier_count(k, x.shape[1])
    idx, next_abs = quant.top_outliers(x, k)
    idx = idx.sort(dim=1).values  # ascending channels: repetitive, compresses well
    index_bytes = tobytes(idx, "<u2")
    msg.outliers_per_token = k
    msg.outlier_index = quant.deflate(index_bytes, lz77=True) if compress else index_bytes
    msg.outlier_values = tobytes(to_fp16(x.gather(1, idx), "outlier_values"), "<f2")
    return idx, next_abs


def decode_outliers(msg: pb.EncodedTensor, T: int, C: int,
                    compressed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate outliers: idx (T, k) int64 and values (T, k) float32."""
    k = msg.outliers_per_token
    check_outlier_count(k, C)
    data = msg.outlier_index
    if compressed:
        data = inflate_exact(data, 2 * T * k, "outlier_index")
    idx = from_bytes(data, torch.uint16, T * k, "outlier_index").view(T, k).long()
    vals = read(msg, "outlier_values", torch.float16, T * k).view(T, k)
    check_finite(vals, "outlier_values")
    if k and idx.max() >= C:
        raise OutlierIndexError(f"outlier_index: expected < hidden {C}, got {idx.max().item()}")
    if k > 1:
        srt = idx.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if dup.any():
            row = int(dup.nonzero()[0, 0])
            raise OutlierIndexError(f"outlier_index: token {row} repeats a channel: {idx[row].tolist()}")
    return idx, vals.float()


def put_outliers(out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Overwrite the outlier channels of out (T, C) in place."""
    if idx.numel():
        out.scatter_(1, idx, vals)
    return out


def check_shape(x: torch.Tensor) -> torch.Tensor:
    """Validate encoder input; return it as contiguous float32 (T, C) on CPU."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ShapeError(f"input: expected a floating-point torch.Tensor, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ShapeError(f"input: expected a non-empty 2-D (tokens, hidden) tensor, "
                         f"got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    check_finite(x, "input")
    return x
