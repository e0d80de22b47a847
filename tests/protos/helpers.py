"""Hypothesis strategies and field readers shared by the protos tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from protos import pb


@st.composite
def hidden_tensors(draw, widths=(2, 6, 32, 64, 96, 192), max_tokens=6):
    """(T, C) float32 tensors like hidden states: normal bulk, a few big channels,
    varied scale, sometimes all-zero or constant rows."""
    T = draw(st.integers(1, max_tokens))
    C = draw(st.sampled_from(widths))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.floats(-6, 2))  # big channels stay within fp16
    x = torch.randn(T, C, generator=g) * scale
    n_big = draw(st.integers(0, min(3, C)))
    if n_big:
        chans = torch.randperm(C, generator=g)[:n_big]
        x[:, chans] *= 10.0 ** draw(st.floats(0, 2))
    pattern = draw(st.sampled_from(["none", "zero_row", "const_row"]))
    if pattern == "zero_row":
        x[draw(st.integers(0, T - 1))] = 0
    elif pattern == "const_row":
        x[draw(st.integers(0, T - 1))] = scale
    return x


def fp16_field(msg_bytes: bytes) -> torch.Tensor:
    """Little-endian fp16 bytes -> float32 tensor."""
    return torch.from_numpy(np.frombuffer(msg_bytes, dtype="<f2").astype(np.float32))


def outlier_index(msg: pb.EncodedTensor) -> torch.Tensor:
    """Uncompressed outlier indices -> (T, k) int64."""
    T, k = msg.shape[0], msg.outliers_per_token
    return torch.from_numpy(np.frombuffer(msg.outlier_index, dtype="<u2").astype(np.int64)).view(T, k)


def outlier_mask(msg: pb.EncodedTensor, idx: torch.Tensor) -> torch.Tensor:
    """(T, C) bool, True at outlier channels."""
    mask = torch.zeros(*msg.shape, dtype=torch.bool)
    return mask.scatter_(1, idx, True) if idx.numel() else mask
