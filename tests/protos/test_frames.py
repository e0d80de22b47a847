"""Frames round-trip through bytes, and bad bytes raise CodecError."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import (
    CODECS,
    CodecError,
    FrameParseError,
    ShapeError,
    SizeLimitError,
    decode_frame_hidden,
    frame_from_bytes,
    frame_to_bytes,
    make_frame,
    pb,
)
from splitglm.bench.codecs import hidden_like

C = 64
X = hidden_like((5, C), seed=4) / 100


def params() -> pb.GenerationParams:
    return pb.GenerationParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=11, stop=["\n\n"],
                               stop_token_ids=[2], policy="auto", latency_budget_ms=250)


@pytest.mark.parametrize("codec", CODECS)
def test_frame_round_trip(codec):
    frame = make_frame("sess-1", 3, 17, X, codec, params=params(), deadline_unix_ms=1_700_000_000_123)
    got = frame_from_bytes(frame_to_bytes(frame), C)
    assert got.frame.session_id == "sess-1" and got.frame.seq == 3 and got.frame.start_pos == 17
    assert got.frame.deadline_unix_ms == 1_700_000_000_123 and not got.frame.close
    assert got.frame.params == params()
    assert got.hidden.shape == X.shape
    assert torch.allclose(got.hidden, X, atol=0.05 * X.abs().max().item())
    assert torch.equal(decode_frame_hidden(got.frame, C), got.hidden)


def test_codec_options_pass_through():
    frame = make_frame("s", 0, 0, X, "int8+outliers", outliers_per_token=2)
    assert frame.hidden.outliers_per_token == 2


def test_close_frame_without_hidden():
    got = frame_from_bytes(frame_to_bytes(make_frame("s", 9, 40, None, close=True)), C)
    assert got.hidden is None and got.frame.close and got.frame.seq == 9
    with pytest.raises(ShapeError, match="carries no tensor"):
        decode_frame_hidden(got.frame, C)


def test_wrong_hidden_size():
    data = frame_to_bytes(make_frame("s", 0, 0, X, "fp16"))
    with pytest.raises(ShapeError, match=f"expected \\[tokens >= 1, {C + 1}\\]"):
        frame_from_bytes(data, C + 1)


def test_oversize_frame():
    data = frame_to_bytes(make_frame("s", 0, 0, X, "fp32"))
    with pytest.raises(SizeLimitError, match=f"frame: {len(data)} bytes exceeds the limit 1000"):
        frame_from_bytes(data, C, max_frame_bytes=1000)
    with pytest.raises(SizeLimitError, match="elements exceeds"):
        frame_from_bytes(data, C, max_elements=10)


def test_unparsable_bytes():
    with pytest.raises(FrameParseError, match="not a valid splitglm.v1.Frame"):
        frame_from_bytes(b"\xff\xff\xff", C)


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_or_codec_error(data: bytes):
    try:
        got = frame_from_bytes(data, C, max_elements=1 << 16)
    except CodecError:
        return
    if got.hidden is not None:
        assert got.hidden.shape == (got.frame.hidden.shape[0], C) and torch.isfinite(got.hidden).all()


@FUZZ
@given(st.binary(max_size=400))
def test_garbage_bytes(data):
    _valid_or_codec_error(data)


@FUZZ
@given(st.sampled_from(CODECS), st.data())
def test_truncated_and_flipped_bytes(codec, data):
    raw = frame_to_bytes(make_frame("session", 1, 0, X, codec, params=params()))
    cut = data.draw(st.integers(0, len(raw) - 1))
    _valid_or_codec_error(raw[:cut])
    pos = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    _valid_or_codec_error(raw[:pos] + bytes([raw[pos] ^ flip]) + raw[pos + 1:])
