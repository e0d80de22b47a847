"""Bad frames: random bytes, and valid frames of every codec mutated in their bytes or in their fields.

``frame_bytes(C)`` is the strategy the frame receivers share (the decoder
here, the edge relay, the cloud's gRPC stream); ``FrameDecoderTarget`` checks
``protos.frames.frame_from_bytes`` and ``protos.codecs.decode`` on it: every
input either raises a ``CodecError`` or decodes to a finite float32 tensor of
the declared, bounded shape, and an intact frame always decodes (fp32: exactly).
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from protos import splitglm_pb2 as pb
from protos.codecs import CODECS
from protos.errors import CodecError
from protos.frames import decode_frame_hidden, frame_from_bytes, frame_to_bytes, make_frame, parse_frame

from . import FuzzFailure, expect, no_hang

HIDDEN_SIZES = (32, 64, 96)  # receivers' hidden sizes the decoder target tries
MAX_ROWS = 6  # rows of a generated valid frame
MAX_ELEMENTS = 1 << 16  # what the decoder target lets a frame declare, elements
MAX_FRAME_BYTES = 1 << 20  # what the decoder target lets a frame be, bytes
BYTE_FIELDS = ("values", "scales", "outlier_index", "outlier_values", "channel_class")
OPTION_VALUES = {  # edge values of each option field
    "outliers_per_token": (0, 1, 2, 7, 8, 31, 32, 64, 65, 96, 65535, 65536, 2**32 - 1),
    "group_size": (0, 1, 2, 3, 4, 8, 16, 31, 32, 64, 96, 2**31, 2**32 - 1),
    "rotation_block": (0, 1, 2, 3, 16, 32, 64, 96, 128, 1024, 2048, 2**32 - 1),
    "rotation_seed": (0, 1, 0x5EED6C6D, 2**63, 2**64 - 1),
    "entropy": (0, 1, 2, 7),
}
SHAPE_VALUES = (0, 1, 2, 5, 6, 7, 31, 32, 33, 63, 64, 65, 96, 1 << 16, 1 << 20, 2**31 - 1, 2**32 - 1)
NON_FINITE = {"fp32": (math.nan, math.inf, -math.inf), "fp16": (math.nan, math.inf, -math.inf, 65520.0)}


@dataclass(frozen=True)
class FrameInput:
    """Bytes a receiver gets, its hidden size, and how they were made."""

    data: bytes
    hidden_size: int
    how: str  # "random", "intact <codec>", "bytes <codec>: ...", "field <codec>: ...", "header <codec>: ..."
    reference: torch.Tensor | None = None  # intact fp32 frames: the tensor that must come back exactly

    @property
    def intact(self) -> bool:
        """Whether its tensor is as the encoder made it (a header mutation leaves it so): it must decode."""
        return self.how.startswith(("intact", "header"))

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep them short
        return f"FrameInput({self.how!r}, C={self.hidden_size}, {len(self.data)} bytes: {self.data[:48]!r}...)"


def hidden_values(T: int, C: int, kind: str, seed: int) -> torch.Tensor:
    """(T, C) float32 test values of a kind: normal, zeros, outliers (a few huge channels), large, tiny."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g)  # (T, C)
    if kind == "zeros":
        return torch.zeros(T, C)
    if kind == "outliers":
        x[:, torch.randperm(C, generator=g)[:3]] *= 3e3
    elif kind == "large":
        x *= 2e4
    elif kind == "tiny":
        x *= 1e-6
    return x


@st.composite
def intact_frames(draw, hidden_size: int | None = None, codecs: tuple[str, ...] = CODECS) -> tuple[pb.Frame, str]:
    """A valid frame of one of ``codecs`` (its options varied where valid) and the codec's name."""
    C = hidden_size or draw(st.sampled_from(HIDDEN_SIZES))
    T = draw(st.integers(1, MAX_ROWS))
    codec = draw(st.sampled_from(codecs))
    x = hidden_values(T, C, draw(st.sampled_from(("normal", "zeros", "outliers", "large", "tiny"))),
                      draw(st.integers(0, 2**16)))
    options = draw(st.sampled_from(({}, {"outliers_per_token": 0}, {"outliers_per_token": 2}))) if (
        "outliers" in codec) else {}
    params = pb.GenerationParams(max_tokens=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**64 - 1)))
    try:
        frame = make_frame(draw(st.text(min_size=1, max_size=12)), draw(st.integers(0, 3)), 0, x, codec,
                           params=params, **options)
    except CodecError:  # e.g. "large" values overflow an fp16 field: not a frame a sender can make
        frame = make_frame("s", 0, 0, torch.zeros(T, C), codec, params=params)
    return frame, codec


def _put_non_finite(data: bytes, fmt: str, value: float, slot: int) -> bytes:
    """``data`` with one little-endian float of format ``fmt`` ('<f' or '<e') overwritten by ``value``."""
    size = struct.calcsize(fmt)
    if len(data) < size:
        return data
    at = (slot % (len(data) // size)) * size
    try:
        packed = struct.pack(fmt, value)
    except (OverflowError, struct.error):  # 65520 overflows fp16 when packed: its bit pattern is inf
        packed = b"\x00\x7c"
    return data[:at] + packed + data[at + size:]


@st.composite
def field_mutation(draw, msg: pb.EncodedTensor, codec: str) -> str:
    """Mutate one field of ``msg`` in place: shape, a byte field, a non-finite value, an option, the codec id."""
    kind = draw(st.sampled_from(("shape", "bytes", "non-finite", "option", "codec", "stream_bytes")))
    if kind == "shape":
        shape = draw(st.lists(st.sampled_from(SHAPE_VALUES) | st.integers(0, 2**32 - 1), max_size=3))
        msg.shape[:] = shape
        return f"shape {shape}"
    if kind == "bytes":
        name = draw(st.sampled_from(BYTE_FIELDS))
        data = getattr(msg, name)
        how = draw(st.sampled_from(("truncate", "extend", "replace")))
        if how == "truncate":
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        elif how == "extend":
            data = data + draw(st.binary(min_size=1, max_size=64))
        else:
            data = draw(st.binary(min_size=len(data), max_size=len(data)))
        setattr(msg, name, data)
        return f"{how} {name}"
    if kind == "non-finite":
        name, fmt = draw(st.sampled_from((("values", "<f" if codec == "fp32" else "<e"), ("scales", "<e"),
                                          ("outlier_values", "<e"))))
        value = draw(st.sampled_from(NON_FINITE["fp32" if fmt == "<f" else "fp16"]))
        setattr(msg, name, _put_non_finite(getattr(msg, name), fmt, value, draw(st.integers(0, 1 << 12))))
        return f"{value} in {name}"
    if kind == "option":
        name = draw(st.sampled_from(sorted(OPTION_VALUES)))
        value = draw(st.sampled_from(OPTION_VALUES[name]))
        setattr(msg, name, value)
        return f"{name}={value}"
    if kind == "stream_bytes":
        sizes = draw(st.lists(st.sampled_from((0, 1, 7, 64, 1 << 20, 2**32 - 1)), max_size=18))
        msg.stream_bytes[:] = sizes
        return f"stream_bytes {sizes}"
    msg.codec = draw(st.integers(0, 9))
    return f"codec id {msg.codec}"


HEADER_EDITS = tuple(  # (field, value) edits of a frame outside its tensor: positions, seq, ids, deadline, params
    [("start_pos", v) for v in (1, 5, 511, 512, 8191, 8192, 2**31, 2**32 - 1)]
    + [("seq", v) for v in (1, 2, 7, 2**32, 2**64 - 1)]
    + [("session_id", v) for v in ("", "x" * 129, "x" * 5000, "\u202e\u0301\U0001f600", "a\x00b")]
    + [("deadline_unix_ms", v) for v in (1, 2**62, -1, -(2**63))]
    + [("draft_tokens", v) for v in ([0], [95, 95], [96], [2**32 - 1], [1] * 9, [0] * 20)]
    + [("params.max_tokens", v) for v in (0, 4096, 4097, 2**32 - 1)]
    + [(f"params.{name}", v) for name in ("temperature", "top_p") for v in (math.nan, math.inf, -math.inf, -1.0,
                                                                             0.0, 3e38)]
    + [("params.stop_token_ids", v) for v in ([0], list(range(64)), [2**32 - 1] * 3)]
    + [("params", None), ("close", True)]
)


def mutate_header(frame: pb.Frame, edit: tuple) -> str:
    """Apply one of HEADER_EDITS to ``frame`` in place (``("params", None)`` drops the parameters)."""
    name, value = edit
    if name == "params":
        frame.ClearField("params")
    else:
        holder, _, leaf = name.rpartition(".")
        target = frame.params if holder else frame
        if isinstance(value, list):
            getattr(target, leaf)[:] = value
        else:
            setattr(target, leaf, value)
    return f"{name}={value!r}"[:60]


@st.composite
def byte_mutation(draw, data: bytes) -> tuple[bytes, str]:
    """``data`` with bytes flipped, cut short, inserted or deleted."""
    how = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
    if not data:
        return draw(st.binary(max_size=16)), "replace"
    at = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        out = bytearray(data)
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out), "flip"
    if how == "truncate":
        return data[:at], f"truncate to {at}"
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:], f"insert at {at}"
    return data[:at] + data[at + draw(st.integers(1, 8)):], f"delete at {at}"


def scramble(data: bytes, seed: int) -> bytes:
    """``data`` with bytes flipped, cut off or spliced in, as ``seed`` says (for frames built while fuzzing)."""
    rng = random.Random(seed)
    out = bytearray(data)
    how = rng.randrange(3)
    if how == 0:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    elif how == 1:
        del out[rng.randrange(len(out)):]
    else:
        out[rng.randrange(len(out)):rng.randrange(len(out))] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


@st.composite
def frame_bytes(draw, hidden_size: int | None = None) -> FrameInput:
    """Random bytes, an intact frame, or a frame mutated in its bytes, in a field of its tensor or outside it."""
    kind = draw(st.sampled_from(("random", "intact", "bytes", "field", "field", "header")))
    if kind == "random":
        return FrameInput(draw(st.binary(max_size=512)), hidden_size or draw(st.sampled_from(HIDDEN_SIZES)), "random")
    C = hidden_size or draw(st.sampled_from(HIDDEN_SIZES))
    frame, codec = draw(intact_frames(C))
    if kind == "intact":
        reference = None
        if codec == "fp32":
            reference = torch.frombuffer(bytearray(frame.hidden.values), dtype=torch.float32).view(*frame.hidden.shape)
        return FrameInput(frame_to_bytes(frame), C, f"intact {codec}", reference)
    if kind == "bytes":
        data, how = draw(byte_mutation(frame_to_bytes(frame)))
        return FrameInput(data, C, f"bytes {codec}: {how}")
    if kind == "header":
        how = mutate_header(frame, draw(st.sampled_from(HEADER_EDITS)))
        return FrameInput(frame_to_bytes(frame), C, f"header {codec}: {how}")
    how = draw(field_mutation(frame.hidden, codec))
    return FrameInput(frame_to_bytes(frame), C, f"field {codec}: {how}")


def _refused_in_steps(example: FrameInput) -> bool:
    """Whether parse_frame, then decode_frame_hidden (where the frame has a tensor), raise a CodecError."""
    try:
        frame = parse_frame(example.data, MAX_FRAME_BYTES)
        if frame.HasField("hidden"):
            decode_frame_hidden(frame, example.hidden_size, MAX_ELEMENTS)
    except CodecError:
        return True
    return False


class FrameDecoderTarget:
    """``frame_from_bytes`` (parse + ``codecs.decode``): a CodecError, or a finite tensor of the declared shape."""

    name = "frames"

    def strategy(self):
        return frame_bytes()

    def check(self, example: FrameInput) -> None:
        with no_hang(f"decoding {example!r}", 5.0):
            try:
                received = frame_from_bytes(example.data, example.hidden_size, MAX_FRAME_BYTES, MAX_ELEMENTS)
            except CodecError as e:
                expect(not example.intact, f"an intact frame was refused: {e} ({example!r})")
                expect(_refused_in_steps(example), f"parse_frame + decode_frame_hidden accepted what "
                       f"frame_from_bytes refused ({example!r})")
                return
            except Exception as e:  # noqa: BLE001 -- anything else escaping the decoder is the bug we look for
                raise FuzzFailure(f"{type(e).__name__} escaped the decoder: {e} ({example!r})") from e
        hidden = received.hidden
        if hidden is None:
            expect(not example.intact, f"an intact frame decoded without its tensor ({example!r})")
            return
        shape = list(received.frame.hidden.shape)
        expect(hidden.dtype == torch.float32 and list(hidden.shape) == shape, f"decoded {tuple(hidden.shape)} "
               f"{hidden.dtype}, the frame declares {shape} ({example!r})")
        expect(shape[1] == example.hidden_size and hidden.numel() <= MAX_ELEMENTS,
               f"decoded {shape}: beyond hidden {example.hidden_size} / {MAX_ELEMENTS} elements ({example!r})")
        expect(bool(torch.isfinite(hidden).all()), f"decoded NaN or infinity ({example!r})")
        again = decode_frame_hidden(parse_frame(example.data, MAX_FRAME_BYTES), example.hidden_size, MAX_ELEMENTS)
        expect(torch.equal(again, hidden), f"decode_frame_hidden differs from frame_from_bytes ({example!r})")
        if example.reference is not None:
            expect(torch.equal(hidden, example.reference), f"fp32 frame not decoded exactly ({example!r})")

    def finish(self) -> None:
        """Nothing to check at the end of a run: the decoder keeps no state."""

    def close(self) -> None:
        pass
