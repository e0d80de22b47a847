"""gr+outliers: the error follows from the target distortion, and bad bit strings raise CodecError."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import (
    CodecError,
    CorruptPayloadError,
    OptionError,
    PayloadLengthError,
    decode,
    default_options,
    encode,
    pb,
    quant,
    rice,
)
from protos.codecs import concat_rows, join_rows
from splitglm.bench.codecs import hidden_like
from tests.protos.helpers import fp16_field, hidden_tensors, outlier_mask

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
C = 64
X = hidden_like((4, C), seed=3) / 100


def roundtrip(x, **options):
    msg = encode(x, "gr+outliers", **options)
    return msg, decode(msg, x.shape[1])


def mutated(msg, **fields):
    out = pb.EncodedTensor()
    out.CopyFrom(msg)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


@FAST
@given(hidden_tensors(widths=(6, 32, 64, 192)), st.integers(0, 2), st.sampled_from([1e-4, 0.0065, 0.05]))
def test_elementwise_bound_and_exact_outliers(x, k, d):
    msg, y = roundtrip(x, outliers_per_token=k, distortion=d)
    idx = torch.from_numpy(np.frombuffer(msg.outlier_index, "<u2").astype(np.int64)).view(x.shape[0], k)
    mask = outlier_mask(msg, idx)
    assert torch.equal(y[mask], x[mask].half().float())
    s = fp16_field(msg.scales)[:, None]  # (T, 1): the step
    assert ((y - x).abs().masked_fill(mask, 0) <= s / 2 * (1 + 1e-6) + 1e-30).all()
    rest = x.masked_fill(mask, 0)
    want = quant.row_rms(rest) * math.sqrt(12 * d)  # step from the target distortion, fp16-rounded
    assert torch.allclose(s[:, 0], want.clamp_min(2.0**-24) * (want > 0), rtol=1e-3, atol=2.0**-24)


def test_distortion_is_met_on_gaussian_data_with_big_channels():
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(2))
    x[:, [5, 77, 300]] *= 1000
    msg, y = roundtrip(x)
    idx = torch.from_numpy(np.frombuffer(msg.outlier_index, "<u2").astype(np.int64)).view(256, 4)
    rest = x.clone().scatter_(1, idx, 0)
    rel = ((y - x).pow(2).mean(1) / rest.pow(2).mean(1)).mean().item()
    assert rel == pytest.approx(default_options("gr+outliers")["distortion"], rel=0.1)


def test_one_position_frame_pays_no_table():
    x = hidden_like((64, 576), seed=4)
    many = encode(x, "gr+outliers").ByteSize()
    one = sum(encode(x[t:t + 1], "gr+outliers").ByteSize() for t in range(64))
    assert (one - many) / 64 <= 24  # per message only its header (tags, lengths, shape) is extra
    _, y = roundtrip(x[:1])
    assert y.shape == (1, 576)


def test_rice_bit_string_roundtrip_and_parameters():
    g = np.random.default_rng(0)
    q = np.round(g.laplace(0, 6, size=(5, 100))).astype(np.int64)
    r = rice.best_parameters(np.abs(q))
    costs = [(np.abs(q) >> j).sum(1) + 100 * j for j in range(rice.MAX_PARAMETER + 1)]
    assert (np.stack(costs)[r, np.arange(5)] == np.stack(costs).min(0)).all()
    flat_r = np.repeat(r, 100)
    assert np.array_equal(rice.decode(rice.encode(q.ravel(), flat_r), flat_r, "v"), q.ravel())
    assert rice.encode(np.zeros(0, np.int64), np.zeros(0, np.int64)) == b""


def test_encode_options():
    with pytest.raises(OptionError, match="distortion"):
        encode(X, "gr+outliers", distortion=0)
    with pytest.raises(OptionError, match="distortion"):
        encode(X, "gr+outliers", distortion=2)
    with pytest.raises(OptionError, match="outliers_per_token"):
        encode(X, "gr+outliers", outliers_per_token=C + 1)


def test_bad_payloads_name_the_field():
    msg = encode(X, "gr+outliers")
    with pytest.raises(PayloadLengthError, match="values.*ends after"):
        decode(mutated(msg, values=msg.values[: len(msg.values) // 4]), C)
    with pytest.raises(PayloadLengthError, match="values.*expected"):
        decode(mutated(msg, values=msg.values + b"\0"), C)
    with pytest.raises(PayloadLengthError, match="values"):
        decode(mutated(msg, values=msg.values[:-1] + bytes([msg.values[-1] | 1])), C)
    with pytest.raises(PayloadLengthError, match="values"):
        decode(mutated(msg, values=b"\xff" * len(msg.values)), C)
    with pytest.raises(PayloadLengthError, match="rice_parameter"):
        decode(mutated(msg, rice_parameter=msg.rice_parameter[:-1]), C)
    with pytest.raises(CorruptPayloadError, match="rice_parameter: expected <= 15"):
        decode(mutated(msg, rice_parameter=bytes([16]) * 4), C)
    with pytest.raises(OptionError, match="rice_parameter: must be unset"):
        decode(mutated(encode(X, "ec+outliers"), rice_parameter=b"\1" * 4), C)
    with pytest.raises(OptionError, match="entropy: must be unset"):
        decode(mutated(msg, entropy=pb.ENTROPY_DEFLATE), C)


@FAST
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_garbage_bit_strings_raise_codec_error_or_decode(values, params):
    msg = mutated(encode(X, "gr+outliers"), values=values, rice_parameter=params)
    try:
        y = decode(msg, C)
    except CodecError:
        return
    assert y.shape == (4, C) and torch.isfinite(y).all()


def test_rows_are_not_joined_as_bytes():
    a, b = encode(X[:2], "gr+outliers"), encode(X[2:], "gr+outliers")
    with pytest.raises(OptionError):
        concat_rows([a, b])
    joined = join_rows([a, b])
    assert joined.codec == pb.FP32
    assert torch.equal(decode(joined, C), torch.cat([decode(a, C), decode(b, C)]))
