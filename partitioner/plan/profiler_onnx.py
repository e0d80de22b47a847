"""Per-layer time and memory of the whole model run by ONNX Runtime.

The model is exported as ONE segment (embedding + every layer + head) and run
with onnxruntime's own profiler on: a real prefill and real decode steps with
the KV cache, one warm-up run, then medians over repeats, like
``profiler.profile_segment`` does for PyTorch.

Attribution (node-level, no proportional fallback): every kernel event of the
JSON trace is mapped to the module path the exporter recorded on its node
(``pkg.torch.onnx.name_scopes``, see ``backends.module_path``):
``embed_tokens`` -> embed, ``layers.i.*`` -> layer i, ``norm`` / ``lm_head`` -> head.
Nodes that onnxruntime fused or the int8 quantiser made keep the original name
as a prefix (``node_MatMul_212/MatMulScaleFusion/``, ``node_linear_9_quant``);
nodes it invented (``Squeeze_token_2``, an activation's ``DynamicQuantizeLinear``)
take the owner of the next attributed kernel in execution order. Nodes with no
module (rotary angles, causal mask, shape arithmetic) are shared and spread
evenly over the layers. Times are kernel times: session overhead (feeding and
copying the KV cache) is not in them, as module hooks leave it out for PyTorch.

Weight bytes come from the initializers of the model file that runs (fp32, or
int8 weights + scales for quantised linears), each counted for every stage that
consumes it (a tied embedding / LM head counts twice, as in the PyTorch profile).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import platform
import statistics
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from partitioner.plan.profiler import Profile, StageCost
from runtime.backends import OnnxSegment, export_onnx, load_meta, module_path
from runtime.checkpoint import load_spec
from runtime.segment import Segment, SegmentInput

logger = logging.getLogger(__name__)

BACKEND = "onnxruntime"
SHARED = "shared"  # graph nodes of no module, spread over the layers
_KERNEL = "_kernel_time"
_DERIVED_SUFFIXES = ("_quant",)  # onnxruntime.quantization names its nodes after the original


def export_whole_model(
    model_path: str | os.PathLike, out_dir: str | os.PathLike, keep_fp32: Iterable[str] = ()
) -> dict:
    """Export embedding + all layers + head as one ONNX segment, fp32 and int8 (``keep_fp32`` globs stay fp32)."""
    segment = Segment.from_checkpoint(model_path, 0, load_spec(model_path).num_layers, embed=True, head=True)
    return export_onnx(segment.float(), out_dir, quantize_int8=True, keep_fp32=tuple(keep_fp32))


# ---- which stage each graph node belongs to ---------------------------------------------------------


def _stage_of(path: str | None) -> str:
    if path is None:
        return SHARED
    head = path.split(".")[0]
    if head == "layers":
        return path.split(".")[1]
    return "embed" if head == "embed_tokens" else "head"  # "norm", "lm_head"


def node_stages(folder: str | os.PathLike) -> dict[str, str]:
    """Node name -> stage ("embed", "head", layer index as text, or ``SHARED``) from the fp32 graph."""
    import onnx

    meta = load_meta(folder)
    graph = onnx.load(str(Path(folder) / meta["models"]["fp32"]), load_external_data=False).graph
    return {node.name: _stage_of(module_path(node)) for node in graph.node}


def resolve_stage(name: str, stages: dict[str, str]) -> str | None:
    """The stage of a node of the optimised / quantised graph; None if its name says nothing."""
    base = name.split("/")[0]
    for candidate in (name, base, *(base.removesuffix(s) for s in _DERIVED_SUFFIXES)):
        if candidate in stages:
            return stages[candidate]
    return None


def _attribute(names: list[str], stages: dict[str, str]) -> list[str]:
    """Stage per kernel in execution order; unknown names take the next known one's (else shared)."""
    out: list[str | None] = [resolve_stage(n, stages) for n in names]
    following = SHARED
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            out[i] = following
        elif out[i] != SHARED:
            following = out[i]
    return out  # type: ignore[return-value]


# ---- the trace ---------------------------------------------------------------------------------------


def read_trace(path: str | os.PathLike, stages: dict[str, str]) -> list[dict[str, float]]:
    """Per ``session.run`` (in order): ms per stage, from the kernel events of an onnxruntime trace."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    kernels = sorted(
        (e for e in events if e.get("cat") == "Node" and e["name"].endswith(_KERNEL)), key=lambda e: e["ts"]
    )
    owners = _attribute([e["name"].removesuffix(_KERNEL) for e in kernels], stages)
    starts = [start for start, _ in runs]
    totals: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    for event, owner in zip(kernels, owners, strict=True):
        run = bisect.bisect_right(starts, event["ts"]) - 1
        if run >= 0:
            totals[run][owner] += event["dur"] / 1000  # us -> ms
    return [dict(t) for t in totals]


def _spread_shared(totals: dict[str, float], layers: list[str]) -> dict[str, float]:
    share = totals.get(SHARED, 0.0) / len(layers) if layers else 0.0
    out = {k: v for k, v in totals.items() if k != SHARED}
    for layer in layers:
        out[layer] = out.get(layer, 0.0) + share
    return out


# ---- running it -----------------------------------------------------------------------------------------


def _drive(segment: OnnxSegment, prompt: int, steps: int) -> None:
    """One session: a prefill of ``prompt`` tokens, then ``steps`` decode steps (``steps + 1`` runs)."""
    session, vocab = uuid.uuid4().hex, segment.spec.vocab_size
    try:
        segment([SegmentInput(session, 0, input_ids=torch.randint(0, vocab, (prompt,)))], last_only=True)
        for s in range(steps):
            segment([SegmentInput(session, prompt + s, input_ids=torch.randint(0, vocab, (1,)))], last_only=True)
    finally:
        segment.close_session(session)


def _traced_runs(folder, precision: str, threads: int, prompt: int, steps: int, repeats: int, stages) -> list:
    """Per-run stage times of ``repeats`` measured sessions (after one warm-up session)."""
    with tempfile.TemporaryDirectory(prefix="splitglm-ort-trace-") as tmp:
        segment = OnnxSegment(folder, precision, threads=threads, profile_prefix=str(Path(tmp) / "trace"))
        warm_prompt, warm_steps = min(prompt, 16), 2
        _drive(segment, warm_prompt, warm_steps)
        for _ in range(repeats):
            _drive(segment, prompt, steps)
        runs = read_trace(segment.session.end_profiling(), stages)
    expected = warm_steps + 1 + repeats * (steps + 1)
    if len(runs) != expected:
        raise RuntimeError(f"onnxruntime trace holds {len(runs)} runs, expected {expected}")
    return runs[warm_steps + 1 :]


def stage_weight_bytes(folder: str | os.PathLike, precision: str, stages: dict[str, str]) -> dict[str, int]:
    """Bytes of the initializers each stage's nodes consume in the ``precision`` model file."""
    import onnx
    from onnx import numpy_helper

    meta = load_meta(folder)
    graph = onnx.load(str(Path(folder) / meta["models"][precision])).graph
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in graph.initializer}
    consumers: dict[str, set[str]] = defaultdict(set)
    for node in graph.node:
        stage = resolve_stage(node.name, stages) or SHARED
        for name in node.input:
            if name in sizes:
                consumers[name].add(stage)
    out: dict[str, int] = defaultdict(int)
    for name, owners in consumers.items():
        for owner in owners:
            out[owner] += sizes[name]
    return dict(out)


def profile_exported(
    folder: str | os.PathLike,
    model: str,
    threads: int = 2,
    precision: str = "fp32",
    compression: str | None = None,
    prompt_tokens: int = 128,
    decode_steps: int = 16,
    repeats: int = 3,
) -> Profile:
    """Profile an exported whole-model ONNX segment (``export_whole_model``) at ``threads`` threads."""
    meta = load_meta(folder)
    if not (meta["embed"] and meta["head"]):
        raise ValueError(f"{str(folder)!r} is not a whole model (embedding to head): cannot profile every stage")
    stages = node_stages(folder)
    runs = _traced_runs(folder, precision, threads, prompt_tokens, decode_steps, repeats, stages)
    layers = [str(i) for i in range(meta["start"], meta["end"])]
    per_run = [_spread_shared(r, layers) for r in runs]
    step = decode_steps + 1
    prefill = [{k: v / prompt_tokens for k, v in per_run[r * step].items()} for r in range(repeats)]
    decode = [_mean(per_run[r * step + 1 : (r + 1) * step]) for r in range(repeats)]
    weights = _spread_shared({k: float(v) for k, v in stage_weight_bytes(folder, precision, stages).items()}, layers)
    spec = meta["spec"]
    profile = Profile(
        model,
        BACKEND,
        compression or ("none" if precision == "fp32" else precision),
        threads,
        platform.processor() or platform.machine(),
        spec["hidden_size"],
        2 * spec["num_kv_heads"] * spec["head_dim"] * 4,  # the ONNX graph keeps fp32 caches
    )
    for stage in ["embed", *layers, "head"]:
        cost = StageCost(
            prefill_ms_per_token=statistics.median(p.get(stage, 0.0) for p in prefill),
            decode_ms=statistics.median(d.get(stage, 0.0) for d in decode),
            weight_bytes=int(weights.get(stage, 0)),
        )
        if stage in ("embed", "head"):
            setattr(profile, stage, cost)
        else:
            profile.layers[int(stage)] = cost
    logger.info(
        "onnxruntime %s at %d threads: decode step %.2f ms (all stages)",
        precision,
        threads,
        sum(c.decode_ms for c in profile.layers.values()) + profile.embed.decode_ms + profile.head.decode_ms,
    )
    return profile


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in runs for k in r}
    return {k: sum(r.get(k, 0.0) for r in runs) / len(runs) for k in keys}
