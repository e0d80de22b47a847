"""Students: segments whose structure differs from the model's, described as data and rebuilt at load.

A student of layers [a, b) (``splitglm distill``, ``partitioner.distill``) may hold fewer decoder layers
(a layer-dropped fast tail), fewer query heads or MLP channels per layer (pruned), or factorised
linears (low rank). Its ``structure`` records that, JSON-able, so a tier artifact can be rebuilt
exactly from its weights file:

```
{"depth": m,                        # decoder layers it holds, numbered a .. a + m - 1
 "teacher_layers": [a, a + 2, ...], # the model layer each was initialised from (documentation)
 "layers": {"<i>": {"num_heads": H', "intermediate": I', "ranks": {"mlp.down_proj": r}}}}
```

Layers not listed in ``"layers"`` have the model's shape. The student's KV pool has ``m`` layers.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from runtime.checkpoint import GlmSpec, load_spec, load_tensors
from runtime.segment import Segment, _local_name


class StudentError(ValueError):
    """A student structure is malformed or does not match its weights."""


def layer_shape(block: nn.Module) -> dict:
    """What a (possibly pruned or factorised) decoder layer's shape differs in: heads, MLP width, ranks."""
    ranks = {
        name: module[0].out_features
        for name, module in block.named_modules()
        if isinstance(module, nn.Sequential) and len(module) == 2 and all(isinstance(m, nn.Linear) for m in module)
    }
    gate_up = block.mlp.gate_up_proj
    width = (gate_up[-1] if isinstance(gate_up, nn.Sequential) else gate_up).out_features // 2
    shape = {"num_heads": block.self_attn.num_heads, "intermediate": width}
    return {**shape, "ranks": ranks} if ranks else shape


def structure_of(segment: Segment, teacher_layers: list[int]) -> dict:
    """The ``structure`` record of a student segment (see the module docstring)."""
    spec = segment.spec
    layers = {}
    for index, block in segment.layers.items():
        shape = layer_shape(block)
        if shape != {"num_heads": spec.num_heads, "intermediate": spec.intermediate_size}:
            layers[index] = shape
    return {"depth": len(segment.layers), "teacher_layers": list(teacher_layers), "layers": layers}


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


def reshape_layer(block: nn.Module, spec: GlmSpec, shape: dict) -> None:
    """Give a freshly built decoder layer the heads, MLP width and factorised linears of ``shape``."""
    C, D = spec.hidden_size, spec.head_dim
    heads, inter = int(shape.get("num_heads", spec.num_heads)), int(shape.get("intermediate", spec.intermediate_size))
    if heads < 1 or heads % spec.num_kv_heads or inter < 1:
        raise StudentError(f"a student layer needs a multiple of {spec.num_kv_heads} query heads and an MLP "
                           f"width >= 1, got {heads} heads and width {inter}")
    attn, mlp = block.self_attn, block.mlp
    if heads != attn.num_heads:
        attn.q_proj = _linear(C, heads * D, spec.attention_bias)
        attn.o_proj = _linear(heads * D, C, False)
        attn.num_heads = heads
    if inter != spec.intermediate_size:
        mlp.gate_up_proj = _linear(C, 2 * inter, False)
        mlp.down_proj = _linear(inter, C, False)
    for name, rank in (shape.get("ranks") or {}).items():
        try:
            linear = block.get_submodule(name)
        except AttributeError:
            raise StudentError(f"a student layer has no linear {name!r} to factorise") from None
        if not isinstance(linear, nn.Linear) or not 1 <= int(rank) < min(linear.in_features, linear.out_features):
            raise StudentError(f"rank {rank!r} of {name!r} is not below its {tuple(linear.weight.shape)} shape")
        parent, _, child = name.rpartition(".")
        factors = nn.Sequential(_linear(linear.in_features, int(rank), False),
                                _linear(int(rank), linear.out_features, linear.bias is not None))
        setattr(block.get_submodule(parent) if parent else block, child, factors)


def student_segment(spec: GlmSpec, start: int, structure: dict, embed: bool, head: bool) -> Segment:
    """An empty (meta) student segment of ``structure``, from layer ``start``."""
    depth = structure.get("depth")
    if not isinstance(depth, int) or not 0 <= depth <= spec.num_layers - start:
        raise StudentError(f"a student from layer {start} holds 0..{spec.num_layers - start} layers, got {depth!r}")
    shapes = structure.get("layers") or {}
    unknown = sorted(set(shapes) - {str(i) for i in range(start, start + depth)})
    if unknown:
        raise StudentError(f"the structure describes layer {unknown[0]}, the student holds [{start}, {start + depth})")
    with torch.device("meta"):
        segment = Segment(spec, start, start + depth, embed, head)
        for index, shape in shapes.items():
            reshape_layer(segment.layers[index], spec, shape)
    return segment


def load_student(path: str | os.PathLike, start: int, structure: dict, embed: bool, head: bool,
                 dtype: torch.dtype = torch.float32) -> Segment:
    """Rebuild a student segment from a folder holding its weights (checkpoint names) and ``config.json``."""
    spec = load_spec(path)
    segment = student_segment(spec, start, structure, embed, head)
    wanted = set(segment.state_dict())
    state = {_local_name(k): v.to(dtype) for k, v in load_tensors(path, lambda n: _local_name(n) in wanted).items()}
    missing = sorted(wanted - set(state))
    if missing:
        raise StudentError(f"student weights in {str(path)!r} lack {len(missing)} tensors, e.g. {missing[:3]}")
    expected = segment.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise StudentError(f"student tensor {name} is {tuple(tensor.shape)}, its structure says "
                               f"{tuple(expected[name].shape)}")
    segment.load_state_dict(state, assign=True)
    return segment.eval()
