"""The CUDA engine's passes: the static buffers of one pass shape, and a step's items laid out in them.

A pass's rows: ``chunk`` rows of one long step's chunk (a prompt's; 0: none), then B sessions x T rows of short
steps (decode, verification), each padded to T rows, B rounded up to a bucket. Padding rows write to no KV slot
and attend nothing; their outputs are never read. A layout gives each item of the pass its first row.
"""

from __future__ import annotations

import torch

from runtime.kv_pool import KVPool
from runtime.sampling import Processed
from runtime.static_sampling import Needs, StaticRows
from runtime.step import SegmentInput

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
Layout = list[tuple[SegmentInput, int, bool]]  # per item: (the item, its first row, keep its logits)


class Pass:
    """Static buffers of one pass shape, its captured graph (if any), and how to fill and read them.

    Its rows: ``chunk`` rows of one long step (a prompt chunk; 0: none), then ``steps`` sessions x ``rows_per``
    rows of short steps. A pass without a chunk is a short pass (skinny products), one without short steps a
    chunk pass, one with both a mixed pass (cuBLAS products, as a chunk pass)."""

    def __init__(self, engine, chunk: int, steps: int, rows_per: int, sampled: bool,
                 processing: Needs | None = None):  # engine: the ``runtime.cuda.CudaEngine`` (not imported: a cycle)
        self.chunk, self.sampled, self.short = chunk, sampled, chunk == 0
        self.B = steps + (1 if chunk else 0)  # sessions
        self.T = max(chunk, rows_per)  # the longest session's rows
        N, dev = chunk + steps * rows_per, engine.device
        self.N = N
        if engine.has_embed:
            self.inputs = torch.zeros(N, dtype=torch.int64, device=dev)
        else:
            self.inputs = torch.zeros(N, engine.spec.hidden_size, dtype=engine.dtype, device=dev)
        self.meta = torch.zeros(2 * N + 4 * self.B, dtype=torch.int32, device=dev)
        m = self.meta
        self.positions, self.slots = m[:N], m[N : 2 * N]
        self.rows, self.ctx_lens, self.q_starts, self.q_lens = m[2 * N :].view(4, self.B)
        self.sampling = torch.zeros(3, N, dtype=torch.float32, device=dev)  # temperature, top_p, uniform
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, ...] = ()
        # the short steps' processed rows (rows [chunk, N)), sampled after the layers by a second graph: its
        # buffers, what the rows ask. A chunk's processed rows are sampled eagerly, as in a chunk pass.
        self.processing = processing
        self.static = StaticRows(N - chunk, engine.spec.vocab_size, dev) if processing is not None else None
        self.sample_graph: torch.cuda.CUDAGraph | None = None
        self.sample_out: Processed | None = None

    def fill(self, layout: Layout, pool: KVPool, page_rows: dict[str, int], embed: bool) -> None:
        """Copy the items' inputs into the buffers (padding rows write to no slot and attend nothing); the KV
        slots from ``pool``, each session's row of the page table from ``page_rows``."""
        N, B = self.N, self.B
        positions, slots, where = [0] * N, [-1] * N, []
        rows, ctx, starts, lens = [0] * B, [0] * B, [0] * B, [0] * B
        samp = [[0.0] * N, [1.0] * N, [0.0] * N]
        for b, (item, first, _) in enumerate(layout):
            n = item.num_positions
            positions[first : first + n] = range(item.start_pos, item.start_pos + n)
            slots[first : first + n] = pool.slots(item.session_id, item.start_pos, n)
            where.extend(range(first, first + n))
            rows[b], ctx[b], starts[b], lens[b] = page_rows[item.session_id], item.start_pos + n, first, n
            for j, r in enumerate(item.sample):
                at = first + n - len(item.sample) + j
                samp[0][at], samp[1][at], samp[2][at] = r.temperature, r.top_p, r.uniform
        meta = torch.tensor(positions + slots + rows + ctx + starts + lens, dtype=torch.int32)
        self.meta.copy_(meta, non_blocking=True)
        self.sampling.copy_(torch.tensor(samp, dtype=torch.float32), non_blocking=True)
        src = torch.cat([item.input_ids if embed else item.hidden for item, _, _ in layout])  # (R, C)
        src = src.to(device=self.inputs.device, dtype=self.inputs.dtype, non_blocking=True)
        if where == list(range(len(where))):  # every session fills its rows: one copy (padding keeps old rows)
            self.inputs[: len(where)].copy_(src)
        else:
            self.inputs.index_copy_(0, torch.tensor(where, device=self.inputs.device), src)
