"""Errors raised while encoding or decoding hidden states and frames.

Every problem with received bytes raises a subclass of :class:`CodecError`
(itself a ``ValueError``), so a receiver can reject a bad frame with one
``except CodecError`` and keep serving other sessions.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Base class: the tensor or frame cannot be encoded or decoded."""


class UnknownCodecError(CodecError):
    """The codec id or name is not one this version knows."""


class ShapeError(CodecError):
    """The shape is not (tokens, hidden) with the expected hidden size."""


class PayloadLengthError(CodecError):
    """A byte field's length does not match the shape and codec."""


class CorruptPayloadError(CodecError):
    """A payload cannot be decompressed or holds impossible values."""


class OptionError(CodecError):
    """A codec option (group size, outliers, rotation, ...) is invalid."""


class OutlierIndexError(CodecError):
    """An outlier channel index is out of range or repeated within a token."""


class NonFiniteError(CodecError):
    """A value is NaN or infinite, or overflows the wire format."""


class SizeLimitError(CodecError):
    """The tensor or frame is larger than the receiver accepts."""


class FrameParseError(CodecError):
    """The bytes are not a valid serialized Frame."""
