"""The reference ``bench cloud-gpu`` compares the engine with: a decode step of the same shape written in plain
PyTorch, each layer compiled by ``torch.compile`` (Inductor) and the whole step captured as one CUDA graph.

It is what one gets from the framework's own tools, gpt-fast style: the same weights as the engine (bf16; an FP8
engine's are widened for it), GLM-4's layers (fused qkv with bias, interleaved partial rotary, sandwich norms),
cuBLAS products, and ``scaled_dot_product_attention`` over a static KV cache of ``context`` positions per
session; with the engine's head, the final norm, the LM head and a greedy token per session, as the engine's
step samples one. Every session of a batch decodes at the same position. On CPU (the tests) the step runs without the
graph, and ``compiled=False`` runs it eagerly: the test holds it to the PyTorch segment.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from runtime.layers import apply_rotary, rms_norm, rotary_cos_sin

from .stats import median


def _attention_in(h, qkv_w, qkv_b, cos, sin, H: int, K: int, D: int):
    """qkv product and rotary: (B, C) -> q (B, H, 1, D), k and v (B, K, 1, D)."""
    B = h.shape[0]
    qkv = F.linear(h, qkv_w, qkv_b)
    q, k, v = qkv.split((H * D, K * D, K * D), dim=-1)
    q = apply_rotary(q.view(B, H, D), cos, sin)
    k = apply_rotary(k.view(B, K, D), cos, sin)
    return q.unsqueeze(2), k.unsqueeze(2), v.view(B, K, 1, D)


def _attention_out(q, kc, vc, mask, x, o_w, post_attn, post_self_attn, gate_up_w, down_w, post_mlp, next_norm,
                   eps: float):
    """Attention over the cache, o, the MLP and the norms around them: -> (next layer's normed input, x)."""
    B = x.shape[0]
    a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)  # (B, H, 1, D)
    o = F.linear(a.reshape(B, -1), o_w)
    if post_self_attn is not None:
        o = rms_norm(o, post_self_attn, eps)
    x = x + o
    gate, up = F.linear(rms_norm(x, post_attn, eps), gate_up_w).chunk(2, dim=-1)
    d = F.linear(F.silu(gate) * up, down_w)
    if post_mlp is not None:
        d = rms_norm(d, post_mlp, eps)
    x = x + d
    return rms_norm(x, next_norm, eps), x


def _head(x, norm, lm_head, eps: float):
    """The final norm, the LM head and the greedy token: -> (logits (B, V), tokens (B,))."""
    logits = F.linear(rms_norm(x, norm, eps), lm_head)
    return logits, logits.argmax(-1)


class ReferenceStep:
    """``batch`` sessions' decode step through every layer of ``weights`` (``runtime.cuda_weights.Weights``)."""

    def __init__(self, spec, weights, batch: int, context: int = 512, device="cuda", graph: bool = True,
                 compiled: bool = True):
        self.spec, self.batch, self.context, self.device = spec, batch, context, torch.device(device)
        self.layers = [_plain(lw) for lw in weights.layers]
        self.norm, self.lm_head = weights.norm, weights.lm_head  # the head, where the engine has one
        self.logits = self.tokens = None
        dtype = self.layers[0]["qkv"].dtype
        K, D = spec.num_kv_heads, spec.head_dim
        self.k = [torch.zeros(batch, K, context, D, dtype=dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.x = torch.randn(batch, spec.hidden_size, dtype=dtype, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        compile_ = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if compiled else (lambda fn: fn)
        self._in, self._out, self._head = compile_(_attention_in), compile_(_attention_out), compile_(_head)
        self.graph = None
        if graph and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles and autotunes outside the capture
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()

    def _step(self) -> torch.Tensor:
        spec, eps = self.spec, self.spec.rms_norm_eps
        H, K, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        cos, sin = rotary_cos_sin(self.pos, spec.rotary_dim, spec.rope_theta)  # (1, 1, R/2)
        mask = (torch.arange(self.context, device=self.device) <= self.pos)[None, None, None, :]  # (1, 1, 1, P)
        x = self.x
        h = rms_norm(x, self.layers[0]["input_norm"], eps)
        for i, lw in enumerate(self.layers):
            q, k, v = self._in(h, lw["qkv"], lw["qkv_bias"], cos, sin, H, K, D)
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            nxt = self.layers[i + 1]["input_norm"] if i + 1 < len(self.layers) else lw["input_norm"]
            h, x = self._out(q, self.k[i], self.v[i], mask, x, lw["o"], lw["post_attention_norm"],
                             lw["post_self_attn_norm"], lw["gate_up"], lw["down"], lw["post_mlp_norm"], nxt, eps)
        if self.lm_head is not None:
            self.logits, self.tokens = self._head(x, self.norm, self.lm_head, eps)
        return x

    def __call__(self) -> torch.Tensor:
        """One step (the graph's replay on a GPU); the position moves on by one, wrapping at ``context``."""
        out = self._step() if self.graph is None else (self.graph.replay() or self.out)
        self.pos.add_(1).remainder_(self.context)
        return out


def _plain(lw) -> dict:
    """A layer's tensors, FP8 products widened to the norms' dtype."""
    from runtime import fp8

    dtype = lw.input_norm.dtype

    def plain(w):
        return w.dequantize(dtype) if isinstance(w, fp8.Fp8Weight) else w

    return {"qkv": plain(lw.qkv), "qkv_bias": lw.qkv_bias, "o": plain(lw.o), "gate_up": plain(lw.gate_up),
            "down": plain(lw.down), "input_norm": lw.input_norm, "post_attention_norm": lw.post_attention_norm,
            "post_self_attn_norm": lw.post_self_attn_norm, "post_mlp_norm": lw.post_mlp_norm}


def reference_rate(spec, weights, batch: int, steps: int = 64, repeats: int = 3) -> dict:
    """Tokens/s of the compiled + graphed reference step at ``batch`` (median of ``repeats`` runs of ``steps``),
    and the seconds its compilation and capture took."""
    started = time.perf_counter()
    ref = ReferenceStep(spec, weights, batch)
    built = time.perf_counter() - started
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            ref()
        torch.cuda.synchronize()
        rates.append(batch * steps / (time.perf_counter() - t0))
    del ref
    torch.cuda.empty_cache()
    return {"tokens_per_s": median(rates), "build_s": built}
