"""Compression passes for segments: int8 / W8A8, SmoothQuant, int4, structured pruning, low rank.

Each pass rewrites a Segment (or any module holding DecoderLayers) in place
over a layer range [start, end) and returns a JSON-able dict of what it did;
``apply_compression`` runs a list of passes described as data, and
``compare`` / ``perplexity`` / ``token_agreement`` measure the accuracy cost.
"""

from .common import CompressionError
from .evaluate import compare, layer_sensitivity, perplexity, token_agreement, window_scores
from .lowrank import low_rank
from .passes import PASSES, apply_compression, validate
from .prune import prune_heads, prune_mlp
from .quant import Int4Linear, Int8Linear, quantize_int4_weights, quantize_int8_weights
from .smooth import smoothquant

__all__ = [
    "PASSES",
    "CompressionError",
    "Int4Linear",
    "Int8Linear",
    "apply_compression",
    "compare",
    "layer_sensitivity",
    "low_rank",
    "perplexity",
    "prune_heads",
    "prune_mlp",
    "quantize_int4_weights",
    "quantize_int8_weights",
    "smoothquant",
    "token_agreement",
    "validate",
    "window_scores",
]
