"""The measurements a plan stands on, taken once per model and machine and cached.

- profiles: per-layer times of the whole model under each compression choice
  of each backend some tier asks for, at each thread count a tier asks for
  (``profiler.profile_segment`` for PyTorch, ``profiler_onnx`` for onnxruntime);
- codec quality: ``quality.evaluate_codecs`` at a reference split;
- compression quality: perplexity change of each compression on the whole model.

Cache keys: PyTorch keeps the plain keys (``"int8@2"`` profiles, ``"int8"``
quality) that earlier caches and ``live`` read; other backends prefix theirs
(``"onnxruntime:int8@2"``, ``"onnxruntime:int8"``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from protos.codecs import CODECS

from .checkpoint import load_spec
from .compress import apply_compression, compare
from .convert import default_cache_dir
from .manifest import model_fingerprint
from .planner import CodecCost, CompressionCost
from .profiler import Profile, profile_segment
from .profiler_onnx import BACKEND as ONNX
from .quality import evaluate_codecs
from .segment import Segment

logger = logging.getLogger(__name__)

# Compression choices the planner weighs, as compression descriptions (partitioner.compress).
COMPRESSIONS: dict[str, list[dict]] = {
    "none": [],
    "int8": [{"pass": "int8", "activations": "bf16"}],  # weight-only int8, per output channel
    "int4": [{"pass": "int4", "group_size": 32}],
}
# ONNX Runtime choices: the fp32 graph, or onnxruntime's dynamic int8 with the linears
# measured sensitive kept fp32 (globs of module paths, ``backends.quantize_onnx_int8``).
ONNX_COMPRESSIONS: dict[str, dict] = {
    "none": {"precision": "fp32"},
    "int8": {
        "precision": "int8",
        "keep_fp32": ["layers.*.mlp.down_proj", "layers.0.*", "layers.1.*", "layers.2.*", "lm_head"],
    },
}
BACKEND_COMPRESSIONS: dict[str, dict] = {"torch": COMPRESSIONS, ONNX: ONNX_COMPRESSIONS}
QUALITY_TOKENS = 2048


def key(backend: str, compression: str, threads: int | None = None) -> str:
    """Cache key of a profile (with ``threads``) or of a compression's quality (without)."""
    name = compression if backend == "torch" else f"{backend}:{compression}"
    return name if threads is None else f"{name}@{threads}"


def compression_entry(backend: str, name: str) -> dict:
    """A tier's compression as plan.json / manifest.json record it: enough to rebuild it at load."""
    if backend == ONNX:
        return {"name": name, "backend": backend, "passes": [], "onnx": ONNX_COMPRESSIONS[name]}
    return {"name": name, "backend": "torch", "passes": COMPRESSIONS[name]}


def whole_model(path: str | os.PathLike, compression: str) -> Segment:
    segment = Segment.from_checkpoint(path, 0, load_spec(path).num_layers, embed=True, head=True)
    apply_compression(segment, COMPRESSIONS[compression])
    return segment


def _cache_file(path, fingerprint: str) -> Path:
    return default_cache_dir() / "measurements" / f"{fingerprint}.json"


def load_measurements(path: str | os.PathLike) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    file = _cache_file(path, model_fingerprint(config))
    return json.loads(file.read_text()) if file.is_file() else {"profiles": {}, "codecs": {}, "compression": {}}


def save_measurements(path: str | os.PathLike, data: dict) -> Path:
    config = json.loads((Path(path) / "config.json").read_text())
    file = _cache_file(path, model_fingerprint(config))
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(file)
    return file


def ensure_profiles(path, data: dict, threads: set[int], backends: Iterable[str] = ("torch",)) -> None:
    """Profile the whole model for every compression of ``backends`` at every thread count not yet measured."""
    backends = set(backends)
    if "torch" in backends:
        todo = [(c, t) for c in COMPRESSIONS for t in sorted(threads) if key("torch", c, t) not in data["profiles"]]
        for compression, t in tqdm(todo, desc="profiling torch", disable=not todo):
            prof = profile_segment(whole_model(path, compression), str(path), threads=t, compression=compression)
            data["profiles"][key("torch", compression, t)] = asdict(prof)
    if ONNX in backends:
        _ensure_onnx_profiles(path, data, threads)


@contextmanager
def exported_whole_model(path) -> Iterator[Path]:
    """The whole model as ONNX (fp32 + int8 with ``ONNX_COMPRESSIONS["int8"]``'s fp32 globs), in a temp folder."""
    from .profiler_onnx import export_whole_model

    with tempfile.TemporaryDirectory(prefix="splitglm-onnx-") as tmp:
        export_whole_model(path, tmp, ONNX_COMPRESSIONS["int8"]["keep_fp32"])
        yield Path(tmp)


def _ensure_onnx_profiles(path, data: dict, threads: set[int]) -> None:
    from .profiler_onnx import profile_exported

    todo = [(c, t) for c in ONNX_COMPRESSIONS for t in sorted(threads) if key(ONNX, c, t) not in data["profiles"]]
    if not todo:
        return
    with exported_whole_model(path) as folder:
        for compression, t in tqdm(todo, desc="profiling onnxruntime"):
            precision = ONNX_COMPRESSIONS[compression]["precision"]
            prof = profile_exported(folder, str(path), t, precision, compression)
            data["profiles"][key(ONNX, compression, t)] = asdict(prof)


def ensure_quality(path, data: dict, ids: torch.Tensor, backends: Iterable[str] = ("torch",)) -> None:
    """Measure each codec (at splits L/3, 2L/3) and each compression of ``backends`` (whole model) on ``ids``."""
    spec = load_spec(path)
    missing = [c for c in CODECS if c not in data["codecs"]]
    if missing:
        from .pipeline import split_segments

        segments = split_segments(path, spec.num_layers // 3, 2 * spec.num_layers // 3)
        for r in evaluate_codecs(segments, ids, missing, window=512):
            data["codecs"][r.codec] = r.as_dict()
    todo = [c for c in COMPRESSIONS if c not in data["compression"]]
    if todo:
        reference = whole_model(path, "none")
        for name in tqdm(todo, desc="compression quality"):
            data["compression"][name] = compare(reference, whole_model(path, name), ids, window=512)
    if ONNX in set(backends):
        _ensure_onnx_quality(path, data, ids)


def _ensure_onnx_quality(path, data: dict, ids: torch.Tensor) -> None:
    """Each ONNX choice against the PyTorch fp32 model: the ONNX whole model is the candidate."""
    from .backends import OnnxSegment

    todo = [c for c in ONNX_COMPRESSIONS if key(ONNX, c) not in data["compression"]]
    if not todo:
        return
    reference = whole_model(path, "none")
    with exported_whole_model(path) as folder:
        for name in tqdm(todo, desc="onnxruntime quality"):
            candidate = OnnxSegment(folder, ONNX_COMPRESSIONS[name]["precision"])
            data["compression"][key(ONNX, name)] = compare(reference, [candidate], ids, window=512)


def profile_for(data: dict, compression: str, threads: int, backend: str = "torch") -> Profile:
    return Profile.from_dict(data["profiles"][key(backend, compression, threads)])


def codec_costs(data: dict) -> list[CodecCost]:
    """Each codec's cost on ONE link: half the measured increase with the codec on both links."""
    return [
        CodecCost(name, r["bytes_per_element"], r["step_bytes_per_element"], r["perplexity_delta_pct"] / 2)
        for name, r in data["codecs"].items()
    ]


def compression_costs(data: dict, threads: int, num_layers: int, backend: str = "torch") -> list[CompressionCost]:
    """Each compression of ``backend`` with its profile at ``threads`` and its whole-model cost spread per layer."""
    return [
        CompressionCost(name, profile_for(data, name, threads, backend), quality["perplexity_delta_pct"] / num_layers)
        for name in BACKEND_COMPRESSIONS[backend]
        if (quality := data["compression"].get(key(backend, name))) is not None
    ]
