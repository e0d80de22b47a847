"""Bring a distilled tier back from the GPU machine, whose replies carry at most 8 files of 16 MiB.

    python3 deploy/gpu/student.py pack DIR OUT NAME     # there: the trained layers + norm as bf16 shards,
                                                        # and DIR's manifest, history and judgement in one JSON
    python3 deploy/gpu/student.py unpack FILES_AT NAME MODEL DIR   # here: DIR as a tier folder again

The LM head and embedding are not trained by default, so they come from MODEL (the same checkpoint).
The bf16 rounding of the trained weights is the one change; judge the unpacked tier again here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 15 << 20


def pack(folder: Path, out: Path, name: str) -> None:
    state = load_file(str(folder / "model.safetensors"))
    trained = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()
               if k.startswith("model.layers.") or k.startswith("model.norm.")}
    shard, size, n = {}, 0, 0
    for key in sorted(trained):
        if shard and size + trained[key].numel() * 2 > SHARD_BYTES:
            save_file(shard, str(out / f"{name}-{n:02d}.safetensors"))
            shard, size, n = {}, 0, n + 1
        shard[key] = trained[key]
        size += trained[key].numel() * 2
    if shard:
        save_file(shard, str(out / f"{name}-{n:02d}.safetensors"))
    meta = {"manifest": json.loads((folder / "manifest.json").read_text())}
    for extra in ("history.json", "judged.json"):
        if (folder / extra).is_file():
            meta[extra] = json.loads((folder / extra).read_text())
    (out / f"{name}.json").write_text(json.dumps(meta))


def unpack(files_at: Path, name: str, model: Path, folder: Path) -> None:
    from runtime.artifacts import write_manifest

    meta = json.loads((files_at / f"{name}.json").read_text())
    manifest = meta["manifest"]
    state = {}
    for shard in sorted(files_at.glob(f"{name}-*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(shard)).items()})
    if manifest["head"] or manifest["embed"]:
        from runtime.checkpoint import load_tensors

        wanted = {"lm_head.weight", "model.embed_tokens.weight"}
        source = load_tensors(model, lambda n: n in wanted)
        if manifest["head"]:
            state["lm_head.weight"] = source.get("lm_head.weight", source.get("model.embed_tokens.weight")).float()
        if manifest["embed"]:
            state["model.embed_tokens.weight"] = source["model.embed_tokens.weight"].float()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("history.json", "judged.json"):
        if extra in meta:
            (folder / extra).write_text(json.dumps(meta[extra], indent=2))
    info = {k: v for k, v in manifest.items() if k != "files"}
    info["transport"] = "trained weights carried as bf16 from the GPU machine (deploy/gpu/student.py)"
    write_manifest(folder, info, exclude=("train",))


if __name__ == "__main__":
    if sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        unpack(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
