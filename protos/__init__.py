"""splitglm wire contract: protobuf messages, hidden-state codecs, frames.

The names below load on first use (PEP 562): ``import protos.mqtt`` or
``protos.topics`` pulls neither torch nor the codecs, so the sensor simulator
runs in an image without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "pb": ("protos.splitglm_pb2", None),
    **{name: ("protos.codecs", name) for name in (
        "CODECS", "DEFAULT_MAX_ELEMENTS", "bytes_per_element", "codec_name", "decode", "default_options",
        "encode")},
    **{name: ("protos.errors", name) for name in (
        "CodecError", "CorruptPayloadError", "FrameParseError", "NonFiniteError", "OptionError",
        "OutlierIndexError", "PayloadLengthError", "ShapeError", "SizeLimitError", "UnknownCodecError")},
    **{name: ("protos.frames", name) for name in (
        "DEFAULT_MAX_FRAME_BYTES", "ReceivedFrame", "decode_frame_hidden", "frame_from_bytes", "frame_to_bytes",
        "make_frame", "parse_frame")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'protos' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value
