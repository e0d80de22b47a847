"""Compression passes for segments: int8 / W8A8, SmoothQuant, int4, structured pruning, low rank, sparsity.

Each pass rewrites a Segment (or any module holding DecoderLayers) in place
over a layer range [start, end) and returns a JSON-able dict of what it did;
``apply_compression`` runs a list of passes described as data
(``partitioner.eval.compression`` measures their accuracy cost).
"""

from runtime.compress.common import CompressionError
from runtime.compress.lowrank import low_rank
from runtime.compress.passes import PASSES, apply_compression, validate
from runtime.compress.prune import prune_heads, prune_mlp
from runtime.compress.quant import Int4Linear, Int8Linear, quantize_int4_weights, quantize_int8_weights
from runtime.compress.smooth import smoothquant
from runtime.compress.sparse import SparseMLP, calibrate_sparse_mlp, sparse_mlp

__all__ = [
    "PASSES",
    "CompressionError",
    "Int4Linear",
    "Int8Linear",
    "SparseMLP",
    "apply_compression",
    "calibrate_sparse_mlp",
    "low_rank",
    "prune_heads",
    "prune_mlp",
    "quantize_int4_weights",
    "quantize_int8_weights",
    "smoothquant",
    "sparse_mlp",
    "validate",
]
