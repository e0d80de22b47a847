"""``splitglm bench cpu``: every CPU tier and the whole model, per engine, precision and thread count,
against llama.cpp on the demo GGUF in the same run.

Tiers, at splits K1, K2 of an L-layer model:
- ``device``: embedding + [0, K1); ``edge``: embedding + [0, K2) (the edge's own HTTP sessions);
- ``edge-relay``: [K1, K2) on a batch of ``--relay-batch`` sessions' decode rows (one row each a step);
- ``fast-tail``: [K2, L) + norm + head; ``whole``: the whole model.

Engines: ``eager`` (PyTorch op by op), ``compiled`` (``runtime.cpu_decode``: the layers and one row's head
compiled), ``compiled-layers`` (the layers compiled, the head eager) and ``compiled-aten`` (compiled, int4
products through ATen's kernel, not ``runtime.compress.int4_rows``), the last two asked for by name, on the same
compressed segment; ``llama.cpp`` on the GGUF (whole model only; rows skipped with the install line when
llama-cpp-python is missing). Precisions (``runtime.compress.named.CPU_PRECISIONS``): the tier's layers in fp32,
weight-only int8 or int4 (group 32), and its LM head, where it has one, in fp32 or int8.

Per row: ``decode_ms`` (median of one-row steps after a ``--prompt``-token prompt; the relay: a step of its
batch), ``prefill_tok_s`` (one ``--prefill``-token prompt from an empty cache, median of 3),
``perplexity_delta_pct`` (the whole model with only this tier's part compressed, against fp32, on the
held-out ``--text``; llama.cpp's against splitglm's fp32), ``tuning_perplexity_delta_pct`` (the same on
``--tuning-text``, the text the precisions were chosen on) and ``vs_llama_cpp`` (``decode_ms`` over
llama.cpp's whole-model ``decode_ms`` at the same threads: below 1 is faster).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time

import torch

from partitioner.eval.assess import text_ids
from partitioner.eval.compression import window_scores
from partitioner.eval.quality import windows_of
from runtime.checkpoint import load_spec
from runtime.compress import apply_compression
from runtime.compress.named import CPU_PRECISIONS, tier_passes
from runtime.segment import Segment, SegmentInput

from . import llama_cpp
from .options import MODEL_HELP, add_command
from .stats import median, ratio

logger = logging.getLogger(__name__)

GPL3 = "/usr/share/common-licenses/GPL-3"
APACHE2 = "/usr/share/common-licenses/Apache-2.0"
TIERS = ("whole", "device", "edge", "edge-relay", "fast-tail")
ENGINES = ("eager", "compiled", "compiled-layers", "compiled-aten")


def tier_range(tier: str, splits: tuple[int, int], layers: int) -> tuple[int, int, bool, bool]:
    """(start, end, embedding, head) of a tier."""
    k1, k2 = splits
    return {"whole": (0, layers, True, True), "device": (0, k1, True, False), "edge": (0, k2, True, False),
            "edge-relay": (k1, k2, False, False), "fast-tail": (k2, layers, False, True)}[tier]


def build(model: str, tier: str, splits, precision: str, spec) -> Segment:
    """The tier's segment in ``precision`` (its head too, where it has one)."""
    start, end, embed, head = tier_range(tier, splits, spec.num_layers)
    segment = Segment.from_checkpoint(model, start, end, embed=embed, head=head)
    passes = tier_passes(precision, head)
    if passes:
        apply_compression(segment, passes)
    return segment


# ---- timing ---------------------------------------------------------------------------------------


def _rows(segment: Segment, n: int, seed: int) -> dict:
    """n rows for the segment's first layer: token ids, or hidden states."""
    gen = torch.Generator().manual_seed(seed)
    if segment.has_embed:
        return {"input_ids": torch.randint(0, segment.spec.vocab_size, (n,), generator=gen)}
    return {"hidden": torch.randn(n, segment.spec.hidden_size, generator=gen)}


def decode_ms(segment: Segment, prompt: int, steps: int, batch: int = 1, warm: int = 4) -> float:
    """Median ms of a step of ``batch`` sessions' one new row each, after a ``prompt``-row prompt each."""
    names = [f"decode-{i}" for i in range(batch)]
    segment([SegmentInput(name, 0, **_rows(segment, prompt, i)) for i, name in enumerate(names)], last_only=True)
    times = []
    for step in range(warm + steps):
        items = [SegmentInput(name, prompt + step, **_rows(segment, 1, 100 + step)) for name in names]
        began = time.perf_counter()
        segment(items, last_only=True)
        if step >= warm:
            times.append(1e3 * (time.perf_counter() - began))
    for name in names:
        segment.close_session(name)
    return median(times)


def prefill_tok_s(segment: Segment, tokens: int, repeats: int = 3) -> float:
    """Prompt rows a second: one ``tokens``-row prompt from an empty cache, median of ``repeats``."""
    times = []
    for i in range(repeats):
        began = time.perf_counter()
        segment([SegmentInput(f"prefill-{i}", 0, **_rows(segment, tokens, 7))], last_only=True)
        times.append(time.perf_counter() - began)
        segment.close_session(f"prefill-{i}")
    return tokens / median(times)


# ---- quality --------------------------------------------------------------------------------------


def perplexity(model: str, spec, part: tuple[int, int, bool], precision: str, ids: torch.Tensor,
               window: int) -> float:
    """The whole model's perplexity on ``ids`` with layers [a, b) (and the head if asked) in ``precision``."""
    a, b, head = part
    cuts = sorted({0, a, b, spec.num_layers})
    segments = []
    for lo, hi in zip(cuts, cuts[1:]):
        last = hi == spec.num_layers
        segment = Segment.from_checkpoint(model, lo, hi, embed=lo == 0, head=last)
        passes = tier_passes(precision, head and last) if (lo, hi) == (a, b) else []
        if passes:
            apply_compression(segment, passes)
        segments.append(segment)
    nll, _ = window_scores(segments, ids, window)
    return math.exp(float(nll.mean()))


class Quality:
    """Perplexity deltas per (layer range, head, precision) on the held-out and the tuning text, computed once."""

    def __init__(self, model: str, spec, texts: dict[str, str], tokens: int, window: int):
        self.model, self.spec, self.window = model, spec, window
        self.ids = {name: text_ids(model, path, tokens) for name, path in texts.items()}
        self._ppl: dict = {}

    def ppl(self, part, precision: str, text: str) -> float:
        key = (part, precision, text)
        if key not in self._ppl:
            self._ppl[key] = perplexity(self.model, self.spec, part, precision, self.ids[text], self.window)
        return self._ppl[key]

    def delta_pct(self, part, precision: str, text: str) -> float:
        base = self.ppl((0, 0, False), "fp32", text)
        return round(100 * (self.ppl(part, precision, text) / base - 1), 3)

    def windows(self, text: str) -> list[list[int]]:
        return [w.tolist() for w in windows_of(self.ids[text], self.window)]


# ---- the run ----------------------------------------------------------------------------------------


def splitglm_rows(args, spec, quality: Quality, threads: int) -> list[dict]:
    """Every tier x precision x engine at ``threads`` threads."""
    rows = []
    for precision in args.precisions:
        for tier in args.tiers:
            start, end, _, head = tier_range(tier, args.splits, spec.num_layers)
            batch = args.relay_batch if tier == "edge-relay" else 1
            segment = build(args.model, tier, args.splits, precision, spec)
            prefill = prefill_tok_s(segment, args.prefill)
            part = (start, end, head)
            common = {"tier": tier, "layers": [start, end], "precision": precision, "threads": threads,
                      "batch": batch, "prefill_tok_s": round(prefill, 1),
                      "perplexity_delta_pct": quality.delta_pct(part, precision, "held_out"),
                      "tuning_perplexity_delta_pct": quality.delta_pct(part, precision, "tuning")}
            for engine in args.engines:
                segment.compiled, compile_s = None, None
                if engine != "eager":
                    compiled = segment.compile_decode(max(16, batch), head=engine != "compiled-layers",
                                                      int4_rows=engine != "compiled-aten")
                    compile_s = round(compiled.compile_s, 1)
                ms = decode_ms(segment, args.prompt, args.decode, batch)
                rows.append({"engine": engine, **common, "decode_ms": round(ms, 3), "compile_s": compile_s})
                logger.info("%s", rows[-1])
            del segment
            gc.collect()
    return rows


def llama_rows(args, quality: Quality, threads: int, fp32_ppl: float) -> list[dict]:
    """llama.cpp's whole-model row at ``threads`` threads (none, with a warning, when it is not installed)."""
    try:
        llm = llama_cpp.load(args.gguf, threads, max(args.prompt + args.decode + 8, args.prefill))
    except llama_cpp.LlamaCppMissing as e:
        logger.warning("%s", e)
        args.llama_problem = e.hint
        return []
    prompt = quality.ids["held_out"][: args.prompt].tolist()
    row = {"engine": "llama.cpp", "tier": "whole", "layers": [0, quality.spec.num_layers],
           "precision": args.gguf_precision, "threads": threads, "batch": 1,
           "decode_ms": round(llama_cpp.decode_ms(llm, prompt, args.decode), 3),
           "prefill_tok_s": round(llama_cpp.prefill_tok_s(llm, quality.ids["held_out"][: args.prefill].tolist()), 1)}
    del llm
    judge = llama_cpp.load(args.gguf, threads, args.window, logits_all=True)
    row["perplexity_delta_pct"] = round(100 * (llama_cpp.perplexity(judge, quality.windows("held_out")) / fp32_ppl
                                               - 1), 3)
    row["tuning_perplexity_delta_pct"] = None
    return [row]


def llama_status(gguf: str, rows: list[dict], problem: str | None = None) -> str:
    """"ok", "not asked" (no GGUF given), or what kept llama.cpp out (how to install or rebuild it)."""
    if not gguf:
        return "not asked"
    if any(r["engine"] == "llama.cpp" for r in rows):
        return "ok"
    return problem or llama_cpp.INSTALL


def bench_cpu(args) -> dict:
    spec = load_spec(args.model)
    quality = Quality(args.model, spec, {"held_out": args.text, "tuning": args.tuning_text}, args.tokens,
                      args.window)
    fp32_ppl = quality.ppl((0, 0, False), "fp32", "held_out")
    rows, default_threads = [], torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            llama = llama_rows(args, quality, threads, fp32_ppl) if args.gguf else []
            ours = splitglm_rows(args, spec, quality, threads)
            llama_ms = llama[0]["decode_ms"] if llama else None
            for row in llama + ours:
                row["vs_llama_cpp"] = ratio(row["decode_ms"], llama_ms) if llama_ms else None
            rows += llama + ours
    finally:
        torch.set_num_threads(default_threads)
    return {"model": args.model, "gguf": args.gguf, "splits": list(args.splits), "held_out_text": args.text,
            "tuning_text": args.tuning_text, "tokens": args.tokens, "fp32_perplexity": round(fp32_ppl, 4),
            "prompt": args.prompt, "decode_steps": args.decode, "prefill": args.prefill,
            "llama_cpp": llama_status(args.gguf, rows, getattr(args, "llama_problem", None)),
            "rows": rows}


def format_report(result: dict) -> list[str]:
    lines = [f"model {result['model']}, splits {result['splits']}; perplexity on {result['held_out_text']} "
             f"(held out) and {result['tuning_text']} (tuning), {result['tokens']} tokens each; decode: median "
             f"step after a {result['prompt']}-token prompt; prefill: {result['prefill']} tokens",
             f"{'engine':<10} {'tier':<11} {'prec':<5} {'thr':>3} {'decode ms':>10} {'prefill tok/s':>14} "
             f"{'dppl % held-out':>16} {'(tuning)':>9} {'vs llama.cpp':>13}"]
    for r in result["rows"]:
        tuning = r["tuning_perplexity_delta_pct"]
        lines.append(f"{r['engine']:<10} {r['tier']:<11} {r['precision']:<5} {r['threads']:>3} "
                     f"{r['decode_ms']:>10.2f} {r['prefill_tok_s']:>14.0f} {r['perplexity_delta_pct']:>+16.2f} "
                     f"{'-' if tuning is None else format(tuning, '+.2f'):>9} "
                     f"{'-' if r['vs_llama_cpp'] is None else format(r['vs_llama_cpp'], '.2f'):>13}")
    if result["llama_cpp"] != "ok":
        lines.append(f"no llama.cpp rows: {result['llama_cpp']}")
    return lines


def _list(kind, allowed=None):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed or kind.__name__}")
        return items
    return parse


def add_parser(sub) -> None:
    p = add_command(sub, "cpu", run, "CPU tiers and the whole model per engine, precision and threads, against "
                    "llama.cpp on the demo GGUF")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--gguf", help="GGUF for the llama.cpp rows (default: the demo GGUF); '' for none")
    p.add_argument("--gguf-precision", default="Q4_1", help="what to call the GGUF's precision (default Q4_1)")
    p.add_argument("--splits", type=_list(int), default=[10, 20], help="K1,K2 (default 10,20)")
    p.add_argument("--tiers", type=_list(str, TIERS), default=list(TIERS), help=f"of {','.join(TIERS)} (all)")
    p.add_argument("--engines", type=_list(str, ENGINES), default=["eager", "compiled"],
                   help=f"of {','.join(ENGINES)} (default eager,compiled)")
    p.add_argument("--precisions", type=_list(str, tuple(CPU_PRECISIONS)), default=list(CPU_PRECISIONS),
                   help=f"of {','.join(CPU_PRECISIONS)} (all)")
    p.add_argument("--threads", type=_list(int), default=[1, 2], help="torch / llama.cpp threads (default 1,2)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the decode steps (default 32)")
    p.add_argument("--decode", type=int, default=48, help="decode steps timed (default 48)")
    p.add_argument("--prefill", type=int, default=256, help="prompt tokens of the prefill timing (default 256)")
    p.add_argument("--relay-batch", type=int, default=8, help="sessions in an edge-relay step (default 8)")
    p.add_argument("--text", default=APACHE2, help="held-out text of the perplexity (default: Apache-2.0)")
    p.add_argument("--tuning-text", default=GPL3, help="the text the precisions were chosen on (default: GPL-3)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of each text judged (default 1024)")
    p.add_argument("--window", type=int, default=512, help="perplexity window, tokens (default 512)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def run(args: argparse.Namespace) -> int:
    from partitioner.convert import demo_model, find_demo_gguf

    args.model = args.model or str(demo_model())
    if args.gguf is None:
        args.gguf = str(find_demo_gguf())
    result = bench_cpu(args)
    if args.json:  # the rows, each naming its texts
        texts = {"held_out_text": result["held_out_text"], "tuning_text": result["tuning_text"]}
        print(json.dumps([{**row, **texts} for row in result["rows"]], indent=2))
    else:
        print("\n".join(format_report(result)))
    return 0
