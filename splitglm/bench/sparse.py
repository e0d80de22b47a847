"""``splitglm bench sparse``: what TEAL-style MLP activation sparsity (``sparse_mlp``) costs and buys on CPU.

The thresholds are calibrated on one text and the model is judged on another (never the same file).
Per sparsity, with every layer's MLP sparse: the perplexity change and greedy agreement against the
dense model on the judged text, the share of MLP inputs actually zeroed there, and CPU decode times at
1 thread, dense against sparse, interleaved, best of the repeats: one MLP (a real decode row of the
judged text through each layer's MLP in turn), one decode step of the whole model, and one of a
10-layer segment without embedding or head (where the MLP is a larger share of the time).

A sparsity is one share for both inputs (``0.5``) or ``gate_up:down`` (``0:0.6``: only down's input).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from partitioner.eval.compression import compare, window_scores
from runtime.checkpoint import load_spec, load_tokenizer
from runtime.compress import apply_compression, calibrate_sparse_mlp
from runtime.compress.sparse import mean_shares, sparsity_tally
from runtime.segment import Segment, SegmentInput

from .options import MODEL_HELP, add_command
from .stats import ratio

GPL3 = "/usr/share/common-licenses/GPL-3"
APACHE2 = "/usr/share/common-licenses/Apache-2.0"


def parse_sparsities(text: str) -> list[float | list[float]]:
    """``"0.4,0:0.6"`` -> [0.4, [0.0, 0.6]]."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        out.append([float(p) for p in item.split(":")] if ":" in item else float(item))
    return out


def text_ids(model: str, path: str, tokens: int | None) -> torch.Tensor:
    """The first ``tokens`` token ids of a text file (all of them for None): (T,)."""
    ids = load_tokenizer(model)(Path(path).read_text())["input_ids"]
    return torch.tensor(ids[:tokens] if tokens else ids, dtype=torch.long)


def _step(segment: Segment, session: str, rows: torch.Tensor, start: int) -> torch.Tensor:
    ids = rows.dtype == torch.long
    item = SegmentInput(session, start, input_ids=rows) if ids else SegmentInput(session, start, hidden=rows)
    return segment([item], last_only=segment.has_head)[0]


def mlp_inputs(whole: Segment, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input rows of each layer's MLP over ``ids``: {layer: (T, C)}."""
    seen, handles = {}, []
    for i, block in whole.layers.items():
        handles.append(block.mlp.register_forward_pre_hook(lambda _m, a, i=int(i): seen.__setitem__(i, a[0].clone())))
    session = uuid.uuid4().hex
    try:
        _step(whole, session, ids, 0)
    finally:
        whole.close_session(session)
        for h in handles:
            h.remove()
    return seen


def time_mlps(models: dict[str, Segment], inputs: dict[int, torch.Tensor], repeats: int) -> dict[str, float]:
    """ms per MLP call of one decode row, each row through every layer's MLP in turn, best of ``repeats``."""
    best = dict.fromkeys(models, float("inf"))
    calls = sum(x.shape[0] for x in inputs.values())
    with torch.inference_mode():
        for _ in tqdm(range(repeats), desc="MLP timing", leave=False):
            for name, model in models.items():  # interleaved
                mlps = [(model.layers[str(i)].mlp, x) for i, x in inputs.items()]
                started = time.perf_counter()
                for mlp, x in mlps:
                    for row in x.split(1):
                        mlp(row)
                best[name] = min(best[name], (time.perf_counter() - started) * 1e3 / calls)
    return best


def time_steps(models: dict[str, Segment], rows: torch.Tensor, prefix: int, repeats: int) -> dict[str, float]:
    """ms per decode step after a ``prefix``-position prompt, over the rest of ``rows``, best of ``repeats``."""
    best = dict.fromkeys(models, float("inf"))
    for _ in tqdm(range(repeats), desc="step timing", leave=False):
        for name, model in models.items():  # interleaved
            session = uuid.uuid4().hex
            try:
                _step(model, session, rows[:prefix], 0)
                started = time.perf_counter()
                for p in range(prefix, rows.shape[0]):
                    _step(model, session, rows[p : p + 1], p)
                best[name] = min(best[name], (time.perf_counter() - started) * 1e3 / (rows.shape[0] - prefix))
            finally:
                model.close_session(session)
    return best


def _middle_rows(whole: Segment, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states entering layer ``start`` over ``ids``: (T, C)."""
    with torch.inference_mode():
        hidden = whole.embed_tokens(ids)
    session = uuid.uuid4().hex
    try:
        return _step(whole.view(0, start), session, hidden, 0) if start else hidden
    finally:
        whole.close_session(session)


def _timings(dense: Segment, sparse: Segment, ids: torch.Tensor, repeats: int) -> dict:
    """MLP, whole-step and 10-layer-step decode times of both models (ms) and the speed-ups."""
    L, prefix, steps = dense.end, 32, 16
    rows = ids[: prefix + steps]
    inputs = mlp_inputs(dense, ids[prefix : prefix + 4])  # {layer: (4, C)}
    mlp = time_mlps({"dense": dense, "sparse": sparse}, inputs, repeats)
    hot = time_mlps({"dense": dense, "sparse": sparse}, {L // 2: inputs[L // 2].repeat(8, 1)}, repeats)
    step = time_steps({"dense": dense, "sparse": sparse}, rows, prefix, repeats)
    a = (L - min(10, L)) // 2
    b = a + min(10, L)
    middle = time_steps({"dense": dense.view(a, b), "sparse": sparse.view(a, b)},
                        _middle_rows(dense, rows, a), prefix, repeats)
    out = {}
    for what, ms in (("mlp", mlp), ("mlp_hot", hot), ("step", step), (f"layers_{a}_{b}_step", middle)):
        out[what] = {"dense_ms": round(ms["dense"], 4), "sparse_ms": round(ms["sparse"], 4),
                     "speedup": ratio(ms["dense"], ms["sparse"], 3)}
    return out


def _reached(shares: dict[int, dict[str, float]]) -> dict:
    """Mean share zeroed per input, and of the MLP's weight reads (gate_up holds 2/3 of the weights)."""
    mean = mean_shares(shares)
    return {"gate_up": round(mean["gate_up"], 4), "down": round(mean["down"], 4),
            "weights_skipped": round((2 * mean["gate_up"] + mean["down"]) / 3, 4)}


def bench_sparse(
    model: str,
    calibration_text: str = GPL3,
    text: str = APACHE2,
    sparsities=(0.3, 0.4, 0.5),
    tokens: int | None = None,
    allocation: str = "uniform",
    repeats: int = 5,
    window: int = 512,
    progress: bool = True,
) -> dict:
    """Calibrate on one text, judge on another; accuracy and CPU decode times per sparsity."""
    if Path(calibration_text).resolve() == Path(text).resolve():
        raise ValueError(f"the judged text must not be the calibration text ({text})")
    torch.set_num_threads(1)
    dense = Segment.from_checkpoint(model, 0, load_spec(model).num_layers, embed=True, head=True)
    calibration, judged = text_ids(model, calibration_text, tokens), text_ids(model, text, tokens)
    rows = sweep(dense, calibration, judged, sparsities, allocation, repeats, window, progress)
    return {"model": model, "calibration_text": calibration_text, "text": text, "threads": 1,
            "allocation": allocation, "calibration_tokens": int(calibration.numel()),
            "judged_tokens": int(judged.numel()), "rows": rows}


def sweep(dense: Segment, calibration: torch.Tensor, judged: torch.Tensor, sparsities, allocation: str = "uniform",
          repeats: int = 5, window: int = 512, progress: bool = False) -> list[dict]:
    """One row per sparsity for a whole-model segment, calibration and judged token ids (T,)."""
    baseline = window_scores(dense, judged, window, progress=progress)
    rows = []
    for sparsity in tqdm(list(sparsities), desc="sparsities", disable=not progress):
        spec = calibrate_sparse_mlp(dense, calibration, sparsity, allocation=allocation)
        sparse = copy.deepcopy(dense)
        apply_compression(sparse, [spec])
        with sparsity_tally(sparse) as shares:
            accuracy = compare(dense, sparse, judged, window, baseline)
        rows.append({"sparsity": sparsity, **accuracy, "reached": _reached(shares),
                     **_timings(dense, sparse, judged, repeats)})
    return rows


def format_report(result: dict) -> list[str]:
    lines = [f"model {result['model']}, {result['threads']} thread", f"calibrated on {result['calibration_text']} "
             f"({result['calibration_tokens']} tokens), judged on {result['text']} ({result['judged_tokens']} tokens), "
             f"{result['allocation']} thresholds; MLP ms: one decode row through each layer's MLP in turn "
             f"(hot: one layer's MLP again and again, its weights in cache)",
             f"{'sparsity':>9} {'reached gu/down/w':>18} {'dppl %':>7} {'agree':>6} {'MLP ms d/s':>12} "
             f"{'MLP x':>6} {'hot x':>6} {'step ms d/s':>12} {'step x':>6} {'10L ms d/s':>11} {'10L x':>6}"]
    for r in result["rows"]:
        s = r["sparsity"]
        name = f"{s[0]:g}:{s[1]:g}" if isinstance(s, list) else f"{s:g}"
        got = r["reached"]
        middle = next(v for k, v in r.items() if k.startswith("layers_"))
        lines.append(
            f"{name:>9} {got['gate_up']:>6.3f}/{got['down']:.3f}/{got['weights_skipped']:.3f} "
            f"{r['perplexity_delta_pct']:>+7.2f} {r['token_agreement']:>6.3f} "
            f"{r['mlp']['dense_ms']:>5.3f}/{r['mlp']['sparse_ms']:<6.3f} {r['mlp']['speedup']:>5.2f}x "
            f"{r['mlp_hot']['speedup']:>5.2f}x "
            f"{r['step']['dense_ms']:>5.1f}/{r['step']['sparse_ms']:<6.1f} {r['step']['speedup']:>5.2f}x "
            f"{middle['dense_ms']:>5.2f}/{middle['sparse_ms']:<5.2f} {middle['speedup']:>5.2f}x"
        )
    return lines


def add_parser(sub) -> None:
    p = add_command(sub, "sparse", run, "TEAL-style MLP activation sparsity (sparse_mlp): perplexity cost and "
                    "CPU decode speed-up, dense vs sparse")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--calibration-text", help="text the thresholds are calibrated on (default: the GPL-3)")
    p.add_argument("--text", help="text the model is judged on, never the calibration text (default: Apache-2.0)")
    p.add_argument("--sparsities", default="0.3,0.4,0.5", help="comma-separated shares zeroed, each one share or "
                   "GATE_UP:DOWN (default 0.3,0.4,0.5)")
    p.add_argument("--allocation", choices=["uniform", "equal_error"], default="uniform",
                   help="per-layer thresholds: the same share zeroed, or the same share of energy (default uniform)")
    p.add_argument("--tokens", type=int, help="at most this many tokens of each text (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats, best kept (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from partitioner.convert import demo_model

    result = bench_sparse(args.model or str(demo_model()), args.calibration_text or GPL3, args.text or APACHE2,
                          parse_sparsities(args.sparsities), args.tokens, args.allocation, args.repeats,
                          progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else "\n".join(format_report(result)))
    return 0
