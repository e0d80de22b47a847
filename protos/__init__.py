"""splitglm wire contract: protobuf messages, hidden-state codecs, frames."""

from protos import splitglm_pb2 as pb
from protos.codecs import (
    CODECS,
    DEFAULT_MAX_ELEMENTS,
    bytes_per_element,
    codec_name,
    decode,
    default_options,
    encode,
)
from protos.errors import (
    CodecError,
    CorruptPayloadError,
    FrameParseError,
    NonFiniteError,
    OptionError,
    OutlierIndexError,
    PayloadLengthError,
    ShapeError,
    SizeLimitError,
    UnknownCodecError,
)
from protos.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    ReceivedFrame,
    decode_frame_hidden,
    frame_from_bytes,
    frame_to_bytes,
    make_frame,
    parse_frame,
)

__all__ = [
    "CODECS", "DEFAULT_MAX_ELEMENTS", "DEFAULT_MAX_FRAME_BYTES", "CodecError",
    "CorruptPayloadError", "FrameParseError", "NonFiniteError", "OptionError",
    "OutlierIndexError", "PayloadLengthError", "ReceivedFrame", "ShapeError",
    "SizeLimitError", "UnknownCodecError", "bytes_per_element", "codec_name", "decode",
    "decode_frame_hidden", "default_options", "encode", "frame_from_bytes",
    "frame_to_bytes", "make_frame", "parse_frame", "pb",
]
