"""Per-session key/value cache for the layers of one segment."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer of a segment for one session.

    Storage grows by doubling; ``length`` counts the positions committed so
    far. Writing at a start before ``length`` overwrites from there (a
    retried or replayed step), so a step repeated with the same start
    position gives the same result.
    """

    def __init__(
        self,
        layers: range,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        capacity: int = 64,
        device: torch.device | str = "cpu",
    ):
        self.layers = layers
        self.length = 0
        self._shape = (num_kv_heads, capacity, head_dim)
        self._dtype, self._device = dtype, device
        self._k = {i: torch.zeros(self._shape, dtype=dtype, device=device) for i in layers}  # (K, capacity, D)
        self._v = {i: torch.zeros(self._shape, dtype=dtype, device=device) for i in layers}

    @property
    def capacity(self) -> int:
        return self._shape[1]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions, keeping what is cached."""
        if total <= self.capacity:
            return
        new_capacity = max(total, 2 * self.capacity)
        heads, _, dim = self._shape
        for store in (self._k, self._v):
            for i, old in store.items():
                grown = torch.zeros(heads, new_capacity, dim, dtype=self._dtype, device=self._device)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown
        self._shape = (heads, new_capacity, dim)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (K, n, D) keys/values at ``start``; return views of positions [0, start + n)."""
        end = start + k.shape[1]
        self._k[layer][:, start:end] = k
        self._v[layer][:, start:end] = v
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self._k, self._v) for t in store.values())
