"""Segment backends besides PyTorch: ONNX Runtime (device and edge), TensorRT (cloud).

``export_onnx`` writes a segment with explicit KV-cache inputs/outputs;
``OnnxSegment`` runs it with the call interface of ``runtime.segment.Segment``;
``build_tensorrt_engine`` turns a cloud segment's ONNX into an engine where TensorRT is installed.
"""

from runtime.backends.onnx_export import SegmentGraph, export_onnx, module_path, quantize_onnx_int8
from runtime.backends.onnx_segment import OnnxSegment, load_meta
from runtime.backends.tensorrt_engine import (
    BackendUnavailable,
    EngineShapes,
    build_tensorrt_engine,
    tensorrt_available,
)

__all__ = [
    "BackendUnavailable",
    "EngineShapes",
    "OnnxSegment",
    "SegmentGraph",
    "build_tensorrt_engine",
    "export_onnx",
    "load_meta",
    "module_path",
    "quantize_onnx_int8",
    "tensorrt_available",
]
