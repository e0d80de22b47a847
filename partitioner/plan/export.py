"""Plan folders: ``plan.json`` and one verified artifact folder per tier.

```
PLAN_DIR/plan.json          splits, codecs, compression, predictions, candidates
PLAN_DIR/report.md          the choice explained, with report.png
PLAN_DIR/{device,edge,cloud,fast_tail}/
    model.safetensors       the tier's weights (checkpoint names), fp32
    config.json             the model config
    tokenizer files         device and edge (the session owners): TOKENIZER_FILES
    vocabulary files        cloud and fast_tail (the tiers that sample): VOCABULARY_FILES, for grammars
    manifest.json           tier, layers, compression, model and plan ids, sha256 of every file
```

The tiers that sample get the vocabulary (``tokenizer.json``, public) and the
end-of-text ids (``generation_config.json``) so they can compile a request's
grammar (``runtime.grammar``); never a prompt. Plans exported before they did
still serve every request without a grammar (a grammar there is refused by
name, or compiled from the edge's tokenizer for the fast tail).

Weights are stored uncompressed; the tier's compression (a list of
``runtime.compress`` passes) is applied when the agent loads them, so
the artifact is exact and the compression deterministic. A tier planned for
onnxruntime records ``"backend": "onnxruntime"`` and its ``"onnx"`` recipe
(precision, fp32-kept globs) with no ``passes``: its artifact is the same fp32
safetensors, which the agent exports to ONNX (``backends.export_onnx``) at load.

``fast_tail`` is the edge's compressed copy of the cloud tier ([k2, L) + head,
``partitioner.plan.fast_tail``); plan.json records it as ``"fast_tail": {"compression":
entry, "quality": measured against the cloud tier or null, ...}`` (a plan without
that key gets the default fast tail of ``fixed_plan``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from runtime.artifacts import ArtifactError, model_fingerprint, write_manifest
from runtime.checkpoint import load_spec, resolve_checkpoint
from runtime.segment import Segment

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
VOCABULARY_FILES = ("tokenizer.json", "generation_config.json")  # what a tier that samples needs of the tokenizer
LAYOUT = 2  # a tier folder's contents; cached plans of an older layout are exported again (2: VOCABULARY_FILES)


def tier_layout(num_layers: int, k1: int, k2: int) -> dict[str, dict]:
    """What each tier's artifact holds (the edge also holds [0, k1) to serve HTTP clients alone)."""
    return {
        "device": {"layers": [0, k1], "embed": True, "head": False},
        "edge": {"layers": [0, k2], "embed": True, "head": False, "runs": [k1, k2]},
        "cloud": {"layers": [k2, num_layers], "embed": False, "head": True},
        "fast_tail": {"layers": [k2, num_layers], "embed": False, "head": True},  # run by the edge
    }


def plan_id(plan: dict) -> str:
    body = {k: v for k, v in plan.items() if k != "plan_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def save_weights(segment: Segment, folder: Path) -> None:
    """The segment's tensors as ``folder/model.safetensors``, under the checkpoint's names."""
    state = {
        ("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach().clone().contiguous()
        for k, v in segment.state_dict().items()
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_config(model: Path, folder: Path) -> None:
    """The model's ``config.json`` in ``folder``, untied: each tier stores exactly the tensors it runs."""
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _write_tier(model: Path, folder: Path, layout: dict, info: dict, source: Path | None = None) -> None:
    """A tier folder: the model's weights of the tier's layers, or (``source``) a distilled student's weights."""
    folder.mkdir(parents=True)
    if source is not None:
        shutil.copy2(Path(source) / "model.safetensors", folder / "model.safetensors")
    else:
        a, b = layout["layers"]
        save_weights(Segment.from_checkpoint(model, a, b, embed=layout["embed"], head=layout["head"]), folder)
    write_config(model, folder)
    names = TOKENIZER_FILES if layout["embed"] else VOCABULARY_FILES if layout["head"] else ()
    for name in names:
        if (model / name).is_file():
            shutil.copy2(model / name, folder / name)
    write_manifest(folder, {**info, **layout})


def export_plan(model: str | os.PathLike, plan: dict, out: str | os.PathLike,
                sources: dict[str, str | os.PathLike] | None = None) -> dict:
    """Write ``plan.json`` and the tier folders (device, edge, cloud, fast_tail) into ``out`` (new or empty).

    ``sources``: tiers whose weights come from a distilled student's folder (its compression entry, with
    the ``"student"`` structure, is already the plan's), e.g. ``{"fast_tail": DIR}``.
    """
    model, out = resolve_checkpoint(model), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"output folder {str(out)!r} exists and is not empty")
    spec = load_spec(model)
    config = json.loads((model / "config.json").read_text())
    k1, k2 = plan["splits"]
    plan = {"fast_tail": default_fast_tail(), **plan, "model": model_fingerprint(config), "num_layers": spec.num_layers}
    plan["plan_id"] = plan_id(plan)
    out.mkdir(parents=True, exist_ok=True)
    layouts = tier_layout(spec.num_layers, k1, k2)
    for tier, layout in tqdm(layouts.items(), desc="exporting"):
        info = {
            "tier": tier,
            "model": plan["model"],
            "plan_id": plan["plan_id"],
            "compression": _tier_compression(plan, tier),
        }
        _write_tier(model, out / tier, layout, info, (sources or {}).get(tier))
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    return plan


def _tier_compression(plan: dict, tier: str) -> dict:
    if tier == "fast_tail":
        return plan["fast_tail"]["compression"]
    return plan["compression"].get(tier, {"name": "none", "passes": []})


def default_fast_tail(name: str | None = None) -> dict:
    """plan.json's ``"fast_tail"`` for a plan chosen without measuring it: ``name``'s compression
    (default ``fast_tail.DEFAULT_FAST_TAIL``, int8 weight-only), quality unknown."""
    from partitioner.plan.fast_tail import DEFAULT_FAST_TAIL, fast_tail_entry

    return {"compression": fast_tail_entry(name or DEFAULT_FAST_TAIL), "quality": None}


def fixed_plan(
    splits: tuple[int, int], codecs: tuple[str, str], compression: dict | None = None, fast_tail: str | None = None
) -> dict:
    """A plan chosen by hand (no topology, no measurement): splits, link codecs, per-tier compression,
    and the fast tail's compression (a ``fast_tail.FAST_TAIL_COMPRESSIONS`` name; default int8
    weight-only; "none" for an exact copy of the cloud tier)."""
    from partitioner.plan.measure import compression_entry

    compression = compression or {}
    return {
        "topology": "fixed",
        "splits": list(splits),
        "codecs": {"device_edge": codecs[0], "edge_cloud": codecs[1]},
        "compression": {t: compression.get(t, compression_entry("torch", "none")) for t in ("device", "edge", "cloud")},
        "fast_tail": default_fast_tail(fast_tail),
    }


def cached_plan(model: str | os.PathLike, plan: dict, root: str | os.PathLike) -> Path:
    """Export ``plan`` for ``model`` once under ``root`` (named by model and plan) and return its folder."""
    model = resolve_checkpoint(model)
    config = json.loads((model / "config.json").read_text())
    name = f"{model_fingerprint(config)}-{plan_id({**plan, 'model': model_fingerprint(config)})}-v{LAYOUT}"
    folder = Path(root) / name
    if (folder / "plan.json").is_file():
        return folder
    staging = Path(root) / f".{name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    export_plan(model, plan, staging)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return folder
