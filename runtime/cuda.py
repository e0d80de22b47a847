"""A segment on an NVIDIA GPU: fused bf16 weights, Triton kernels over the paged KV pool, CUDA graphs.

``CudaEngine`` serves the same calls as ``Segment`` (``engine(items, last_only)``, sessions, ``reserve``).
A call runs in passes over the layers, each a fixed set of kernels (``_layers``: fused add + RMSNorm, one
qkv product, rotary + KV write, paged attention, o, gate-up, SiLU-gate, down):

- one **short pass** for every session stepping at most ``decode_rows`` positions (decode, speculative
  verification): the rows of B sessions, each padded to T rows, B rounded up to a bucket; the linears are
  the batch-invariant skinny products, so a row computes the same bits whoever shares its pass. Each
  (bucket, T, greedy/sampled) shape is captured once as a CUDA graph and replayed.
- one **chunk pass** per ``prefill_chunk`` positions of a longer step (a prompt), padded to the chunk: the
  linears are cuBLAS products of exactly ``prefill_chunk`` rows, also captured as a graph.
- a **mixed pass** (``mixed_passes``, off by default) where a call holds both: the first chunk of its first long
  step, then the short pass's B x T rows, so the weights are read once for both (the scheduler gives a call
  at most one chunk: its whole step is one pass). Its linears are cuBLAS products of chunk + B x T rows: every
  row gets what separate passes give it within the rounding of its dtype, not bit for bit (the short rows'
  batch invariance holds across short passes only). Further chunks of the long step run in chunk passes.

The buffers of each pass shape and how a step's items are laid out in them: ``runtime.cuda_pass``.

``graphs=False`` runs the very same passes on the very same buffers without capture: the eager reference
the graphs are tested against. Sampling (``runtime.sampling.sample_rows``) runs inside each pass; the
tokens are the only thing read back. A session whose rows need logit processing (penalties, logit bias, a
grammar's mask, top-k / min-p, top log-probs: a row not ``.plain``) is sampled after the pass instead:

- in a short pass (and for the short steps' rows of a mixed pass), by a second graph
  (``runtime.static_sampling.sample_static`` over the pass's logits and the rows' parameters in static device
  buffers), one per pass shape and the processing it needs. The host fills those buffers, computing the
  grammars' masks, while the GPU runs the layers;
- in a chunk pass (a prompt's last chunk, in a mixed pass too) and where a row has more penalty or bias pairs
  than the buffers hold, eagerly by ``runtime.sampling.sample_batch`` on the pass's logits of its rows.

Both give the tokens, log-probabilities and alternatives of the PyTorch segment's ``sample_processed``; the
graphs of a step without such rows are unchanged.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from runtime import fp8
from runtime import triton_ops as ops
from runtime.checkpoint import GlmSpec
from runtime.cuda_pass import BATCH_BUCKETS, Layout, Pass
from runtime.cuda_weights import Linear, Weights, weights_of
from runtime.kv_pool import DEFAULT_PAGE_SIZE, KVPool, PoolExhausted, pool_tokens
from runtime.layers import inverse_frequencies
from runtime.sampling import Processed, sample_batch, sample_rows
from runtime.static_sampling import Needs, TooManyPairs, needs, sample_static
from runtime.step import Sampled, SegmentInput, begin_step, check_items, end_step
from runtime.tensor_parallel import head_slices
from runtime.tp_ranks import Ranks


class CudaEngine:
    masks_while_running = True  # a step's lazy grammar masks are computed while its layers run (``_replay``)

    def __init__(
        self,
        segment=None,
        *,
        weights: Weights | None = None,
        spec: GlmSpec | None = None,
        start: int = 0,
        embed: bool = False,
        head: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        fp8_linears: bool = False,
        device: str | torch.device = "cuda",
        pool_tokens: int | None = None,
        pool_mib: float | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        prefill_chunk: int = 128,
        decode_rows: int = 16,
        max_batch: int = 32,
        max_sessions: int = 1024,
        max_positions: int = 8192,
        graphs: bool = True,
        mixed_passes: bool = False,
        ranks: Ranks | None = None,
    ):
        """From a ``Segment`` (its weights are copied to the GPU), or from ``weights`` + ``spec`` + layout.
        ``dtype``: activations, KV cache, norms and head; ``fp8_linears``: the layers' products in FP8
        (``runtime.fp8``; a ``Segment``'s weights are quantised here, given ``weights`` must already be).
        ``ranks``: a tensor-parallel shard (``runtime.tensor_parallel``: the segment sharded, or ``weights`` of
        a shard's shape), its all-reduces and the head's gather captured in the graphs; None: the whole segment.
        ``mixed_passes``: a call's short steps and the first chunk of its first long step share one pass (False:
        separate passes, each short step's rows then through the batch-invariant products only)."""
        if not ops.AVAILABLE:
            raise RuntimeError("the CUDA engine needs triton (it comes with PyTorch's CUDA builds)")
        self.device, self.dtype = torch.device(device), dtype
        if fp8_linears:
            if dtype == torch.float32:
                raise ValueError("fp8 weights run with bfloat16 (or float16) activations, not float32")
            problem = fp8.support_error(self.device)
            if problem:
                raise RuntimeError(problem)
        if segment is not None:
            spec, start, embed, head = segment.spec, segment.start, segment.has_embed, segment.has_head
            weights = weights_of(segment, dtype, self.device, fp8_linears)
        self.spec, self.weights, self.ranks = spec, weights, ranks
        self.heads, self.kv_heads = spec.num_heads, spec.num_kv_heads  # of this shard, with ranks
        self._warming = False  # a capture's warm-up: no collectives (see ``_capture``)
        if ranks is not None:
            q, kv = head_slices(spec.num_heads, spec.num_kv_heads, ranks.rank, ranks.world)
            self.heads, self.kv_heads = q.stop - q.start, kv.stop - kv.start
            ranks.all_reduce(torch.zeros(1, device=self.device))  # NCCL's communicator set up before any capture
        self.start, self.end = start, start + len(weights.layers)
        self.has_embed, self.has_head = embed, head
        self.prefill_chunk, self.decode_rows, self.max_batch = prefill_chunk, decode_rows, max_batch
        self.max_positions, self.graphs, self.mixed_passes = max_positions, graphs, mixed_passes
        layers, K, D = len(weights.layers), self.kv_heads, spec.head_dim
        per_token = 2 * max(layers, 1) * K * D * dtype.itemsize
        self.pool = KVPool(layers, K, D, tokens=pool_tokens_of(per_token, pool_tokens, pool_mib), page_size=page_size,
                           dtype=dtype, device=self.device, grow="exact")
        self.max_pages = math.ceil(max_positions / page_size)
        self._rows: dict[str, int] = {}  # session -> its row of the page table
        self._written: dict[str, int] = {}  # session -> pages copied into its row
        self._free_rows = list(range(max_sessions))
        self.page_table = torch.zeros(max_sessions, self.max_pages, dtype=torch.int32, device=self.device)
        angles = torch.arange(max_positions, device=self.device).float()[:, None] * \
            inverse_frequencies(spec.rotary_dim, spec.rope_theta, self.device)[None]  # (P, R/2)
        self.cos, self.sin = angles.cos().contiguous(), angles.sin().contiguous()
        self._passes: dict[tuple, Pass] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if graphs else None
        self.stats = {"graph_replays": 0, "eager_passes": 0, "captures": 0, "fill_ms": 0.0, "positions": 0,
                      "forked_positions": 0, "eager_samplings": 0, "mixed_passes": 0}

    # ---- sessions (as Segment) ---------------------------------------------------------------------

    @property
    def sessions(self) -> dict:
        return self.pool.sessions

    def open_session(self, session_id: str) -> None:
        self.pool.open(session_id)
        self._attach(session_id)

    def close_session(self, session_id: str) -> None:
        if session_id in self.pool.sessions:
            self.pool.close(session_id)
        if session_id in self._rows:
            self._free_rows.append(self._rows.pop(session_id))
            self._written.pop(session_id, None)

    def cached_length(self, session_id: str) -> int:
        return self.pool.sessions[session_id].length

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        """Start the new session ``dst`` from ``src``'s cached positions [0, length), their pages shared
        copy-on-write, with room for ``reserve`` positions (as ``Segment.fork_session``)."""
        if reserve > self.max_positions:
            raise ValueError(f"{reserve} positions exceed the engine's max_positions {self.max_positions}")
        self.pool.fork(src, dst, length, reserve)
        try:
            self._attach(dst)
        except PoolExhausted:  # no row of the page table left
            self.close_session(dst)
            raise
        self.stats["forked_positions"] += length

    def reserve(self, session_id: str, positions: int) -> None:
        """Take room for ``positions`` positions of a session now (PoolExhausted if the pool lacks it)."""
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the engine's max_positions {self.max_positions}")
        opened = self.pool.reserve_all([(session_id, None, positions)])  # closed again if the pool lacks room
        try:
            self._attach(session_id)
        except PoolExhausted:  # no row of the page table left: nothing of a new session stays
            for new in opened:
                self.close_session(new)
            raise

    def _attach(self, session_id: str) -> None:
        """Give a session its row of the GPU page table and copy there the pages it got (or had replaced by
        copy-on-write copies) since."""
        if session_id not in self._rows:
            if not self._free_rows:
                raise PoolExhausted(f"the engine holds its most sessions ({len(self._rows)})")
            self._rows[session_id] = self._free_rows.pop()
        state = self.pool.sessions[session_id]
        pages, written = state.pages, self._written.get(session_id, 0)
        if state.replaced is not None:
            written, state.replaced = min(written, state.replaced), None
        if len(pages) > written:
            new = torch.tensor(pages[written:], dtype=torch.int32).to(self.device, non_blocking=True)
            self.page_table[self._rows[session_id], written : len(pages)] = new
            self._written[session_id] = len(pages)

    # ---- a call --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, items: list[SegmentInput], last_only: bool = False) -> list:
        if not items:
            return []
        check_items(items, self.spec, self.has_embed, self.has_head, self.start)
        for item in items:
            if item.start_pos + item.num_positions > self.max_positions:
                raise ValueError(f"session {item.session_id!r} would hold more than {self.max_positions} positions")
        opened = [i.session_id for i in items if i.session_id not in self.pool.sessions]
        begin_step(self.pool, items)
        for item in items:
            self._attach(item.session_id)
        try:
            outputs = self._run(items, last_only)
        except Exception:
            for session_id in opened:
                self.close_session(session_id)
            raise
        end_step(self.pool, items)
        self.stats["positions"] += sum(item.num_positions for item in items)
        answers = self._answers(items, outputs, last_only)
        if self.device.type == "cuda":  # a call returns once its passes ran (a chunk that samples nothing would
            torch.cuda.current_stream(self.device).synchronize()  # not wait): the scheduler's steps never queue
        return answers  # up on the GPU, so a decode step waits behind one chunk at most, never a whole prompt

    forward = __call__

    def _run(self, items: list[SegmentInput], last_only: bool) -> list:
        """Every item's raw output: (T, C) rows or, with the head, (tokens, logprobs, logits or None)."""
        outputs: list = [None] * len(items)
        short = [i for i, item in enumerate(items) if item.num_positions <= self.decode_rows]
        long = [i for i, item in enumerate(items) if item.num_positions > self.decode_rows]
        rider = long[0] if short and long and self.mixed_passes else None  # its first chunk joins the short pass
        if short:
            chunk = [self._piece(items[rider], 0, last_only)] if rider is not None else []
            got = self._short(items, short, chunk)
            if chunk:
                outputs[rider], got = got[0], got[1:]
            for i, out in zip(short, got):
                outputs[i] = out
        for i in long:
            outputs[i] = self._chunked(items[i], last_only, first=outputs[i])
        return outputs

    def _short(self, items: list[SegmentInput], short: list[int], chunk: Layout) -> list:
        """One pass of the short items (each padded to T rows, B bucketed), behind ``chunk`` (a long step's
        chunk as a layout entry, or nothing): a mixed pass or a short pass. Its outputs, in layout order."""
        B = next(b for b in BATCH_BUCKETS if b >= len(short))
        T = max(items[i].num_positions for i in short)
        rows = self.prefill_chunk if chunk else 0
        processed = [r for i in short if _processed(items[i]) for r in items[i].sample]
        processing = needs(processed) if processed and self.has_head else None
        layout = chunk + [(items[i], rows + b * T, not items[i].sample and items[i].keep != 0)
                          for b, i in enumerate(short)]
        sampled = any(r.temperature > 0 for item, _, _ in layout if not _processed(item) for r in item.sample)
        self.stats["mixed_passes"] += bool(chunk)
        return self._replay(self._pass(rows, B, T, sampled, processing), layout)

    def _chunked(self, item: SegmentInput, last_only: bool, first=None):
        """A long step in ``prefill_chunk`` passes; the rows (no head) or the chunks' answers joined (head).
        ``first``: the answer of its first chunk, run already (in a mixed pass)."""
        chunk, parts = self.prefill_chunk, [] if first is None else [first]
        sampled = not _processed(item) and any(r.temperature > 0 for r in item.sample)
        for a in range(len(parts) * chunk, item.num_positions, chunk):
            parts.append(self._replay(self._pass(chunk, 0, 0, sampled), [self._piece(item, a, last_only)])[0])
        if not self.has_head:
            return torch.cat(parts)
        logits = [part[2] for part in parts if part[2] is not None]
        return (torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts]),
                torch.cat(logits) if logits else None)

    def _piece(self, item: SegmentInput, a: int, last_only: bool) -> tuple[SegmentInput, int, bool]:
        """Positions [a, a + prefill_chunk) of a long step as a pass's first rows: (part, row 0, keep its logits)."""
        b = min(a + self.prefill_chunk, item.num_positions)
        rows = {"input_ids": item.input_ids[a:b]} if self.has_embed else {"hidden": item.hidden[a:b]}
        last = b == item.num_positions
        part = SegmentInput(item.session_id, item.start_pos + a, sample=item.sample if last else (), **rows)
        return part, 0, not item.sample and item.keep != 0 and (last or not last_only)  # logits someone reads

    # ---- passes --------------------------------------------------------------------------------------

    def _pass(self, chunk: int, B: int, T: int, sampled: bool, processing: Needs | None = None) -> Pass:
        """The pass of this shape (``Pass``), made on first use."""
        key = (chunk, B, T, sampled, processing)
        p = self._passes.get(key)
        if p is None:
            p = self._passes[key] = Pass(self, *key)
        return p

    def _replay(self, p: Pass, layout: Layout) -> list:
        """Run the pass on ``layout`` ((item, its first row, keep its logits)); per item its rows, or (tokens,
        logprobs, logits or None)."""
        started = time.perf_counter()
        p.fill(layout, self.pool, self._rows, self.has_embed)
        self.stats["fill_ms"] += (time.perf_counter() - started) * 1e3
        if self.graphs and p.graph is None:
            self._capture(p)
        if p.graph is not None:
            p.graph.replay()
            self.stats["graph_replays"] += 1
        else:
            p.out = self._layers(p)
            self.stats["eager_passes"] += 1
        static = p.static is not None and self._sample_static(p, layout)  # (the host fills while the GPU runs)
        # the answers are copied out of the static buffers once per pass (the next replay rewrites them), and
        # each item gets views of the copies: a copy per item costs a launch each
        end = max(first + item.num_positions for item, first, _ in layout)
        if not self.has_head:
            rows_out = p.out[0][:end].clone()
            return [rows_out[first : first + item.num_positions] for item, first, _ in layout]
        tokens, logprobs, logits = p.out
        tokens, logprobs = tokens[:end].clone(), logprobs[:end].clone()
        drawn = p.sample_out.map(lambda t: t[: end - p.chunk].clone()) if static else None  # rows [chunk, end)
        out = []
        for item, first, keep in layout:
            rows = slice(first, first + item.num_positions)
            processed = _processed(item)
            if processed and static and first >= p.chunk:  # sampled by the second graph: its rows' answers
                asked = slice(rows.stop - p.chunk - len(item.sample), rows.stop - p.chunk)
                out.append(drawn.map(lambda t, asked=asked: t[asked]))
                continue
            kept = logits[rows].clone() if keep else None
            if processed:  # the logits of the rows it samples, for ``_answers``
                kept = logits[rows.stop - len(item.sample) : rows.stop].clone()
            out.append((tokens[rows], logprobs[rows], kept))
        return out

    def _sample_static(self, p: Pass, layout: Layout) -> bool:
        """Sample the processed rows of the pass just launched by its sampling graph (captured on first use);
        False where a row has more pairs than the buffers hold (then ``_answers`` samples them eagerly)."""
        rows: list = [None] * (p.N - p.chunk)  # the short steps' rows (a chunk's are sampled eagerly)
        for item, first, _ in layout:
            if _processed(item) and first >= p.chunk:
                at = first - p.chunk + item.num_positions - len(item.sample)
                rows[at : at + len(item.sample)] = item.sample
        try:
            p.static.fill(rows)
        except TooManyPairs:
            self.stats["eager_samplings"] += 1
            return False
        if self.graphs and p.sample_graph is None:
            self._capture(p, sampling=True)
        if p.sample_graph is not None:
            p.sample_graph.replay()
            self.stats["graph_replays"] += 1
        else:
            p.sample_out = self._sample(p)
        return True

    def _sample(self, p: Pass) -> Processed:
        return sample_static(p.out[2][p.chunk :], p.static, p.processing)  # (N - chunk, V)

    def _capture(self, p: Pass, sampling: bool = False) -> None:
        """Capture the pass's layers (or, ``sampling``, its processed rows' sampling) as a CUDA graph."""
        run = self._sample if sampling else self._layers
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # warm-up: compiles the kernels, sets up the libraries. A shard skips its collectives here (the values
            # are thrown away), so every call runs each collective once on every rank, whichever passes each has
            # captured already: a follower's pass keys differ from rank 0's (it samples nothing).
            self._warming = True
            try:
                run(p)
            finally:
                self._warming = False
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = run(p)
        if sampling:
            p.sample_graph, p.sample_out = graph, out
        else:
            p.graph, p.out = graph, out
        self.stats["captures"] += 1

    def _linear(self, p: Pass, x: torch.Tensor, w: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, fp8.Fp8Weight):  # weight-only FP8 in short passes, FP8 x FP8 in chunks
            return ops.skinny_linear(x, w.data, bias, scale=w.scale) if p.short else fp8.chunk_linear(x, w, bias)
        if p.short:
            return ops.skinny_linear(x, w, bias)
        return F.linear(x, w, bias)

    def _layers(self, p: Pass) -> tuple[torch.Tensor, ...]:
        """The pass: every layer over the static rows, then the head and sampling. Shapes depend on p only."""
        spec, w = self.spec, self.weights
        H, K, D, eps = self.heads, self.kv_heads, spec.head_dim, spec.rms_norm_eps
        x = F.embedding(p.inputs, w.embed) if self.has_embed else p.inputs  # (N, C)
        block_tables = self.page_table.index_select(0, p.rows)  # (B, max_pages)
        h = ops.rms_norm(x, w.layers[0].input_norm, eps) if w.layers else None
        for i, lw in enumerate(w.layers):
            qkv = self._linear(p, h, lw.qkv, lw.qkv_bias)  # (N, (H + 2K) D)
            kc, vc = self.pool.k[i], self.pool.v[i]  # (pages, page_size, K, D)
            q = ops.rotary_kv_write(qkv, self.cos, self.sin, p.positions, p.slots, kc, vc, H, K, D, spec.rotary_dim)
            a = ops.paged_attention(q, kc, vc, block_tables, p.ctx_lens, p.q_starts, p.q_lens, D**-0.5, p.T,
                                    block_m=ops.ATTN_CHUNK_BLOCK_M if p.chunk else ops.ATTN_BLOCK_M)
            o = self._reduce(self._linear(p, a.view(p.N, H * D), lw.o))  # (N, C)
            h, x = ops.add_rms_norm(o, x, lw.post_attention_norm, eps, post_weight=lw.post_self_attn_norm)
            d = self._reduce(self._linear(p, ops.silu_mul(self._linear(p, h, lw.gate_up)), lw.down))  # (N, C)
            nxt = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else (w.norm if self.has_head else None)
            if nxt is not None:
                h, x = ops.add_rms_norm(d, x, nxt, eps, post_weight=lw.post_mlp_norm)
            else:
                x = x + (ops.rms_norm(d, lw.post_mlp_norm, eps) if lw.post_mlp_norm is not None else d)
        if not self.has_head:
            return (x,)
        if not w.layers:
            h = ops.rms_norm(x, w.norm, eps)
        logits = self._linear(p, h, w.lm_head)  # (N, V); a shard's (N, V') slice
        if self.ranks is not None:
            logits = self._gather(logits)[:, : spec.vocab_size].contiguous()  # (N, W V') -> (N, V)
        tokens, logprobs = sample_rows(logits, p.sampling[0], p.sampling[1], p.sampling[2], p.sampled)
        return tokens, logprobs, logits

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A row-parallel product's partial sums (N, C), summed over the ranks (a shard); as it is otherwise."""
        return x if self.ranks is None or self._warming else self.ranks.all_reduce(x)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """A shard's logits (N, V'), every rank's joined: (N, W V') (a warm-up: the shape only)."""
        return x.repeat(1, self.ranks.world) if self._warming else self.ranks.all_gather(x)

    # ---- answers --------------------------------------------------------------------------------------

    def _answers(self, items: list[SegmentInput], outputs: list, last_only: bool) -> list:
        if not self.has_head:
            return outputs
        answers: list = [None] * len(items)
        def way(i: int) -> str:  # how an item's rows were (or are now) sampled
            if not _processed(items[i]):
                return "pass"
            return "static" if isinstance(outputs[i], Processed) else "eager"

        for kind in ("eager", "static", "pass"):  # rows sampled now from their logits, then those sampled already
            group = [i for i, item in enumerate(items) if item.sample and way(i) == kind]
            if not group:
                continue
            if kind == "eager":
                rows = [r for i in group for r in items[i].sample]
                tokens, logprobs, top = sample_batch(torch.cat([outputs[i][2] for i in group]), rows)  # host sync
            elif kind == "static":
                rows = [r for i in group for r in items[i].sample]
                tokens, logprobs, top = Processed.cat([outputs[i] for i in group]).on_host(rows)  # host sync
            else:
                tokens = torch.cat([outputs[i][0][-len(items[i].sample) :] for i in group]).tolist()  # host sync
                logprobs = torch.cat([outputs[i][1][-len(items[i].sample) :] for i in group]).tolist()
                top = [((), ())] * len(tokens)
            at = 0
            for i in group:
                k = len(items[i].sample)
                answers[i], at = Sampled(tokens[at : at + k], logprobs[at : at + k], top[at : at + k]), at + k
        for i, (item, out) in enumerate(zip(items, outputs)):
            if item.sample or out[2] is None:  # (keep=0: nobody reads this step's logits)
                continue
            logits = out[2]
            n = item.keep if item.keep is not None else (1 if last_only else logits.shape[0])
            answers[i] = logits[logits.shape[0] - n :].float()
        return answers

    def nbytes(self) -> int:
        return self.weights.nbytes()


def _processed(item: SegmentInput) -> bool:
    """Its rows need logit processing, so they are sampled after the pass (by its sampling graph, or eagerly by
    ``sample_batch``), not inside it."""
    return not item.plain_sampling


def pool_tokens_of(per_token: int, tokens: int | None, mib: float | None) -> int:
    return pool_tokens(per_token, tokens, None if tokens is not None else mib)
