"""Tensor parallelism of a PyTorch segment: each rank holds a slice of every layer, two all-reduces a layer.

``shard_segment`` cuts a loaded ``Segment`` in place into rank ``r``'s shard of ``N`` (the layer code of
``runtime.layers`` runs unchanged on the slices):

- attention: column-parallel Q, K and V (the rank's query heads and the KV heads they read), row-parallel
  o_proj, one all-reduce of its output. KV heads are split across ranks; where N exceeds the KV head
  count each KV head is replicated on N / K ranks, and each rank takes H / N of the query heads that read
  it. The KV pool of a shard holds only its own KV heads (``Segment.kv_heads``).
- MLP: column-parallel gate/up (the rank's slice of the gate and the same slice of up), row-parallel
  down_proj, one all-reduce of its output.
- LM head: split by vocabulary (padded to a multiple of N), its logits gathered on every rank, so sampling,
  log-probs and grammar masks see the full (R, V) logits exactly as on one rank.
- embedding and norms: replicated.

Collectives run on ``Ranks.compute`` (NCCL on GPUs, gloo on CPUs); one that fails marks the replica failed
(``Ranks.fail``) and raises ``ReplicaDown``. The process groups and the leader/follower protocol are in
``runtime.tp_ranks``.

Shapes: N rows, C hidden, H query heads, K kv heads, D head dim, I MLP width, V vocabulary, W ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.checkpoint import GlmSpec
from runtime.segment import Segment
from runtime.tp_ranks import Ranks


class ShardError(ValueError):
    """A segment cannot be split across this many ranks (the reason named)."""


def split_problem(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> str | None:
    """Why ``world`` ranks cannot split a layer of these shapes, or None."""
    if world < 1:
        return f"tensor parallel size must be >= 1, got {world}"
    if num_heads % world:
        return f"{world} ranks do not divide the {num_heads} query heads"
    if num_kv_heads % world and world % num_kv_heads:
        return (f"{world} ranks and {num_kv_heads} KV heads: the ranks must divide the KV heads, or be a multiple "
                "of them (each KV head then replicated)")
    if intermediate % world:
        return f"{world} ranks do not divide the MLP width {intermediate}"
    return None


def spec_problem(spec: GlmSpec, world: int) -> str | None:
    """``split_problem`` for a model's shapes."""
    return split_problem(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, world)


def head_slices(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[slice, slice]:
    """Rank ``rank``'s query heads and the KV heads they read (query head h reads KV head h // (H / K))."""
    per_rank = num_heads // world
    first = rank * per_rank
    kv_first = first // (num_heads // num_kv_heads)
    return slice(first, first + per_rank), slice(kv_first, kv_first + max(num_kv_heads // world, 1))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding these (sliced) tensors."""
    with torch.device("meta"):
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
    return out


def _rows(linear: nn.Module, *spans: tuple[int, int]) -> nn.Linear:
    """Column parallel: the output features in ``spans`` (joined in order)."""
    _plain(linear)
    weight = torch.cat([linear.weight[a:b] for a, b in spans])  # (out', in)
    bias = None if linear.bias is None else torch.cat([linear.bias[a:b] for a, b in spans])
    return _linear(weight, bias)


def _plain(linear: nn.Module) -> None:
    if type(linear) is not nn.Linear:  # a compression pass replaced it (int8, low rank): no slicing rule here
        raise ShardError(f"tensor parallelism splits plain nn.Linear layers; this segment has a {type(linear).__name__}"
                         " (a compressed tier): serve an uncompressed cloud tier")


class RowParallel(nn.Module):
    """Row parallel: this rank's input features of a linear (no bias), its partial outputs summed over ranks."""

    def __init__(self, linear: nn.Module, start: int, stop: int, ranks: Ranks):
        super().__init__()
        _plain(linear)
        if linear.bias is not None:
            raise ShardError("a row-parallel linear with a bias is not supported")
        self.linear, self.ranks = _linear(linear.weight[:, start:stop], None), ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_reduce(self.linear(x))  # (N, C), summed over ranks


class VocabParallelHead(nn.Module):
    """The LM head's rows [r * V', (r + 1) * V') of a vocabulary padded to W * V'; logits gathered: (N, V)."""

    def __init__(self, head: nn.Module, ranks: Ranks):
        super().__init__()
        _plain(head)
        vocab = head.weight.shape[0]
        per_rank = -(-vocab // ranks.world)
        weight = torch.zeros(per_rank * ranks.world, head.weight.shape[1], dtype=head.weight.dtype,
                             device=head.weight.device)
        weight[:vocab] = head.weight.detach()
        self.local = _linear(weight[ranks.rank * per_rank : (ranks.rank + 1) * per_rank], None)
        self.vocab, self.ranks = vocab, ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_gather(self.local(x))[:, : self.vocab]  # (N, W * V') -> (N, V)


def shard_attention(attn: nn.Module, ranks: Ranks) -> None:
    """Keep rank ``ranks.rank``'s query heads and their KV heads (``runtime.layers.Attention``)."""
    D = attn.head_dim
    q, kv = head_slices(attn.num_heads, attn.num_kv_heads, ranks.rank, ranks.world)
    attn.q_proj = _rows(attn.q_proj, (q.start * D, q.stop * D))
    attn.k_proj = _rows(attn.k_proj, (kv.start * D, kv.stop * D))
    attn.v_proj = _rows(attn.v_proj, (kv.start * D, kv.stop * D))
    attn.o_proj = RowParallel(attn.o_proj, q.start * D, q.stop * D, ranks)
    attn.num_heads, attn.num_kv_heads = q.stop - q.start, kv.stop - kv.start


def shard_mlp(mlp: nn.Module, ranks: Ranks) -> None:
    """Keep rank ``ranks.rank``'s slice of the MLP width (``runtime.layers.MLP``)."""
    width = mlp.down_proj.weight.shape[1]
    per_rank = width // ranks.world
    a = ranks.rank * per_rank
    mlp.gate_up_proj = _rows(mlp.gate_up_proj, (a, a + per_rank), (width + a, width + a + per_rank))  # gate, up
    mlp.down_proj = RowParallel(mlp.down_proj, a, a + per_rank, ranks)


def shard_segment(segment, ranks: Ranks):
    """Cut a loaded ``Segment`` (no session yet) into this rank's shard, in place; ShardError if it cannot be."""
    if not isinstance(segment, Segment):
        raise ShardError(f"tensor parallelism splits PyTorch segments, not a {type(segment).__name__}")
    if segment.sessions:
        raise ShardError("a segment is sharded before its first session")
    if segment.compiled is not None:
        raise ShardError("the compiled CPU decode path does not run tensor parallel; shard the eager segment")
    if ranks.world == 1:
        return segment
    kv_heads = set()
    for index, layer in segment.layers.items():
        attn = layer.self_attn
        problem = split_problem(attn.num_heads, attn.num_kv_heads, layer.mlp.down_proj.weight.shape[1], ranks.world)
        if problem:
            raise ShardError(f"layer {index}: {problem}")
        shard_attention(attn, ranks)
        shard_mlp(layer.mlp, ranks)
        kv_heads.add(attn.num_kv_heads)
    if segment.has_head:
        segment.lm_head = VocabParallelHead(segment.lm_head, ranks)
    segment.kv_heads = kv_heads.pop() if kv_heads else max(segment.spec.num_kv_heads // ranks.world, 1)
    segment.pool = None  # remade with the shard's KV heads at the first session
    return segment
