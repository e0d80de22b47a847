"""The frame decoder fuzzed: random bytes and mutated frames of every codec raise CodecErrors or decode within bounds.

The inputs and the properties are ``splitglm.fuzz.frames`` (``splitglm bench fuzz`` runs the same target for
many more inputs); derandomized here, so CI is reproducible.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from protos.codecs import CODECS
from protos.errors import CodecError
from protos.frames import frame_to_bytes, make_frame
from splitglm.fuzz import FuzzFailure
from splitglm.fuzz import frames as fuzz_frames
from splitglm.fuzz.frames import FrameDecoderTarget, FrameInput, frame_bytes, intact_frames

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
TARGET = FrameDecoderTarget()


@settings(FUZZ, max_examples=2000)
@given(frame_bytes())
def test_bad_frames_raise_codec_errors_or_decode_to_the_declared_bounded_shape(example):
    TARGET.check(example)


@settings(FUZZ, max_examples=300)
@given(intact_frames(64))
def test_every_codec_decodes_what_it_encodes(made):
    frame, codec = made
    TARGET.check(FrameInput(frame_to_bytes(frame), 64, f"intact {codec}"))


def test_the_strategy_reaches_every_codec_and_every_kind_of_input():
    kinds, codecs = set(), set()

    @settings(FUZZ, max_examples=600)
    @given(frame_bytes())
    def collect(example):
        kind, _, rest = example.how.partition(" ")
        kinds.add(kind)
        codecs.add(rest.split(":")[0])

    collect()
    assert kinds == {"random", "intact", "bytes", "field", "header"} and set(CODECS) <= codecs


def test_the_target_catches_a_decoder_that_breaks_its_promises(monkeypatch):
    """The properties have teeth: NaN out, the wrong shape out, a foreign exception out, a valid frame refused."""
    T = 3
    intact = FrameInput(frame_to_bytes(make_frame("s", 0, 0, torch.randn(T, 64), "fp32")), 64, "intact fp32")
    real = fuzz_frames.frame_from_bytes

    def with_hidden(hidden):
        return lambda *a: real(*a)._replace(hidden=hidden)

    for fake, words in [
        (with_hidden(torch.full((T, 64), float("nan"))), "NaN"),
        (with_hidden(torch.zeros(T + 1, 64)), "declares"),
        (lambda *a: (_ for _ in ()).throw(IndexError("oops")), "IndexError escaped"),
        (lambda *a: (_ for _ in ()).throw(CodecError("no")), "intact frame was refused"),
    ]:
        monkeypatch.setattr(fuzz_frames, "frame_from_bytes", fake)
        with pytest.raises(FuzzFailure, match=words):
            TARGET.check(intact)
