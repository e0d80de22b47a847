"""The cloud tier on a GPU: decode speed against the memory-bandwidth bound, and what else a server meets.

    splitglm bench cloud-gpu [--json] [--dtype bf16|fp8] [--shape glm4-9b | --model DIR] [--repeats 3]
                             [--tensor-parallel N]  (N > 1: ``cloud_gpu_tp``, not yet run on GPUs)

Measured in one run, on the CUDA engine (``runtime.cuda``, bf16 activations, bf16 or FP8 weights, CUDA graphs):
- the card's device-to-device copy bandwidth (bytes read + written), a cold-L2 read of one layer's weights
  (the floor the anchors measure against), the segment's weight bytes, and the batch-1 bound: copy bandwidth /
  weight bytes tokens per second (against the weights' own bytes: FP8's are about half);
- decode tokens/s at batch 1, 8 and 32 (128-token prompts, 128 decode steps, every session's step one
  graph replay), and the fraction of the bound at batch 1; batch 32 again with mixed lengths (prompts of
  64 to 2048 tokens, so every session attends over a different context);
- time to first token of a 4096-token prompt alone, and its fraction of the card's dense peak (bf16, or FP8
  for FP8 weights: the chunk passes multiply FP8 by FP8);
- the time of a 5-position step (speculative verification) over a 1-position step;
- transformers' ``generate`` on the same card, shape and batch sizes (eager, its own KV cache), as a ratio;
- a ``torch.compile`` + CUDA-graph decode step of the same shape and weights (``gpu_reference``) at batch 1
  and 32, as a ratio (``--no-reference`` skips it);
- the p99 decode step of 31 sessions while a 4096-token prompt arrives (in chunks, through the runtime's
  scheduler), over the p99 without it.

``--shape`` builds random bf16 weights on the GPU (speed does not depend on their values);
``--model DIR`` loads a checkpoint's layers + head instead. Every figure is a median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .gpu_timing import copy_gbps, decode_rate, gpu_seconds, random_rows
from .options import add_command, print_result
from .stats import median, percentile, ratio

GLM4_9B = {  # GLM-4-9B-0414's config.json, as far as the shape goes
    "model_type": "glm4", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "attention_bias": True,
    "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338], "max_position_embeddings": 32768,
}  # fmt: skip
GLM4_32B = {**GLM4_9B, "hidden_size": 6144, "intermediate_size": 23040, "num_hidden_layers": 61,
            "num_attention_heads": 48, "attention_bias": False}  # GLM-4-32B-0414's shape (for --tensor-parallel)
SHAPES = {"glm4-9b": GLM4_9B, "glm4-32b": GLM4_32B}


# Dense tensor-core peaks, TFLOPS (NVIDIA's data sheets, without sparsity): (bf16, fp8) by a name's part.
PEAK_TFLOPS = (("H200", (989.4, 1978.9)), ("H100 NVL", (835.0, 1670.0)), ("H100 PCIe", (756.0, 1513.0)),
               ("H100", (989.4, 1978.9)), ("H800", (989.4, 1978.9)), ("L40S", (362.0, 733.0)),
               ("A100", (312.0, None)))


def peak_tflops(card: str, fp8_weights: bool) -> float | None:
    for part, peaks in PEAK_TFLOPS:
        if part in card:
            return peaks[1 if fp8_weights else 0]
    return None


def build_engine(args, spec):
    from runtime.cuda import CudaEngine
    from runtime.cuda_weights import random_weights

    fp8 = args.dtype == "fp8"
    common = {"dtype": torch.bfloat16, "fp8_linears": fp8, "pool_mib": args.pool_mib,
              "prefill_chunk": args.prefill_chunk, "max_batch": 32, "max_positions": 8192}
    if args.model:
        from runtime.segment import Segment

        segment = Segment.from_checkpoint(args.model, 0, spec.num_layers, head=True, dtype=torch.bfloat16)
        return CudaEngine(segment, **common)
    weights = random_weights(spec, spec.num_layers, embed=False, head=True, dtype=torch.bfloat16, device="cuda",
                             fp8_linears=fp8)
    return CudaEngine(weights=weights, spec=spec, start=0, head=True, **common)


def cold_l2_read_gbps(engine, repeats: int = 10) -> float:
    """GB/s of one read of as many bytes as one layer's weights (every product's), in one kernel, after the
    L2 is flushed; median. (One buffer, one launch: four short launches would time the host, not the memory.)"""
    from runtime import triton_ops as ops
    from runtime.fp8 import Fp8Weight

    lw = engine.weights.layers[0]
    tensors = [w.data if isinstance(w, Fp8Weight) else w for w in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors) // 16 * 16
    layer = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    return nbytes / gpu_seconds(lambda: ops.read_words(layer), repeats, before=flush.zero_) / 1e9


def mixed_lengths(batch: int = 32, shortest: int = 64, longest: int = 2048, seed: int = 0) -> list[int]:
    """``batch`` prompt lengths spread over [shortest, longest], so sessions decode at different positions."""
    return torch.randint(shortest, longest + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft_ms(engine, prompt: int = 4096) -> float:
    """Milliseconds from a ``prompt``-token prompt's call to its first sampled token, one session alone."""
    from runtime.sampling import SamplingParams
    from runtime.segment import SegmentInput

    C = engine.spec.hidden_size
    rows = random_rows(prompt, C)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine([SegmentInput("ttft", 0, hidden=rows, sample=tuple(SamplingParams().rows(prompt)))])
    took = (time.perf_counter() - t0) * 1e3
    engine.close_session("ttft")
    return took


def prefill_flops(engine, prompt: int) -> float:
    """Useful FLOPs of a ``prompt``-token prefill: the layers' products, causal attention, one head row."""
    spec, lw = engine.spec, engine.weights.layers
    linear = sum(w.shape[0] * w.shape[1] for layer in lw for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    attention = len(lw) * 2 * 2 * spec.num_heads * spec.head_dim * prompt * (prompt + 1) / 2
    head = 2 * spec.vocab_size * spec.hidden_size if engine.has_head else 0
    return 2 * linear * prompt + attention + head


def verify_ratio(engine, prompt: int = 128, repeats: int = 50) -> tuple[float, float, float]:
    """(5-position step ms / 1-position step ms, and both medians), one session, rewound after each step."""
    from runtime.sampling import SamplingParams
    from runtime.segment import SegmentInput

    C, greedy = engine.spec.hidden_size, SamplingParams()
    engine([SegmentInput("verify", 0, hidden=random_rows(prompt, C), sample=tuple(greedy.rows(prompt)))])
    medians = []
    for n in (1, 5):
        rows, times = random_rows(n, C), []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            engine([SegmentInput("verify", prompt, hidden=rows, sample=tuple(greedy.rows(prompt + 1, n)))])
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        medians.append(median(times))
    engine.close_session("verify")
    return medians[1] / medians[0], medians[0], medians[1]


def prompt_interference(engine, sessions: int = 31, prompt: int = 4096, steps: int = 48) -> dict:
    """p99 of the running sessions' lockstep decode steps without and while a ``prompt``-token prompt arrives
    (with the engine's ``mixed_passes`` as set: the steps that hold decode rows and a chunk, counted)."""
    from runtime.sampling import SamplingParams
    from runtime.scheduler import Scheduler
    from runtime.segment import SegmentInput

    C, greedy = engine.spec.hidden_size, SamplingParams()
    scheduler = Scheduler(engine, max_batch=32, name="bench").start()
    sids = [f"run-{i}" for i in range(sessions)]
    scheduler([SegmentInput(s, 0, hidden=random_rows(128, C), sample=tuple(greedy.rows(128))) for s in sids])
    scheduler([SegmentInput("warm", 0, hidden=random_rows(300, C), sample=tuple(greedy.rows(300)))])  # chunk graphs
    scheduler.close_session("warm")
    pos = {s: 128 for s in sids}

    def round_ms() -> float:
        t0 = time.perf_counter()
        steps = [SegmentInput(s, pos[s], hidden=random_rows(1, C), sample=tuple(greedy.rows(pos[s] + 1))) for s in sids]
        futures = scheduler.submit_all(steps)  # one step takes them all
        for f in futures:
            f.result()
        for s in sids:
            pos[s] += 1
        return (time.perf_counter() - t0) * 1e3

    warm = scheduler.submit(SegmentInput("warm", 0, hidden=random_rows(300, C), sample=tuple(greedy.rows(300))))
    while not warm.done():  # the graphs of the decode rows beside a chunk (mixed passes)
        round_ms()
    scheduler.close_session("warm")
    calm = [round_ms() for _ in range(steps)]
    mixed = engine.stats["mixed_passes"]
    arriving = scheduler.submit(SegmentInput("long", 0, hidden=random_rows(prompt, C),
                                             sample=tuple(greedy.rows(prompt))))
    busy = []
    while not arriving.done():
        busy.append(round_ms())
    scheduler.stop()
    for s in [*sids, "long"]:
        engine.close_session(s)
    p99_calm, p99_busy = percentile(calm, 0.99), percentile(busy, 0.99)
    return {"p99_step_ms_calm": round(p99_calm, 3), "p99_step_ms_prompt": round(p99_busy, 3),
            "p50_step_ms_calm": round(percentile(calm, 0.5), 3),
            "p50_step_ms_prompt": round(percentile(busy, 0.5), 3),
            "prompt_p99_ratio": ratio(p99_busy, p99_calm, 3), "prompt_steps": len(busy),
            "prompt_mixed_passes": engine.stats["mixed_passes"] - mixed}


def kernel_breakdown(engine, batch: int = 1, prompt: int = 128, steps: int = 5) -> dict:
    """Where a decode step's GPU time goes: per kernel family, microseconds per step (eager passes under
    the profiler: the kernels are those of the graphs; the gaps between them are the graph's own)."""
    from torch.profiler import ProfilerActivity, profile

    from runtime.sampling import SamplingParams
    from runtime.segment import SegmentInput

    C, greedy, graphs = engine.spec.hidden_size, SamplingParams(), engine.graphs
    sids = [f"prof-{i}" for i in range(batch)]
    for sid in sids:
        engine([SegmentInput(sid, 0, hidden=random_rows(prompt, C), sample=tuple(greedy.rows(prompt)))])
    engine.graphs = False
    try:
        def step(s: int) -> None:
            engine([SegmentInput(sid, prompt + s, hidden=random_rows(1, C), sample=tuple(greedy.rows(prompt + s + 1)))
                    for sid in sids])

        step(0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for s in range(1, steps + 1):
                step(s)
    finally:
        engine.graphs = graphs
        for sid in sids:
            engine.close_session(sid)
    families: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        name = event.key
        family = next((f for f in ("skinny_linear", "paged_attention", "rotary_kv_write", "add_rms_norm", "rms_norm",
                                   "silu_mul", "sort", "softmax", "index", "Memcpy") if f.lower() in name.lower()),
                      "other")  # fmt: skip
        families[family] = families.get(family, 0.0) + us / steps
    total = sum(families.values())
    return {"batch": batch, "kernel_us_per_step": {k: round(v, 1) for k, v in sorted(families.items())},
            "kernels_ms_per_step": round(total / 1e3, 3)}


def hf_rates(config: dict, batches: tuple[int, ...], prompt: int, short: int = 16, long: int = 48) -> dict[int, float]:
    """transformers ``generate`` decode tokens/s per batch size: (tokens of ``long`` - ``short`` new) / time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    rates = {}
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device="cuda")
        took = {}
        for n in (short, long):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                took[n] = time.perf_counter() - t0
        rates[b] = b * (long - short) / (took[long] - took[short])
    del model
    torch.cuda.empty_cache()
    return rates


def add_parser(sub) -> None:
    p = add_command(sub, "cloud-gpu", run, "the cloud tier on a GPU: tokens/s against the bandwidth bound, vs generate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--shape", choices=sorted(SHAPES), default="glm4-9b", help="random weights of this shape")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                   help="the layers' weights: bf16, or fp8 (E4M3, per-channel scales; runtime.fp8)")
    p.add_argument("--model", help="a GLM checkpoint folder instead (its layers + head)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; medians are reported (default 3)")
    p.add_argument("--pool-mib", type=float, default=8192, help="KV pool size, MiB (default 8192)")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt positions per step (default 128)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the torch.compile + CUDA-graph reference step (splitglm.bench.gpu_reference)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="GPUs the segment is split across (default 1; "
                   "above 1: tokens/s, the N-card bound and the all-reduce time only; not yet run on GPUs)")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        sys.stderr.write("splitglm bench cloud-gpu: CUDA is not available on this machine (it needs an NVIDIA GPU)\n")
        return 2
    from runtime.checkpoint import GlmSpec, load_spec

    config = SHAPES[args.shape] if not args.model else None
    spec = load_spec(args.model) if args.model else GlmSpec.from_config(config)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the cloud service does: the host's part of a step is many small tensors
    if args.dtype == "fp8":
        from runtime.fp8 import support_error

        problem = support_error()
        if problem:
            sys.stderr.write(f"splitglm bench cloud-gpu: {problem}\n")
            return 2
    if args.tensor_parallel != 1:
        return run_tensor_parallel(args, spec)
    bandwidth = copy_gbps()
    engine = build_engine(args, spec)
    weight_gb = engine.nbytes() / 1e9
    bound = bandwidth / weight_gb
    card = torch.cuda.get_device_name()
    out = {"card": card, "torch": torch.__version__, "shape": args.model or args.shape,
           "random_weights": not args.model, "dtype": args.dtype, "copy_gbps": round(bandwidth, 1),
           "cold_l2_read_gbps": round(cold_l2_read_gbps(engine), 1),
           "weight_gb": round(weight_gb, 3), "bound_tok_s": round(bound, 1), "prompt_tokens": 128, "decode_steps": 128,
           "repeats": args.repeats}  # fmt: skip
    for b in (1, 8, 32):
        decode_rate(engine, [128] * b, 8)  # captures the graphs of this batch size
        fill, steps = engine.stats["fill_ms"], engine.stats["graph_replays"] + engine.stats["eager_passes"]
        runs = [decode_rate(engine, [128] * b, 128) for _ in range(args.repeats)]
        passes = engine.stats["graph_replays"] + engine.stats["eager_passes"] - steps
        out[f"tokens_per_s_b{b}"] = round(median(r[0] for r in runs), 1)
        out[f"step_ms_b{b}"] = round(median(r[1] for r in runs), 3)
        out[f"fill_ms_per_pass_b{b}"] = round((engine.stats["fill_ms"] - fill) / max(passes, 1), 3)
    out["bound_fraction_b1"] = round(out["tokens_per_s_b1"] / bound, 3)
    out["cold_l2_bound_fraction_b1"] = round(out["tokens_per_s_b1"] * weight_gb / out["cold_l2_read_gbps"], 3)
    decode_rate(engine, mixed_lengths(), 4)  # the chunk and batch-32 graphs exist; this warms the long contexts
    out["tokens_per_s_b32_mixed_lengths"] = round(median(decode_rate(engine, mixed_lengths(seed=r), 128)[0]
                                                         for r in range(args.repeats)), 1)
    ttft_ms(engine, 4096)
    ttft = median(ttft_ms(engine, 4096) for _ in range(args.repeats))
    peak = peak_tflops(card, args.dtype == "fp8")
    out.update(ttft_4096_ms=round(ttft, 1), prefill_peak_tflops=peak,
               prefill_peak_fraction=round(prefill_flops(engine, 4096) / (ttft / 1e3) / (peak * 1e12), 3)
               if peak else None)
    verify, one, five = verify_ratio(engine)
    out.update(verify5_over_step=round(verify, 3), step1_ms=round(one, 3), step5_ms=round(five, 3))
    out.update(prompt_interference(engine))  # as the cloud serves by default: separate passes
    out["p99_ratio_long_prompt"] = out["prompt_p99_ratio"]
    engine.mixed_passes = True  # then with mixed passes (``splitglm cloud --mixed-passes true``), same card
    mixed = prompt_interference(engine)
    engine.mixed_passes = False
    out["p99_ratio_long_prompt_mixed"] = mixed["prompt_p99_ratio"]
    out["prompt_mixed"] = mixed
    if not args.no_reference:  # torch.compile + one CUDA graph per step, the engine's weights, same card
        from .gpu_reference import reference_rate

        for b in (1, 32):
            ref = reference_rate(spec, engine.weights, b)
            out[f"compiled_reference_tokens_per_s_b{b}"] = round(ref["tokens_per_s"], 1)
            out[f"compiled_reference_ratio_b{b}"] = ratio(out[f"tokens_per_s_b{b}"], ref["tokens_per_s"], 2)
            out[f"compiled_reference_build_s_b{b}"] = round(ref["build_s"], 1)
    out["breakdown_b1"] = kernel_breakdown(engine, 1)
    out["breakdown_b32"] = kernel_breakdown(engine, 32)
    out["graphs"] = dict(engine.stats)
    if not args.no_hf:
        hf_config = config or json.loads((__import__("pathlib").Path(args.model) / "config.json").read_text())
        del engine
        torch.cuda.empty_cache()
        hf = hf_rates(hf_config, (1, 8, 32), 128)
        for b, rate in hf.items():
            out[f"hf_tokens_per_s_b{b}"] = round(rate, 1)
            out[f"hf_generate_ratio_b{b}"] = ratio(out[f"tokens_per_s_b{b}"], rate, 2)
    print_result(out, args.json)
    return 0



def run_tensor_parallel(args: argparse.Namespace, spec) -> int:
    """``--tensor-parallel N`` (``cloud_gpu_tp``; bf16 only)."""
    from .cloud_gpu_tp import problem, run_parallel

    why = problem(spec, args.tensor_parallel) if args.tensor_parallel > 1 else "--tensor-parallel must be >= 1"
    if why is None and args.dtype != "bf16":
        why = "--tensor-parallel runs bf16 weights only"
    if why:
        sys.stderr.write(f"splitglm bench cloud-gpu: {why}\n")
        return 2
    print_result(run_parallel(args, spec), args.json)
    return 0
