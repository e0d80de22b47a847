"""Export a Segment as an ONNX graph with explicit KV-cache inputs and outputs.

One graph serves prefill and decode: every token and cache axis is dynamic.

    inputs   input_ids (1, T) int64          -- segments with the embedding
             hidden (1, T, C) float32        -- segments that start later
             position_offset (1,) int64      -- absolute position of the first new row
             past_key_{i}, past_value_{i}    (1, K, P, D) float32, per layer i; P may be 0
    outputs  hidden_states (1, T, C)  or  logits (1, T, V) with the head
             present_key_{i}, present_value_{i}  (1, K, P + T, D)

The graph reuses the segment's own modules (DecoderLayer, rotary, RMSNorm):
only the cache is swapped for ``_GraphKV``, which joins the past given as
graph inputs with the new keys and values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import GlmSpec
from ..layers import AttentionBatch, rotary_cos_sin
from ..segment import Segment

logger = logging.getLogger(__name__)

OPSET = 18
FORMAT_VERSION = 1
META_FILE = "segment.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
_PROTOBUF_LIMIT = 1_800_000_000  # bytes; larger models keep their weights in an external data file
# Example sizes for tracing: neither 0 nor 1 (which torch.export would specialise) nor a model dimension.
_EXAMPLE_TOKENS, _EXAMPLE_PAST = 7, 11


class _GraphKV:
    """Stands in for a KVCache while tracing: past (graph input) + new keys/values = present (graph output)."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past  # layer -> 2 x (K, P, D)
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)  # (K, P + T, D)
        self.present[layer] = (keys, values)
        return keys, values


def graph_attention_batch(position_offset: torch.Tensor, past: int, tokens: int, spec: GlmSpec, kv) -> AttentionBatch:
    """Rotary angles and the causal mask of T new rows attending to P cached + T new keys."""
    positions = position_offset[:, None] + torch.arange(tokens)  # (1, T)
    cos, sin = rotary_cos_sin(positions, spec.rotary_dim, spec.rope_theta)  # 2 x (1, 1, T, R/2)
    keys = torch.arange(past + tokens)  # (P + T,)
    mask = keys[None, :] <= (past + torch.arange(tokens))[:, None]  # (T, P + T)
    return AttentionBatch(cos=cos, sin=sin, mask=mask[None, None], caches=[kv], starts=[past], lengths=[tokens])


class SegmentGraph(nn.Module):
    """The traceable form of a Segment: (inputs, position_offset, *past) -> (output, *present)."""

    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment
        self.layer_ids = list(range(segment.start, segment.end))

    def forward(self, inputs: torch.Tensor, position_offset: torch.Tensor, *past: torch.Tensor):
        seg = self.segment
        x = seg.embed_tokens(inputs) if seg.has_embed else inputs  # (1, T, C)
        kv = _GraphKV({i: (past[2 * j][0], past[2 * j + 1][0]) for j, i in enumerate(self.layer_ids)})
        cached = past[0].shape[2] if past else 0
        batch = graph_attention_batch(position_offset, cached, x.shape[1], seg.spec, kv)
        for layer in seg.layers.values():
            x = layer(x, batch)  # (1, T, C)
        out = seg.lm_head(seg.norm(x)) if seg.has_head else x  # (1, T, C) or (1, T, V)
        presents = [t[None] for i in self.layer_ids for t in kv.present[i]]  # 2L x (1, K, P + T, D)
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
    return ({1: tokens}, None, tuple(past))  # the varargs ``past`` take one tuple


def _weight_bytes(segment: Segment) -> int:
    return sum(p.numel() * p.element_size() for p in segment.parameters())


def _export_fp32(segment: Segment, path: Path) -> None:
    inputs, outputs = io_names(segment)
    program = torch.onnx.export(
        SegmentGraph(segment).eval(),
        _example_args(segment),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=_dynamic_shapes(segment),
        opset_version=OPSET,
        dynamo=True,
    )
    program.save(str(path), external_data=_weight_bytes(segment) > _PROTOBUF_LIMIT)


def quantize_onnx_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation with onnxruntime: int8 per-channel weights of every MatMul / Gemm."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        use_external_data_format=src.with_name(src.name + ".data").exists(),
    )


def _is_plain_fp32(segment: Segment) -> None:
    """Compressed segments hold custom kernels the exporter cannot trace: export fp32 and quantise in ONNX."""
    odd = {type(m).__name__ for m in segment.modules() if type(m).__module__.startswith("partitioner.compress")}
    if odd:
        raise ValueError(f"export the uncompressed fp32 segment (found {sorted(odd)}); use quantize_int8=True")
    dtypes = {p.dtype for p in segment.parameters()}
    if dtypes - {torch.float32}:
        raise ValueError(f"export an fp32 segment, not {sorted(map(str, dtypes))}")


def export_onnx(segment: Segment, out_dir, quantize_int8: bool = False) -> dict:
    """Write ``segment`` as ONNX (and optionally an int8 copy) plus ``segment.json`` into ``out_dir``.

    Returns the metadata written to ``segment.json``: the spec, the layer
    range, which ends the segment has, the graph's inputs/outputs and the
    model files by precision.
    """
    _is_plain_fp32(segment)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _export_fp32(segment, out / MODEL_FILES["fp32"])
    models = {"fp32": MODEL_FILES["fp32"]}
    if quantize_int8:
        quantize_onnx_int8(out / MODEL_FILES["fp32"], out / MODEL_FILES["int8"])
        models["int8"] = MODEL_FILES["int8"]
    inputs, outputs = io_names(segment)
    meta = {
        "format": FORMAT_VERSION,
        "spec": dataclasses.asdict(segment.spec),
        "start": segment.start,
        "end": segment.end,
        "embed": segment.has_embed,
        "head": segment.has_head,
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "models": models,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("exported layers [%d, %d) as ONNX %s to %s", segment.start, segment.end, sorted(models), out)
    return meta
