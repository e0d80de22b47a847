"""Round trips of every codec stay within the codec's error bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import CODECS, decode, default_options, encode, quant
from tests.protos.helpers import fp16_field, hidden_tensors, outlier_index, outlier_mask

FAST = settings(max_examples=40, deadline=None)
EPS = 1e-6
ULPS = 2.0**-21  # float32 rounding in x / s, round, q * s: a few ulps of |x|


def roundtrip(x, codec, **options):
    msg = encode(x, codec, **options)
    y = decode(msg, x.shape[1])
    assert y.shape == x.shape and y.dtype == torch.float32
    return msg, y


@FAST
@given(hidden_tensors())
def test_fp32_is_lossless(x):
    _, y = roundtrip(x, "fp32")
    assert torch.equal(y, x)


@FAST
@given(hidden_tensors())
def test_fp16_equals_half_rounding(x):
    _, y = roundtrip(x, "fp16")
    assert torch.equal(y, x.half().float())


def check_outliers_exact(x, y, msg):
    """Outlier channels carry fp16(x); they are the k largest |x| of each token."""
    idx = outlier_index(msg)
    assert torch.equal(y.gather(1, idx), x.gather(1, idx).half().float())
    if idx.numel():
        rest = x.abs().masked_fill(outlier_mask(msg, idx), -1).amax(1)  # largest non-outlier
        assert (x.abs().gather(1, idx).amin(1) >= rest).all()
    return outlier_mask(msg, idx)


@FAST
@given(hidden_tensors())
def test_int8_error_within_half_scale(x):
    msg, y = roundtrip(x, "int8")
    s = fp16_field(msg.scales)[:, None]  # (T, 1)
    assert ((y - x).abs() <= s / 2 * (1 + EPS) + ULPS * x.abs() + 1e-30).all()
    assert (s * 127 >= x.abs().amax(1, keepdim=True)).all()  # scale rounded up: no clipping


@FAST
@given(hidden_tensors(), st.integers(0, 2))
def test_int8_outliers_bound_and_exact_outliers(x, k):
    msg, y = roundtrip(x, "int8+outliers", outliers_per_token=k)
    mask = check_outliers_exact(x, y, msg)
    s = fp16_field(msg.scales)[:, None]
    err = (y - x).abs().masked_fill(mask, 0)
    assert (err <= s / 2 * (1 + EPS) + ULPS * x.abs() + 1e-30).all()
    # the scale ignores outliers: 127 * s is the largest remaining |x|, rounded up to fp16
    rest = x.abs().masked_fill(mask, 0).amax(1)
    assert (fp16_field(msg.scales) <= quant.fp16_round_up(rest / 127) * (1 + EPS)).all()


@FAST
@given(hidden_tensors(widths=(32, 64, 96)))
def test_int4_group_bound(x):
    msg, y = roundtrip(x, "int4+outliers", outliers_per_token=2, group_size=32)
    mask = check_outliers_exact(x, y, msg)
    s = fp16_field(msg.scales).view(x.shape[0], -1).repeat_interleave(32, dim=1)  # (T, C)
    err = (y - x).abs().masked_fill(mask, 0)
    assert (err <= s / 2 * (1 + EPS) + ULPS * x.abs() + 1e-30).all()


def l2_bound_holds(x, y, msg, mask):
    """Orthogonal rotation: per-token L2 error of the rest <= sqrt(C) * s / 2."""
    s = fp16_field(msg.scales)
    err = (y - x).masked_fill(mask, 0).norm(dim=1)
    return (err <= math.sqrt(x.shape[1]) * s / 2 * (1 + 1e-4) + 1e-30 + 1e-5 * x.abs().amax(1)).all()


@FAST
@given(hidden_tensors(widths=(2, 64, 96)))
def test_rot_int4_l2_bound_without_clipping(x):
    # clip 50 puts 7.5 steps above any rotated value (|y| <= sqrt(C) * rms), so no clipping
    msg, y = roundtrip(x, "rot-int4+outliers", outliers_per_token=1, clip=50.0)
    assert l2_bound_holds(x, y, msg, check_outliers_exact(x, y, msg))


@FAST
@given(hidden_tensors(widths=(6, 64, 192)))
def test_ec_elementwise_bound_without_rotation(x):
    msg, y = roundtrip(x, "ec+outliers", outliers_per_token=2, contexts=2 if x.shape[1] > 2 else 1)
    idx, _ = quant.top_outliers(x, 2)
    mask = outlier_mask(msg, idx)
    s = fp16_field(msg.scales)[:, None]
    assert ((y - x).abs().masked_fill(mask, 0) <= s / 2 * (1 + EPS) + 1e-30).all()
    assert torch.equal(y[mask], x[mask].half().float())


@FAST
@given(hidden_tensors(widths=(64, 96)))
def test_ec_with_rotation_l2_bound(x):
    msg, y = roundtrip(x, "ec+outliers", outliers_per_token=1, rotation_block=32, entropy="none")
    idx, _ = quant.top_outliers(x, 1)
    assert l2_bound_holds(x, y, msg, outlier_mask(msg, idx))


def test_rotation_is_orthogonal_and_invertible():
    x = torch.randn(5, 576)
    y = quant.rotate(x, 64, 7)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(quant.unrotate(y, 64, 7), x, atol=1e-5)
    assert not torch.allclose(quant.rotate(x, 64, 8), y)  # the seed matters


def test_ec_channel_contexts_roundtrip_many_tokens():
    x = torch.randn(80, 96) * torch.linspace(0.1, 5, 96)  # channels of different spread
    msg, y = roundtrip(x, "ec+outliers")  # T >= 64: default contexts
    assert len(msg.stream_bytes) == 4 and len(msg.channel_class) == 96
    s = fp16_field(msg.scales)[:, None]
    idx, _ = quant.top_outliers(x, 4)
    assert ((y - x).abs().masked_fill(outlier_mask(msg, idx), 0) <= s / 2 * (1 + EPS)).all()


def test_int4_pack_unpack_inverse():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_accepted(codec, dtype):
    x = torch.randn(3, 64).to(dtype)
    _, y = roundtrip(x, codec)
    assert (y - x.float()).abs().max() < 0.5 * x.float().abs().max()


@pytest.mark.parametrize("codec", CODECS)
def test_lossy_codecs_relative_error_on_hidden_like_data(codec):
    from splitglm.bench.codecs import hidden_like
    x = hidden_like((64, 576), seed=1)
    _, y = roundtrip(x, codec)
    rel = ((y - x).pow(2).sum() / x[1:].pow(2).sum()).item()
    limit = {"fp32": 0, "fp16": 1e-6, "int8": 1e-3, "int8+outliers": 1e-3}.get(codec, 0.05)
    assert rel <= limit, (codec, rel)


def test_default_options_are_documented_defaults():
    assert default_options("int8+outliers")["outliers_per_token"] == 4
    assert set(default_options("ec+outliers")) >= {"outliers_per_token", "step", "contexts"}
