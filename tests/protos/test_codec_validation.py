"""Every validation error is reachable, and corrupted input only ever raises CodecError."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import (
    CODECS,
    CodecError,
    CorruptPayloadError,
    NonFiniteError,
    OptionError,
    OutlierIndexError,
    PayloadLengthError,
    ShapeError,
    SizeLimitError,
    UnknownCodecError,
    decode,
    encode,
    pb,
)
from splitglm.bench.codecs import hidden_like

C = 64
X = hidden_like((4, C), seed=3) / 100  # big channels ~10..200: within every codec's range


def encoded(codec: str, **options) -> pb.EncodedTensor:
    return encode(X, codec, **options)


def mutated(msg: pb.EncodedTensor, **fields) -> pb.EncodedTensor:
    out = pb.EncodedTensor()
    out.CopyFrom(msg)
    for name, value in fields.items():
        if name in ("shape", "stream_bytes"):
            del getattr(out, name)[:]
            getattr(out, name).extend(value)
        else:
            setattr(out, name, value)
    return out


def raises(exc, msg, *, match, hidden=C, **kw):
    with pytest.raises(exc, match=match):
        decode(msg, hidden, **kw)


# ------------------------------------------------------------ encode side


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(1, 2, 3), torch.zeros(0, 4),
                                 torch.zeros(2, 4, dtype=torch.int32), [[1.0, 2.0]]])
def test_encode_rejects_non_2d_or_non_float(bad):
    with pytest.raises(ShapeError, match="input"):
        encode(bad, "fp16")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_rejects_non_finite(codec, value):
    x = X.clone()
    x[1, 3] = value
    with pytest.raises(NonFiniteError, match="input"):
        encode(x, codec)


def test_encode_rejects_fp16_overflow():
    x = X.clone()
    x[0, 0] = 1e5
    with pytest.raises(NonFiniteError, match="values.*overflows fp16"):
        encode(x, "fp16")
    with pytest.raises(NonFiniteError, match="outlier_values.*overflows fp16"):
        encode(x, "int8+outliers")
    with pytest.raises(NonFiniteError, match="scales.*overflows fp16"):
        encode(x * 100, "int8")


def test_encode_rejects_unknown_codec_and_options():
    with pytest.raises(UnknownCodecError, match="'int3'"):
        encode(X, "int3")
    with pytest.raises(OptionError, match="unknown options \\['bits'\\]"):
        encode(X, "int8", bits=4)
    with pytest.raises(OptionError, match="group_size"):
        encode(X, "int4+outliers", group_size=48)
    with pytest.raises(OptionError, match="rotation_block"):
        encode(X, "rot-int4+outliers", rotation_block=3)
    with pytest.raises(OptionError, match="outliers_per_token"):
        encode(X, "int8+outliers", outliers_per_token=C + 1)
    with pytest.raises(OptionError, match="step"):
        encode(X, "ec+outliers", step=0)
    with pytest.raises(OptionError, match="contexts"):
        encode(X, "ec+outliers", contexts=0)


# ------------------------------------------------------------ decode side


@pytest.mark.parametrize("codec_id", [pb.CODEC_UNSPECIFIED, 99])
def test_unknown_codec_id(codec_id):
    raises(UnknownCodecError, mutated(encoded("fp16"), codec=codec_id), match=f"got {codec_id}")


@pytest.mark.parametrize("shape", [[4], [4, C, 1], [0, C], [4, C + 1], []])
def test_bad_shape(shape):
    raises(ShapeError, mutated(encoded("fp16"), shape=shape), match="shape")


def test_size_limit():
    raises(SizeLimitError, encoded("fp16"), match="exceeds the limit 100", max_elements=100)
    raises(SizeLimitError, mutated(encoded("fp16"), shape=[2**31, C]), match="exceeds the limit")


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_values(codec):
    msg = encoded(codec, **({"entropy": "none"} if codec == "ec+outliers" else {}))
    raises(PayloadLengthError, mutated(msg, values=msg.values[:-1]), match="values")


@pytest.mark.parametrize("codec", ["int8", "int8+outliers", "int4+outliers", "rot-int4+outliers"])
def test_scales_length(codec):
    msg = encoded(codec)
    raises(PayloadLengthError, mutated(msg, scales=msg.scales + b"\0\0"), match="scales")


def test_unused_fields_must_be_empty():
    raises(PayloadLengthError, mutated(encoded("fp32"), scales=b"\0\0"), match="scales: expected 0 bytes")
    raises(PayloadLengthError, mutated(encoded("int8"), outlier_index=b"\0\0"), match="outlier_index")
    raises(OptionError, mutated(encoded("fp16"), group_size=32), match="group_size: must be unset")
    raises(OptionError, mutated(encoded("int8"), stream_bytes=[3]), match="stream_bytes: must be unset")


def test_outlier_lengths():
    msg = encoded("int8+outliers")
    raises(PayloadLengthError, mutated(msg, outlier_values=msg.outlier_values[:-2]), match="outlier_values")
    raises(PayloadLengthError, mutated(msg, outliers_per_token=5), match="outlier_index")


def _index_bytes(rows):
    return torch.tensor(rows, dtype=torch.int64).numpy().astype("<u2").tobytes()


def test_outlier_index_out_of_range_and_duplicates():
    msg = encoded("int8+outliers", outliers_per_token=2)
    raises(OutlierIndexError, mutated(msg, outlier_index=_index_bytes([[0, C]] + [[0, 1]] * 3)),
           match=f"expected < hidden {C}, got {C}")
    raises(OutlierIndexError, mutated(msg, outlier_index=_index_bytes([[0, 1], [5, 5], [0, 1], [0, 1]])),
           match="token 1 repeats")


def _fp16_bytes(values):
    return torch.tensor(values, dtype=torch.float16).numpy().tobytes()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fields(bad):
    x32 = encoded("fp32")
    raises(NonFiniteError, mutated(x32, values=torch.tensor([bad] * (4 * C)).numpy().tobytes()),
           match="values")
    raises(NonFiniteError, mutated(encoded("fp16"), values=_fp16_bytes([bad] * (4 * C))), match="values")
    raises(NonFiniteError, mutated(encoded("int8"), scales=_fp16_bytes([1, bad, 1, 1])), match="scales")
    msg = encoded("int8+outliers", outliers_per_token=1)
    raises(NonFiniteError, mutated(msg, outlier_values=_fp16_bytes([1, 2, bad, 3])), match="outlier_values")


def test_negative_scale():
    raises(CorruptPayloadError, mutated(encoded("int8"), scales=_fp16_bytes([1, -1, 1, 1])),
           match="scales: expected >= 0")


def test_bad_options_on_decode():
    raises(OptionError, mutated(encoded("int4+outliers"), group_size=24), match="group_size")
    raises(OptionError, mutated(encoded("rot-int4+outliers"), rotation_block=48), match="rotation_block")
    raises(OptionError, mutated(encoded("int8+outliers"), outliers_per_token=C + 1),
           match="outliers_per_token")
    ec = encoded("ec+outliers")
    raises(OptionError, mutated(ec, entropy=7), match="entropy")
    raises(OptionError, mutated(ec, stream_bytes=[]), match="stream_bytes: expected 1..16")
    raises(OptionError, mutated(ec, rotation_seed=5), match="rotation_seed: must be 0")


def test_entropy_stream_errors():
    ec = encoded("ec+outliers", contexts=2)
    assert len(ec.stream_bytes) == 2
    raises(PayloadLengthError, mutated(ec, stream_bytes=[1, len(ec.values)]), match="add up to")
    raises(CorruptPayloadError, mutated(ec, channel_class=bytes([5]) * C), match="channel_class")
    raises(PayloadLengthError, mutated(ec, channel_class=b"\0"), match="channel_class")
    garbage = b"\xff" * len(ec.values)
    raises(CorruptPayloadError, mutated(ec, values=garbage), match="values stream 0: invalid DEFLATE")
    short = zlib.compressobj(6, zlib.DEFLATED, -15)
    short = short.compress(b"\0" * 10) + short.flush()
    raises(PayloadLengthError, mutated(ec, values=short, stream_bytes=[len(short)], channel_class=b""),
           match="after inflating")
    raises(CorruptPayloadError, mutated(ec, outlier_index=b"\x00"), match="outlier_index: invalid DEFLATE")


# ------------------------------------------------------------ fuzzing


def _valid_or_codec_error(msg: pb.EncodedTensor):
    """decode either raises CodecError or returns a finite float32 (T, C) tensor."""
    try:
        y = decode(msg, C, max_elements=1 << 16)
    except CodecError:
        return
    assert y.dtype == torch.float32 and y.dim() == 2 and y.shape[1] == C
    assert y.shape[0] == msg.shape[0] and torch.isfinite(y).all()


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["codec", "shape", "values", "scales", "outlier_index", "outlier_values", "outliers_per_token",
          "group_size", "rotation_block", "rotation_seed", "entropy", "channel_class", "stream_bytes",
          "rice_parameter"]


@FUZZ
@given(st.sampled_from(CODECS), st.sampled_from(FIELDS), st.integers(0, 2**32 - 1), st.binary(max_size=40))
def test_flipped_field_raises_codec_error_or_decodes_right_shape(codec, field, number, blob):
    msg = encoded(codec)
    value = getattr(msg, field)
    if isinstance(value, bytes):
        new = blob if not value or number % 3 == 0 else (
            value[: number % len(value)] + blob if number % 3 == 1 else bytes(
                b ^ (0xFF if i == number % len(value) else 0) for i, b in enumerate(value)))
        _valid_or_codec_error(mutated(msg, **{field: new}))
    elif field in ("shape", "stream_bytes"):
        _valid_or_codec_error(mutated(msg, **{field: [number % 1000, number % 97]}))
    else:
        _valid_or_codec_error(mutated(msg, **{field: number % (2**31 if field in ("codec", "entropy") else 2**32)}))


@FUZZ
@given(st.binary(max_size=300))
def test_garbage_message_bytes(data):
    msg = pb.EncodedTensor()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf itself rejects it: frames.py maps this to FrameParseError
        return
    _valid_or_codec_error(msg)
