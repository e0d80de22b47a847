"""Students of a teacher segment [a, b): layer-dropped, pruned or low-rank, each initialised from the teacher.

A student holds the same embedding / norm / head as its teacher (copies) and its own decoder layers.
``Student.aligned`` pairs each student layer with the teacher layer whose output it should match (the
hidden-state part of the loss): a layer-dropped student's layer j, initialised from teacher layer
``keep[j]``, stands for teacher layers keep[j] .. keep[j+1] - 1, so it is matched after keep[j+1] - 1.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from partitioner.distill.dense import DenseContext, dense_forward
from runtime.compress import low_rank, prune_heads, prune_mlp
from runtime.compress.sparse import (
    attach_input_masks,
    histogram_hooks,
    plain_mlp_blocks,
    sparse_description,
)
from runtime.segment import Segment

KINDS = ("layer_drop", "prune", "low_rank", "sparse")


@dataclass
class SparseMasks:
    """A sparse student's MLP input masks (``compress.sparse``): thresholds that zero ``sparsity`` of each
    input on the calibration inputs, recalibrated on the student's own activations as it trains (so it
    cannot escape its sparsity by growing them)."""

    sparsity: float | tuple[float, float]
    calibration: torch.Tensor  # (W, T) ids or (W, T, C) hidden states entering the student
    description: dict | None = None  # {"pass": "sparse_mlp", "thresholds": ...} in force
    handles: list = field(default_factory=list)

    def calibrate(self, segment: Segment) -> dict:
        """Measure the inputs (masks off) and put the new thresholds in force; returns the description."""
        self.remove()
        blocks = plain_mlp_blocks(segment)
        hooks, hists = histogram_hooks(blocks)
        handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
        try:
            with torch.no_grad():
                for rows in self.calibration.split(4):
                    dense_forward(segment, rows.to(next(segment.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        return self.use(segment, sparse_description(hists, blocks, self.sparsity))

    def use(self, segment: Segment, description: dict) -> dict:
        self.remove()
        self.description = description
        self.handles = attach_input_masks(segment, description["thresholds"])
        return description

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class Student:
    kind: str
    segment: Segment  # trainable: real fp32 parameters
    teacher_layers: list[int]  # the teacher layer each student layer was initialised from
    aligned: list[tuple[str, str]]  # (student layer key, teacher layer key) matched by the hidden-state loss
    sparse: SparseMasks | None = None  # a sparse student's input masks


def every_other(start: int, end: int, depth: int | None = None) -> list[int]:
    """``depth`` teacher layers of [start, end) spread evenly from ``start`` (default: every other one)."""
    n = end - start
    depth = depth or max(1, n // 2)
    if not 1 <= depth <= n:
        raise ValueError(f"a layer-dropped student of [{start}, {end}) keeps 1..{n} layers, got {depth}")
    return [start + (j * n) // depth for j in range(depth)]


@torch.no_grad()
def greedy_keep(teacher: Segment, x: torch.Tensor, depth: int, back: Segment | None = None) -> list[int]:
    """The ``depth`` teacher layers to keep: drop, one at a time, the layer whose absence changes the logits
    least (KL against the whole teacher on the windows ``x``, (B, T) ids or (B, T, C) states at its start).

    Every-other on the demo model's tail [20, 30) starts at KL 6.2, this choice ([20, 24, 27, 28, 29]) at 2.1.
    """
    if not 1 <= depth <= len(teacher.layers):
        raise ValueError(f"a layer-dropped student keeps 1..{len(teacher.layers)} layers, got {depth}")
    ctx = DenseContext(x.shape[1], teacher.spec, x.device)
    start = teacher.embed_tokens(x) if teacher.has_embed else x

    def log_probs(keep: list[int]) -> torch.Tensor:
        h = start
        for i in keep:
            h = teacher.layers[str(i)](h, ctx)
        h = dense_forward(back, h)[0] if back is not None else teacher.lm_head(teacher.norm(h))  # (B, T, V)
        return torch.log_softmax(h.float().flatten(0, 1), -1)  # (B * T, V)

    keep = [int(k) for k in teacher.layers]
    reference = log_probs(keep)
    while len(keep) > depth:
        cost = {i: float(torch.nn.functional.kl_div(log_probs([k for k in keep if k != i]), reference,
                                                     log_target=True, reduction="batchmean")) for i in keep}
        keep.remove(min(cost, key=cost.get))
    return keep


def layer_dropped(teacher: Segment, keep: list[int]) -> Student:
    """Keep teacher layers ``keep`` (sorted, within the teacher), renumbered from the teacher's start."""
    a, b = teacher.start, teacher.end
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < a or keep[-1] >= b:
        raise ValueError(f"keep must be increasing distinct layers within [{a}, {b}), got {keep}")
    student = Segment(teacher.spec, a, a + len(keep), teacher.has_embed, teacher.has_head)
    for j, t in enumerate(keep):
        student.layers[str(a + j)].load_state_dict(teacher.layers[str(t)].state_dict())
    for name in ("embed_tokens", "norm", "lm_head"):
        if hasattr(teacher, name):
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    ends = [t - 1 for t in keep[1:]] + [b - 1]
    return Student("layer_drop", student, list(keep), [(str(a + j), str(e)) for j, e in enumerate(ends)])


def pruned(teacher: Segment, mlp_fraction: float = 0.0, head_fraction: float = 0.0, calibration=None) -> Student:
    """A copy of the teacher with ``mlp_fraction`` of MLP channels and ``head_fraction`` of query heads removed."""
    if not mlp_fraction and not head_fraction:
        raise ValueError("a pruned student needs mlp_fraction or head_fraction above 0")
    student = copy.deepcopy(teacher)
    student.pool = None
    if head_fraction:
        prune_heads(student, head_fraction, calibration=calibration)
    if mlp_fraction:
        prune_mlp(student, mlp_fraction, calibration=calibration)
    return _same_depth("prune", teacher, student)


def low_ranked(teacher: Segment, rank_fraction: float, names: list[str] | None = None) -> Student:
    """A copy of the teacher with the named linears (default ``mlp.down_proj``) factorised at ``rank_fraction``."""
    student = copy.deepcopy(teacher)
    student.pool = None
    low_rank(student, rank_fraction=rank_fraction, **({"names": names} if names else {}))
    return _same_depth("low_rank", teacher, student)


def sparse_masked(teacher: Segment, sparsity, calibration: torch.Tensor) -> Student:
    """A copy of the teacher whose MLPs zero ``sparsity`` of their inputs (TEAL thresholds on ``calibration``,
    (W, T) ids or (W, T, C) hidden states), to be fine-tuned with the masks in place."""
    student = _same_depth("sparse", teacher, copy.deepcopy(teacher))
    student.segment.pool = None
    student.sparse = SparseMasks(sparsity, calibration)
    student.sparse.calibrate(student.segment)
    return student


def _same_depth(kind: str, teacher: Segment, student: Segment) -> Student:
    keys = list(teacher.layers)
    return Student(kind, student, [int(k) for k in keys], [(k, k) for k in keys])


def trainable(student: Student, train_head: bool = False) -> list[nn.Parameter]:
    """Turn on gradients for the student's layers and final norm (and head if asked); off for the rest."""
    segment = student.segment
    params = []
    for name, p in segment.named_parameters():
        wanted = name.startswith("layers.") or name.startswith("norm.")
        wanted = wanted or (train_head and name.startswith("lm_head."))
        p.requires_grad_(wanted)
        if wanted:
            params.append(p)
    return params


def make_student(
    model: str | os.PathLike,
    layers: tuple[int, int],
    kind: str,
    keep: list[int] | None = None,
    depth: int | None = None,
    mlp_fraction: float = 0.0,
    head_fraction: float = 0.0,
    rank_fraction: float = 0.5,
    calibration: torch.Tensor | None = None,
    auto_keep=None,
    sparsity: float | tuple[float, float] | None = None,
    sparse_calibration: torch.Tensor | None = None,
) -> tuple[Student, Segment]:
    """(student, teacher) for layers [a, b) of ``model``: the embedding if a == 0, the head if b == L.

    ``calibration``: windows (B, T) of token ids for calibrated pruning; ``auto_keep``: a function
    (teacher, depth) -> kept layers (``greedy_keep`` on training windows) when ``keep`` is None;
    ``sparsity`` and ``sparse_calibration`` (the windows entering the segment): the sparse student's.
    """
    from runtime.checkpoint import load_spec

    a, b = layers
    L = load_spec(model).num_layers
    if not 0 <= a < b <= L:
        raise ValueError(f"layers must be A,B with 0 <= A < B <= {L}, got {a},{b}")
    teacher = Segment.from_checkpoint(model, a, b, embed=a == 0, head=b == L)
    if kind == "layer_drop":
        if keep is None and auto_keep is not None:
            keep = auto_keep(teacher, depth or max(1, (b - a) // 2))
        student = layer_dropped(teacher, keep or every_other(a, b, depth))
    elif kind == "prune":
        student = pruned(teacher, mlp_fraction, head_fraction, calibration)
    elif kind == "low_rank":
        student = low_ranked(teacher, rank_fraction)
    elif kind == "sparse":
        if sparsity is None or sparse_calibration is None:
            raise ValueError("a sparse student needs a sparsity and calibration windows")
        student = sparse_masked(teacher, sparsity, sparse_calibration)
    else:
        raise ValueError(f"unknown student kind {kind!r}; known: {', '.join(KINDS)}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
