"""The measurements a plan stands on, taken once per model and machine and cached.

- profiles: per-layer times of the whole model under each compression choice,
  at each thread count a tier asks for (``profiler.profile_segment``);
- codec quality: ``quality.evaluate_codecs`` at a reference split;
- compression quality: perplexity change of each compression on the whole model.
"""

from __future__ import annotations

import json
import logging
import os
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
from .quality import evaluate_codecs
from .segment import Segment

logger = logging.getLogger(__name__)

# Compression choices the planner weighs, as compression descriptions (partitioner.compress).
COMPRESSIONS: dict[str, list[dict]] = {
    "none": [],
    "int8": [{"pass": "int8", "activations": "bf16"}],  # weight-only int8, per output channel
    "int4": [{"pass": "int4", "group_size": 32}],
}
QUALITY_TOKENS = 2048


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


def ensure_profiles(path, data: dict, threads: set[int]) -> None:
    """Profile the whole model for every compression at every thread count not yet measured."""
    todo = [(c, t) for c in COMPRESSIONS for t in sorted(threads) if f"{c}@{t}" not in data["profiles"]]
    for compression, t in tqdm(todo, desc="profiling", disable=not todo):
        prof = profile_segment(whole_model(path, compression), str(path), threads=t, compression=compression)
        data["profiles"][f"{compression}@{t}"] = asdict(prof)


def ensure_quality(path, data: dict, ids: torch.Tensor) -> None:
    """Measure each codec (at splits L/3, 2L/3) and each compression (whole model) on ``ids``."""
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


def profile_for(data: dict, compression: str, threads: int) -> Profile:
    return Profile.from_dict(data["profiles"][f"{compression}@{threads}"])


def codec_costs(data: dict) -> list[CodecCost]:
    """Each codec's cost on ONE link: half the measured increase with the codec on both links."""
    return [
        CodecCost(name, r["bytes_per_element"], r["step_bytes_per_element"], r["perplexity_delta_pct"] / 2)
        for name, r in data["codecs"].items()
    ]


def compression_costs(data: dict, threads: int, num_layers: int) -> list[CompressionCost]:
    """Each compression with its profile at ``threads`` and its whole-model cost spread per layer."""
    return [
        CompressionCost(name, profile_for(data, name, threads), r["perplexity_delta_pct"] / num_layers)
        for name, r in data["compression"].items()
    ]
