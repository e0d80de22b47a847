"""TensorRT engine build for the cloud segment's ONNX graph, when TensorRT is installed.

Without ``tensorrt`` every entry point raises ``BackendUnavailable`` with the
install hint; importing this module never fails.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU"


class BackendUnavailable(RuntimeError):
    """A backend's runtime library is not installed (or cannot run) on this machine."""


def _import_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or a broken install that fails while loading its libraries
        raise BackendUnavailable(f"TensorRT is not installed ({e!r}): {INSTALL_HINT}") from e


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works here."""
    try:
        _import_tensorrt()
    except BackendUnavailable:
        return False
    return True


@dataclass(frozen=True)
class EngineShapes:
    """The optimisation profile: new rows per step (tokens) and cached positions (past)."""

    max_tokens: int = 512  # rows in one step (prefill length)
    opt_tokens: int = 1  # tuned for decode
    max_past: int = 2048  # cached positions
    opt_past: int = 256


def _profile_shape(dims, shapes: EngineShapes, which: str) -> tuple[int, ...]:
    """min / opt / max of one input: dim 1 of a (1, T[, C]) input is tokens, dim 2 of a (1, K, P, D) past."""
    tokens = {"min": 1, "opt": shapes.opt_tokens, "max": shapes.max_tokens}[which]
    past = {"min": 0, "opt": shapes.opt_past, "max": shapes.max_past}[which]
    out = list(dims)
    if len(dims) == 4:
        out[2] = past
    elif len(dims) >= 2:
        out[1] = tokens
    return tuple(1 if d < 0 else d for d in out)


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    fp16: bool = True,
    shapes: EngineShapes = EngineShapes(),
    workspace_bytes: int = 4 << 30,
) -> Path:
    """Parse an exported segment's ONNX graph and write a serialised TensorRT engine to ``out_path``."""
    trt = _import_tensorrt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if any(d < 0 for d in dims):
            profile.set_shape(tensor.name, *(_profile_shape(dims, shapes, w) for w in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see its log above)")
    out = Path(out_path)
    out.write_bytes(bytes(engine))
    logger.info("wrote TensorRT engine %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out
