"""Plan and tier artifacts: folders with a manifest (the sha256 of every file, checked on load),
and loading a plan's verified tier as a runnable segment (``partitioner.plan.export`` writes them)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from runtime.build import build_segment
from runtime.checkpoint import resolve_checkpoint

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact folder is incomplete, tampered with, or made for another model or plan."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(config: dict) -> str:
    """A short id of a model's architecture and weights source, stable across processes."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checkpoint_fingerprint(model: str | os.PathLike) -> str:
    """``model_fingerprint`` of a checkpoint folder's ``config.json``."""
    return model_fingerprint(json.loads((resolve_checkpoint(model) / "config.json").read_text()))


def write_manifest(folder: str | os.PathLike, info: dict, exclude: tuple[str, ...] = ()) -> dict:
    """Hash every file in ``folder`` (but the manifest and the top-level entries ``exclude``) and write
    ``manifest.json`` with ``info``."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.relative_to(folder).parts[0] not in exclude
    }
    manifest = {**info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_manifest(folder: str | os.PathLike, expect: dict | None = None) -> dict:
    """Check every listed file's sha256 (and that ``expect``'s keys match); return the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{str(folder)!r} has no {MANIFEST}: not a splitglm artifact folder")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{folder}: {name} is listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != digest:
            raise ArtifactError(
                f"{folder}: {name} has sha256 {actual[:12]}..., the manifest says {digest[:12]}...: "
                "the file was changed or corrupted; re-run `splitglm partition`"
            )
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            raise ArtifactError(
                f"{folder}: made for {key}={manifest.get(key)!r}, but this deployment expects {value!r}"
            )
    return manifest


def load_plan(plan_dir: str | os.PathLike) -> dict:
    file = Path(plan_dir) / "plan.json"
    if not file.is_file():
        raise ArtifactError(f"{str(plan_dir)!r} has no plan.json: not a plan folder (see `splitglm partition`)")
    return json.loads(file.read_text())


def load_tier(plan_dir: str | os.PathLike, tier: str, expect_model: str | None = None, cpu_decode=None):
    """Verify a tier's artifact against its manifest and the plan, then build its compressed segment.

    ``expect_model``: the model fingerprint this deployment serves; a plan for
    another model is refused. ``cpu_decode``: a ``runtime.cpu_decode.CpuDecode`` (default: eager); its
    ``"plan"`` mode takes the path plan.json's ``cpu_decode`` chose for this tier (eager where it names none).
    """
    plan = load_plan(plan_dir)
    if expect_model is not None and plan["model"] != expect_model:
        raise ArtifactError(f"plan {plan_dir} is for model {plan['model']}, this deployment serves {expect_model}")
    manifest = verify_manifest(
        Path(plan_dir) / tier, {"tier": tier, "plan_id": plan["plan_id"], "model": plan["model"]}
    )
    a, b = manifest["layers"]
    if cpu_decode is not None:
        cpu_decode = cpu_decode.for_plan((plan.get("cpu_decode") or {}).get(tier))
    return build_segment(
        Path(plan_dir) / tier,
        a,
        b,
        manifest["embed"],
        manifest["head"],
        manifest["compression"],
        runs=manifest.get("runs"),
        cpu_decode=cpu_decode,
    )
