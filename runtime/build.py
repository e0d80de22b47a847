"""Build the segment a tier runs from weights and a compression entry, on the entry's backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtime.compress import apply_compression
from runtime.cpu_decode import CpuDecode
from runtime.segment import Segment
from runtime.student import load_student


def build_segment(
    path: str | os.PathLike,
    start: int,
    end: int,
    embed: bool,
    head: bool,
    compression: dict,
    runs: tuple[int, int] | None = None,
    threads: int | None = None,
    cpu_decode: CpuDecode | None = None,
):
    """A ``Segment``, or an ``OnnxSegment`` for an onnxruntime entry (exported into a temporary folder).

    ``compression`` is a plan entry (``partitioner.plan.measure.compression_entry``); ``runs`` is the
    layer range its torch passes apply to (default: all of [start, end)). An entry with a ``"student"``
    (``runtime.student``: a distilled segment of another structure) is rebuilt from the
    weights in ``path``, then gets its passes over every layer it holds. ``cpu_decode``: how a PyTorch
    segment runs its steps of a few rows (``runtime.cpu_decode``; default eager).
    """
    if compression.get("student") is not None:
        segment = load_student(path, start, compression["student"], embed, head)  # it ends where it ends
    else:
        segment = Segment.from_checkpoint(path, start, end, embed=embed, head=head)
    if compression.get("backend", "torch") == "onnxruntime":
        from runtime.backends import OnnxSegment, export_onnx

        onnx = compression["onnx"]
        folder = Path(tempfile.mkdtemp(prefix="splitglm-onnx-"))
        export_onnx(segment, folder, quantize_int8=onnx["precision"] == "int8", keep_fp32=onnx.get("keep_fp32", ()))
        return OnnxSegment(folder, precision=onnx["precision"], threads=threads)
    passes = compression.get("passes", [])
    if passes and segment.end > start:
        layers = list(runs or (start, segment.end))
        apply_compression(segment, [{**p, "layers": p.get("layers", layers)} for p in passes])
    if cpu_decode is not None:
        cpu_decode.apply(segment)
    return segment
