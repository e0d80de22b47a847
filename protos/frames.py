"""Frames: session id, sequence, position, encoded hidden states, parameters.

``make_frame`` builds one, ``frame_to_bytes`` serializes it (the MQTT payload
and the gRPC message are these bytes), ``frame_from_bytes`` parses and fully
validates received bytes and returns the frame with its decoded hidden states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from google.protobuf.message import DecodeError

from protos import splitglm_pb2 as pb
from protos.codecs import DEFAULT_MAX_ELEMENTS, decode, encode
from protos.errors import FrameParseError, ShapeError, SizeLimitError

DEFAULT_MAX_FRAME_BYTES = 1 << 29  # 512 MiB, below protobuf's 2 GiB message limit


class ReceivedFrame(NamedTuple):
    """A parsed, validated frame and its hidden states (None if it has none)."""

    frame: pb.Frame
    hidden: torch.Tensor | None  # (T, C) float32


def make_frame(session_id: str, seq: int, start_pos: int, hidden: torch.Tensor | None,
               codec: str = "fp16", params: pb.GenerationParams | None = None,
               deadline_unix_ms: int = 0, close: bool = False, **codec_options: Any) -> pb.Frame:
    """Build a Frame; ``hidden`` (T, C) is encoded with ``codec`` (None: no tensor)."""
    frame = pb.Frame(session_id=session_id, seq=seq, start_pos=start_pos,
                     deadline_unix_ms=deadline_unix_ms, close=close)
    if hidden is not None:
        frame.hidden.CopyFrom(encode(hidden, codec, **codec_options))
    if params is not None:
        frame.params.CopyFrom(params)
    return frame


def frame_to_bytes(frame: pb.Frame) -> bytes:
    """Serialize a frame (deterministic field order)."""
    return frame.SerializeToString(deterministic=True)


def parse_frame(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> pb.Frame:
    """Parse frame bytes without decoding the hidden states."""
    if len(data) > max_frame_bytes:
        raise SizeLimitError(f"frame: {len(data)} bytes exceeds the limit {max_frame_bytes}")
    frame = pb.Frame()
    try:
        frame.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as e:
        raise FrameParseError(f"frame: not a valid splitglm.v1.Frame ({len(data)} bytes): {e}") from e
    return frame


def decode_frame_hidden(frame: pb.Frame, hidden_size: int,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Validate and decode the frame's hidden states: (T, hidden_size) float32."""
    if not frame.HasField("hidden"):
        raise ShapeError(f"hidden: frame {frame.session_id!r} seq {frame.seq} carries no tensor")
    return decode(frame.hidden, hidden_size, max_elements)


def frame_from_bytes(data: bytes, hidden_size: int,
                     max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> ReceivedFrame:
    """Parse and validate frame bytes; decodes the hidden states if present."""
    frame = parse_frame(data, max_frame_bytes)
    hidden = None
    if frame.HasField("hidden"):
        hidden = decode(frame.hidden, hidden_size, max_elements)
    return ReceivedFrame(frame, hidden)
