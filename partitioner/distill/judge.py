"""How good a distilled tier is, on text it was not trained on: the tier as deployed against its teacher.

The exported tier is rebuilt from its folder (``runtime.build.build_segment``: the structure, then the
passes that make QAT weights low-bit) and runs through the runtime, KV pool and all. Both it and the
teacher segment sit between the same frozen layers (front [0, a), back [b, L) + head), so the numbers
are the whole model's perplexity change and greedy agreement with the student in place (and, for a sparse
tier, the share of its MLP inputs zeroed on the judged text).
"""

from __future__ import annotations

import os
from pathlib import Path

from partitioner.eval.compression import compare
from runtime.artifacts import verify_manifest
from runtime.build import build_segment
from runtime.checkpoint import load_spec, load_tokenizer
from runtime.compress.sparse import mean_shares, sparsity_tally
from runtime.segment import Segment


def load_distilled(folder: str | os.PathLike) -> tuple[Segment, dict]:
    """A distilled tier folder (``splitglm distill --out``), verified, as a runnable segment; and its manifest."""
    manifest = verify_manifest(folder, {"tier": "student"})
    a, b = manifest["layers"]
    return build_segment(folder, a, b, manifest["embed"], manifest["head"], manifest["compression"]), manifest


def judge(model: str | os.PathLike, folder: str | os.PathLike, text: str | os.PathLike, tokens: int = 4096,
          window: int = 512) -> dict:
    """Perplexity change and greedy agreement of the model with the distilled tier in place, on ``text``."""
    student, manifest = load_distilled(folder)
    a, b = manifest["layers"]
    L = load_spec(model).num_layers
    front = [Segment.from_checkpoint(model, 0, a, embed=True)] if a > 0 else []
    back = [Segment.from_checkpoint(model, b, L, head=True)] if b < L else []
    teacher = Segment.from_checkpoint(model, a, b, embed=a == 0, head=b == L)
    ids = load_tokenizer(model)(Path(text).read_text(encoding="utf-8", errors="replace"),
                                return_tensors="pt").input_ids[0][:tokens]
    with sparsity_tally(student) as shares:
        result = compare(front + [teacher] + back, front + [student] + back, ids, window)
    out = {"text": str(text), "compression": manifest["compression"]["name"], **result}
    if shares:  # a sparse tier: the share of its MLP inputs zeroed on this text
        out["mlp_inputs_zeroed"] = {site: round(share, 4) for site, share in mean_shares(shares).items()}
    return out
