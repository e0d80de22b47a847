"""Hidden-state codecs: (T, C) float tensor <-> ``EncodedTensor``.

``encode(x, codec, **options)`` and ``decode(msg, hidden_size)``. Decoding
validates everything a sender controls and raises a ``CodecError`` subclass
naming the field, the expected and the actual value. The maths lives in
``protos.quant``, field handling in ``protos.wire``, sub-byte codecs in
``protos.lowbit``; the wire layout is documented in ``splitglm.proto``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from protos import lowbit, quant, wire
from protos import splitglm_pb2 as pb
from protos.errors import OptionError, ShapeError, SizeLimitError, UnknownCodecError

DEFAULT_MAX_ELEMENTS = 1 << 27  # elements (T * C) a decoder accepts: 512 MiB as float32


@dataclass(frozen=True)
class _Spec:
    """One codec: wire id, encoder and decoder."""

    enum: int
    encoder: Callable[..., None]  # (x (T, C) float32, msg, **options) -> None, fills msg
    decoder: Callable[[pb.EncodedTensor, int, int], torch.Tensor]  # (msg, T, C) -> (T, C)


def _encode_fp32(x: torch.Tensor, msg: pb.EncodedTensor) -> None:
    msg.values = wire.tobytes(x, "<f4")


def _decode_fp32(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ())
    wire.expect_empty(msg, ("scales", "outlier_index", "outlier_values", "channel_class"))
    return wire.read(msg, "values", torch.float32, T * C).view(T, C)


def _encode_fp16(x: torch.Tensor, msg: pb.EncodedTensor) -> None:
    msg.values = wire.tobytes(wire.to_fp16(x, "values"), "<f2")


def _decode_fp16(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    wire.expect_options(msg, ())
    wire.expect_empty(msg, ("scales", "outlier_index", "outlier_values", "channel_class"))
    return wire.read(msg, "values", torch.float16, T * C).view(T, C).float()


def _encode_int8(x: torch.Tensor, msg: pb.EncodedTensor, outliers_per_token: int = 0) -> None:
    """Per-token absmax int8 (-127..127); k > 0 outliers are left out of the scale."""
    if outliers_per_token:
        idx, amax = wire.encode_outliers(x, msg, outliers_per_token)
    else:
        idx, amax = None, quant.absmax_rows(x)
    s = wire.to_fp16(quant.fp16_round_up(amax / 127), "scales")  # (T,)
    q = quant.quantize(x, quant.safe_reciprocal(s)[:, None], 127)  # (T, C)
    if idx is not None:
        q.scatter_(1, idx, 0)
    msg.scales = wire.tobytes(s, "<f2")
    msg.values = q.numpy().tobytes()


def _decode_int8(msg: pb.EncodedTensor, T: int, C: int) -> torch.Tensor:
    with_outliers = msg.codec == pb.INT8_OUTLIERS
    wire.expect_options(msg, ("outliers_per_token",) if with_outliers else ())
    wire.expect_empty(msg, ("channel_class",) if with_outliers
                      else ("outlier_index", "outlier_values", "channel_class"))
    s = wire.read_scales(msg, T)  # (T,)
    idx, vals = wire.decode_outliers(msg, T, C)
    q = wire.read(msg, "values", torch.int8, T * C).view(T, C)
    return wire.put_outliers(quant.dequantize(q, s[:, None]), idx, vals)


_SPECS: dict[str, _Spec] = {
    "fp32": _Spec(pb.FP32, _encode_fp32, _decode_fp32),
    "fp16": _Spec(pb.FP16, _encode_fp16, _decode_fp16),
    "int8": _Spec(pb.INT8, _encode_int8, _decode_int8),
    "int8+outliers": _Spec(pb.INT8_OUTLIERS, _encode_int8, _decode_int8),
    "int4+outliers": _Spec(pb.INT4_OUTLIERS, lowbit.encode_int4, lowbit.decode_int4),
    "rot-int4+outliers": _Spec(pb.ROT_INT4_OUTLIERS, lowbit.encode_rot_int4, lowbit.decode_rot_int4),
    "ec+outliers": _Spec(pb.EC_OUTLIERS, lowbit.encode_ec, lowbit.decode_ec),
    "gr+outliers": _Spec(pb.GR_OUTLIERS, lowbit.encode_gr, lowbit.decode_gr),
}
CODECS: tuple[str, ...] = tuple(_SPECS)
# Defaults that differ from the shared encoder's keyword defaults. All defaults
# were chosen by measuring bytes/element and perplexity on the demo model.
_OVERRIDES: dict[str, dict[str, Any]] = {"int8+outliers": {"outliers_per_token": 4}}
_BY_ENUM = {s.enum: n for n, s in _SPECS.items()}


def _option_names(codec: str) -> list[str]:
    return list(inspect.signature(_SPECS[codec].encoder).parameters)[2:]


def default_options(codec: str) -> dict[str, Any]:
    """The options ``encode`` uses for ``codec`` when none are given."""
    params = inspect.signature(_spec(codec).encoder).parameters
    defaults = {n: params[n].default for n in _option_names(codec)}
    return {**defaults, **_OVERRIDES.get(codec, {})}


def codec_name(codec: int) -> str:
    """Codec enum value -> name (e.g. 4 -> 'int8+outliers'); 'unknown(n)' if unknown."""
    return _BY_ENUM.get(codec, f"unknown({codec})")


def _spec(codec: str) -> _Spec:
    if codec not in _SPECS:
        raise UnknownCodecError(f"codec: expected one of {', '.join(CODECS)}, got {codec!r}")
    return _SPECS[codec]


def encode(x: torch.Tensor, codec: str, **options: Any) -> pb.EncodedTensor:
    """Encode a (T, C) float tensor; options override ``default_options(codec)``."""
    spec = _spec(codec)
    unknown = sorted(set(options) - set(_option_names(codec)))
    if unknown:
        raise OptionError(f"codec {codec}: unknown options {unknown}; "
                          f"expected some of {_option_names(codec)}")
    x = wire.check_shape(x)
    msg = pb.EncodedTensor(codec=spec.enum, shape=list(x.shape))
    spec.encoder(x, msg, **{**_OVERRIDES.get(codec, {}), **options})
    return msg


def decode(msg: pb.EncodedTensor, hidden_size: int,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Validate and decode an EncodedTensor into a float32 (T, hidden_size) tensor."""
    if msg.codec not in _BY_ENUM:
        raise UnknownCodecError(f"codec: expected one of {sorted(_BY_ENUM)}, got {msg.codec}")
    shape = list(msg.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != hidden_size:
        raise ShapeError(f"shape: expected [tokens >= 1, {hidden_size}], got {shape}")
    T, C = shape
    if T * C > max_elements:
        raise SizeLimitError(f"shape: {T}x{C} = {T * C} elements exceeds the limit {max_elements}")
    out = _SPECS[_BY_ENUM[msg.codec]].decoder(msg, T, C)
    wire.check_finite(out, f"values: decoded {codec_name(msg.codec)} tensor")
    return out


_ROW_FIELDS = ("values", "scales", "outlier_index", "outlier_values")  # row-major but in DEFLATE'd EC, GR
_BIT_STREAM_CODECS = (pb.GR_OUTLIERS,)  # values is one bit string over all rows


def concat_rows(messages: list[pb.EncodedTensor]) -> pb.EncodedTensor:
    """The rows of several encodings of one codec and options as one encoding, bytes untouched (so the
    receiver decodes exactly what each would have given). OptionError where the layout is not row by row
    (entropy-coded streams) or the messages differ in codec or options."""
    first = messages[0]
    if first.entropy != pb.ENTROPY_NONE or first.codec in _BIT_STREAM_CODECS:
        raise OptionError(f"codec {codec_name(first.codec)}: entropy-coded rows cannot be joined as they are")
    head = pb.EncodedTensor()
    head.CopyFrom(first)
    for name in _ROW_FIELDS:
        head.ClearField(name)
    del head.shape[:]
    for msg in messages:
        other = pb.EncodedTensor()
        other.CopyFrom(msg)
        for name in _ROW_FIELDS:
            other.ClearField(name)
        del other.shape[:]
        if other != head or msg.shape[1:] != first.shape[1:]:
            raise OptionError("encodings of different codecs or options cannot be joined")
    out = pb.EncodedTensor()
    out.CopyFrom(head)
    out.shape[:] = [sum(m.shape[0] for m in messages), *first.shape[1:]]
    for name in _ROW_FIELDS:
        setattr(out, name, b"".join(getattr(m, name) for m in messages))
    return out


def join_rows(messages: list[pb.EncodedTensor]) -> pb.EncodedTensor:
    """``concat_rows`` where the codec allows; else what the rows decode to, as fp32 (lossless for that)."""
    try:
        return concat_rows(messages)
    except OptionError:  # entropy-coded, or codecs changed
        return encode(torch.cat([decode(m, int(m.shape[1])) for m in messages]), "fp32")


def bytes_per_element(msg: pb.EncodedTensor) -> float:
    """Serialized size of msg divided by its number of elements."""
    n = 1
    for d in msg.shape:
        n *= d
    return msg.ByteSize() / max(n, 1)
