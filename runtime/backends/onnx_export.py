"""Export a Segment as an ONNX graph with explicit KV-cache inputs and outputs.

One graph serves prefill and decode: every token and cache axis is dynamic.

    inputs   input_ids (1, T) int64          -- segments with the embedding
             hidden (1, T, C) float32        -- segments that start later
             position_offset (1,) int64      -- absolute position of the first new row
             past_key_{i}, past_value_{i}    (1, K, P, D) float32, per layer i; P may be 0
    outputs  hidden_states (1, T, C)  or  logits (1, T, V) with the head
             present_key_{i}, present_value_{i}  (1, K, P + T, D)

The graph reuses the segment's own modules (DecoderLayer, rotary, RMSNorm):
only the step context is ``GraphStep``, which joins the past given as
graph inputs with the new keys and values.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.checkpoint import GlmSpec
from runtime.compress.quant import Int4Linear, Int8Linear
from runtime.layers import rotary_cos_sin
from runtime.segment import Segment

logger = logging.getLogger(__name__)

OPSET = 18
FORMAT_VERSION = 1
META_FILE = "segment.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
_PROTOBUF_LIMIT = 1_800_000_000  # bytes; larger models keep their weights in an external data file
# Example sizes for tracing: neither 0 nor 1 (which torch.export would specialise) nor a model dimension.
_EXAMPLE_TOKENS, _EXAMPLE_PAST = 7, 11


class GraphStep:
    """The step context of a traced segment: past keys/values are graph inputs, the presents its outputs."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]], position_offset: torch.Tensor,
                 tokens: int, spec: GlmSpec):
        self.past = past  # layer -> 2 x (K, P, D)
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions = position_offset[:, None] + torch.arange(tokens)  # (1, T)
        self.cos, self.sin = rotary_cos_sin(self.positions, spec.rotary_dim, spec.rope_theta)  # 2 x (1, T, 1, R/2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Past + new keys/values become the layer's present; causal attention of the T rows: (1, T, H, D)."""
        past_k, past_v = self.past[layer]
        keys = torch.cat((past_k, k[0].transpose(0, 1)), dim=1)  # (K, P + T, D)
        values = torch.cat((past_v, v[0].transpose(0, 1)), dim=1)
        self.present[layer] = (keys, values)
        T, P = q.shape[1], past_k.shape[1]
        mask = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]  # (T, P + T)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[None], values[None],
                                             attn_mask=mask[None, None], enable_gqa=True)  # (1, H, T, D)
        return out.transpose(1, 2)  # (1, T, H, D)


class SegmentGraph(nn.Module):
    """The traceable form of a Segment: (inputs, position_offset, *past) -> (output, *present)."""

    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment
        self.layer_ids = list(range(segment.start, segment.end))

    def forward(self, inputs: torch.Tensor, position_offset: torch.Tensor, *past: torch.Tensor):
        seg = self.segment
        x = seg.embed_tokens(inputs) if seg.has_embed else inputs  # (1, T, C)
        past_kv = {i: (past[2 * j][0], past[2 * j + 1][0]) for j, i in enumerate(self.layer_ids)}
        ctx = GraphStep(past_kv, position_offset, x.shape[1], seg.spec)
        for layer in seg.layers.values():
            x = layer(x, ctx)  # (1, T, C)
        out = seg.lm_head(seg.norm(x)) if seg.has_head else x  # (1, T, C) or (1, T, V)
        presents = [t[None] for i in self.layer_ids for t in ctx.present[i]]  # 2L x (1, K, P + T, D)
        return (out, *presents)


def io_names(segment: Segment) -> tuple[list[str], list[str]]:
    """Graph input and output names, in argument order."""
    kv = [f"{kind}_{i}" for i in range(segment.start, segment.end) for kind in ("key", "value")]
    inputs = ["input_ids" if segment.has_embed else "hidden", "position_offset"] + [f"past_{n}" for n in kv]
    outputs = ["logits" if segment.has_head else "hidden_states"] + [f"present_{n}" for n in kv]
    return inputs, outputs


def _example_args(segment: Segment) -> tuple[torch.Tensor, ...]:
    spec, T, P = segment.spec, _EXAMPLE_TOKENS, _EXAMPLE_PAST
    if segment.has_embed:
        first = torch.randint(0, spec.vocab_size, (1, T))  # (1, T)
    else:
        first = torch.randn(1, T, spec.hidden_size)  # (1, T, C)
    past = [torch.randn(1, spec.num_kv_heads, P, spec.head_dim) for _ in range(2 * (segment.end - segment.start))]
    return (first, torch.tensor([P]), *past)


def _dynamic_shapes(segment: Segment) -> tuple:
    tokens, cached = torch.export.Dim("tokens"), torch.export.Dim("past")
    past = [{2: cached} for _ in range(2 * (segment.end - segment.start))]
    if not past:  # a segment of no layers (the embedding alone): no varargs at all
        return ({1: tokens}, None)
    return ({1: tokens}, None, tuple(past))  # the varargs ``past`` take one tuple


def _weight_bytes(segment: Segment) -> int:
    return sum(p.numel() * p.element_size() for p in segment.parameters())


def _export_fp32(segment: Segment, path: Path) -> None:
    inputs, outputs = io_names(segment)
    with warnings.catch_warnings():  # the exporter's notes on its own internals (treespec, axis renaming)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = _trace(segment, inputs, outputs)
    program.save(str(path), external_data=_weight_bytes(segment) > _PROTOBUF_LIMIT)


def _trace(segment: Segment, inputs: list[str], outputs: list[str]):
    return torch.onnx.export(
        SegmentGraph(segment).eval(),
        _example_args(segment),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=_dynamic_shapes(segment),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )


def module_path(node) -> str | None:
    """The module an exported node came from (``layers.3.mlp.down_proj``), from the exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            # ['', 'segment.layers.0', ..., 'segment.layers.0.mlp.down_proj', 'linear_5']
            scopes = ast.literal_eval(prop.value)
            modules = [s for s in scopes if s.startswith("segment.")]
            return modules[-1].removeprefix("segment.") if modules else None
    return None


def nodes_of_modules(model_path: Path, patterns: Iterable[str]) -> dict[str, str]:
    """MatMul / Gemm nodes whose module path matches a glob (``layers.*.mlp.down_proj``): node -> module."""
    import onnx

    patterns = list(patterns)
    if not patterns:
        return {}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    found = {}
    for node in graph.node:
        path = module_path(node) if node.op_type in ("MatMul", "Gemm") else None
        if path and any(fnmatch.fnmatchcase(path, p) for p in patterns):
            found[node.name] = path
    if not found:
        logger.warning("no linear of %s matches keep_fp32 %s: everything is quantised", model_path, patterns)
    return found


def quantize_onnx_int8(src: Path, dst: Path, keep_fp32: Iterable[str] = ()) -> list[str]:
    """Dynamic int8 quantisation with onnxruntime: per-channel int8 weights of every MatMul / Gemm.

    Only products with a constant weight are quantised (``MatMulConstBOnly``):
    attention's query-key and score-value products stay fp32. Linears whose
    module path matches a ``keep_fp32`` glob stay fp32 too. Returns those modules' paths.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = nodes_of_modules(src, keep_fp32)
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=list(kept),
        extra_options={"MatMulConstBOnly": True},
        use_external_data_format=src.with_name(src.name + ".data").exists(),
    )
    return sorted(kept.values())


def _check_exportable(segment: Segment) -> None:
    """Int8/int4 kernels cannot be traced to ONNX: export the fp32 segment and quantise it in ONNX instead."""
    custom = sorted({type(m).__name__ for m in segment.modules() if isinstance(m, (Int8Linear, Int4Linear))})
    if custom:
        raise ValueError(f"export the uncompressed fp32 segment (it holds {custom}); ask for quantize_int8=True")
    dtypes = {p.dtype for p in segment.parameters()} - {torch.float32}
    if dtypes:
        raise ValueError(f"export an fp32 segment, not one holding {sorted(map(str, dtypes))}")


def export_onnx(segment: Segment, out_dir, quantize_int8: bool = False, keep_fp32: Iterable[str] = ()) -> dict:
    """Write ``segment`` as ONNX (and optionally an int8 copy) plus ``segment.json`` into ``out_dir``.

    ``keep_fp32``: globs of module paths (``layers.*.mlp.down_proj``) left
    unquantised in the int8 model, for the layers measurements call sensitive.

    Returns the metadata written to ``segment.json``: the spec, the layer
    range, which ends the segment has, the graph's inputs/outputs and the
    model files by precision.
    """
    _check_exportable(segment)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _export_fp32(segment, out / MODEL_FILES["fp32"])
    meta = _metadata(segment)
    if quantize_int8:
        kept = quantize_onnx_int8(out / MODEL_FILES["fp32"], out / MODEL_FILES["int8"], keep_fp32)
        meta["models"]["int8"] = MODEL_FILES["int8"]
        meta["int8"] = {
            "weights": "int8 per output channel",
            "activations": "uint8 per tensor, dynamic",
            "kept_fp32": kept,
        }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("exported layers [%d, %d) as ONNX %s to %s", segment.start, segment.end, sorted(meta["models"]), out)
    return meta


def _metadata(segment: Segment) -> dict:
    inputs, outputs = io_names(segment)
    return {
        "format": FORMAT_VERSION,
        "spec": dataclasses.asdict(segment.spec),
        "start": segment.start,
        "end": segment.end,
        "embed": segment.has_embed,
        "head": segment.has_head,
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "models": {"fp32": MODEL_FILES["fp32"]},
    }
