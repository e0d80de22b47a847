"""The measurements a plan stands on, taken once per model and machine and cached.

- profiles: per-layer times of the whole model under each compression choice
  of each backend some tier asks for, at each thread count a tier asks for
  (``profiler.profile_segment`` for PyTorch, ``profiler_onnx`` for onnxruntime);
- codec quality: ``quality.evaluate_codecs`` at a reference split;
- compression quality: perplexity change of each compression on the whole model;
- CPU decode paths: one decode step of ``DECODE_SAMPLE_LAYERS`` layers under each compression, eager and
  compiled (``runtime.cpu_decode``), at each thread count a CPU tier asks for (``profiler.decode_paths``).
  The compiled path's profile is the eager one with each layer's decode step scaled by their ratio
  (prefill, the embedding and the head stay eager, as they run); a sample of the layers, since every
  layer has the same shapes and compiling them all takes minutes.

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
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from partitioner.convert import default_cache_dir
from partitioner.eval.compression import compare
from partitioner.eval.quality import evaluate_codecs
from partitioner.plan.planner import CodecCost, CompressionCost
from partitioner.plan.profiler import Profile, decode_paths, faster_compiled, profile_segment
from partitioner.plan.profiler_onnx import BACKEND as ONNX
from protos.codecs import CODECS
from runtime.artifacts import model_fingerprint
from runtime.build import build_segment
from runtime.checkpoint import load_spec
from runtime.compress import apply_compression
from runtime.compress.named import COMPRESSIONS, ONNX_COMPRESSIONS
from runtime.segment import Segment

logger = logging.getLogger(__name__)

BACKEND_COMPRESSIONS: dict[str, dict] = {"torch": COMPRESSIONS, ONNX: ONNX_COMPRESSIONS}
QUALITY_TOKENS = 2048
DECODE_SAMPLE_LAYERS = 2  # layers compiled to time the CPU decode paths (``decode_paths``)


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


def ensure_measurements(
    path, data: dict, threads: set[int], ids: torch.Tensor, backends: Iterable[str] = ("torch",),
    decode_threads: set[int] = frozenset(),
) -> None:
    """Measure what ``data`` lacks: whole-model profiles of each compression of ``backends`` at ``threads``,
    each codec's quality (at splits L/3, 2L/3), each compression's quality (whole model) on ``ids``, and the
    CPU decode paths of each torch compression at ``decode_threads``."""
    backends = set(backends)
    if "torch" in backends:
        _ensure_torch_profiles(path, data, threads)
    _ensure_decode_paths(path, data, decode_threads)
    _ensure_codec_quality(path, data, ids)
    todo = [c for c in COMPRESSIONS if c not in data["compression"]]
    if todo:
        reference = whole_model(path, "none")
        for name in tqdm(todo, desc="compression quality"):
            data["compression"][name] = compare(reference, whole_model(path, name), ids, window=512)
    if ONNX in backends:
        _ensure_onnx(path, data, threads, ids)


def _ensure_torch_profiles(path, data: dict, threads: set[int]) -> None:
    todo = [(c, t) for c in COMPRESSIONS for t in sorted(threads) if key("torch", c, t) not in data["profiles"]]
    for compression, t in tqdm(todo, desc="profiling torch", disable=not todo):
        prof = profile_segment(whole_model(path, compression), str(path), threads=t, compression=compression)
        data["profiles"][key("torch", compression, t)] = asdict(prof)


def _ensure_decode_paths(path, data: dict, threads: Iterable[int]) -> None:
    paths = data.setdefault("cpu_decode", {})
    todo = [(c, t) for c in COMPRESSIONS for t in sorted(threads) if key("torch", c, t) not in paths]
    n = min(DECODE_SAMPLE_LAYERS, load_spec(path).num_layers)
    for compression, t in tqdm(todo, desc="timing the CPU decode paths", disable=not todo):
        eager, compiled = (build_segment(path, 0, n, False, False, compression_entry("torch", compression))
                           for _ in range(2))
        paths[key("torch", compression, t)] = decode_paths(eager, compiled, t)


def _ensure_codec_quality(path, data: dict, ids: torch.Tensor) -> None:
    missing = [c for c in CODECS if c not in data["codecs"]]
    if missing:
        from runtime.local import split_segments

        L = load_spec(path).num_layers
        for r in evaluate_codecs(split_segments(path, L // 3, 2 * L // 3), ids, missing, window=512):
            data["codecs"][r.codec] = r.as_dict()


@contextmanager
def exported_whole_model(path) -> Iterator[Path]:
    """The whole model as ONNX (fp32 + int8 with ``ONNX_COMPRESSIONS["int8"]``'s fp32 globs), in a temp folder."""
    from partitioner.plan.profiler_onnx import export_whole_model

    with tempfile.TemporaryDirectory(prefix="splitglm-onnx-") as tmp:
        export_whole_model(path, tmp, ONNX_COMPRESSIONS["int8"]["keep_fp32"])
        yield Path(tmp)


def _ensure_onnx(path, data: dict, threads: set[int], ids: torch.Tensor) -> None:
    """ONNX profiles and quality (against PyTorch fp32) from one export of the whole model."""
    from partitioner.plan.profiler_onnx import profile_exported
    from runtime.backends import OnnxSegment

    profiles = [(c, t) for c in ONNX_COMPRESSIONS for t in sorted(threads) if key(ONNX, c, t) not in data["profiles"]]
    quality = [c for c in ONNX_COMPRESSIONS if key(ONNX, c) not in data["compression"]]
    if not profiles and not quality:
        return
    with exported_whole_model(path) as folder:
        for compression, t in tqdm(profiles, desc="profiling onnxruntime", disable=not profiles):
            precision = ONNX_COMPRESSIONS[compression]["precision"]
            data["profiles"][key(ONNX, compression, t)] = asdict(
                profile_exported(folder, str(path), t, precision, compression)
            )
        if quality:
            reference = whole_model(path, "none")
            for name in tqdm(quality, desc="onnxruntime quality"):
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


def decode_path(data: dict, compression: str, threads: int, wanted: str = "auto") -> str:
    """The CPU decode path a torch tier of ``compression`` runs at ``threads``: ``wanted`` where it names one
    (a topology's ``cpu_decode``), else ("auto") the one of the shorter measured step; eager when unmeasured."""
    if wanted != "auto":
        return wanted
    measured = data.get("cpu_decode", {}).get(key("torch", compression, threads))
    return "compiled" if faster_compiled(measured) else "eager"



def compiled_profile(profile: Profile, measured: dict | None) -> Profile:
    """``profile`` (eager) with each layer's decode step scaled by the compiled path's measured ratio; as it is
    where that is unmeasured or could not compile on this machine (a topology asked for it all the same)."""
    if not measured or measured["compiled_ms"] is None:
        return profile
    scale = measured["compiled_ms"] / measured["eager_ms"]
    layers = {i: replace(c, decode_ms=c.decode_ms * scale) for i, c in profile.layers.items()}
    return replace(profile, layers=layers)


def compression_costs(data: dict, threads: int, num_layers: int, backend: str = "torch",
                      cpu_decode: str = "eager") -> list[CompressionCost]:
    """Each compression of ``backend`` with its profile at ``threads`` and its whole-model cost spread per layer.

    A torch tier runs the CPU decode path ``decode_path`` picks for ``cpu_decode`` (a topology tier's setting),
    with that path's profile."""
    costs = []
    for name in BACKEND_COMPRESSIONS[backend]:
        quality = data["compression"].get(key(backend, name))
        if quality is None:
            continue
        profile = profile_for(data, name, threads, backend)
        path = decode_path(data, name, threads, cpu_decode) if backend == "torch" else "eager"
        if path == "compiled":
            profile = compiled_profile(profile, data.get("cpu_decode", {}).get(key("torch", name, threads)))
        costs.append(CompressionCost(name, profile, quality["perplexity_delta_pct"] / num_layers, path))
    return costs
