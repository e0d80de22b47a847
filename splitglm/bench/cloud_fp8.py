"""What FP8 weights cost in quality, on the GPU, against the same engine in bf16 (and fp32 PyTorch).

    splitglm bench cloud-fp8 [--model DIR] [--text FILE] [--tokens 4096] [--json]

The whole model (the demo model unless ``--model``) runs on the CUDA engine three ways: in fp32 (the
reference; the engine in fp32 equals the PyTorch segment), with bf16 weights, and with FP8 weights
(``runtime.fp8``: E4M3, one absmax scale per output channel, nothing calibrated, so no text is tuned on).
On ``--text`` (held out: it was used for nothing else), each reports:

- **prefill perplexity**: windows of ``--window`` tokens teacher-forced through the chunk passes (for FP8:
  FP8 activations x FP8 weights on the tensor cores);
- **decode perplexity** and **greedy agreement**: ``--decode-tokens`` tokens teacher-forced in short passes of
  up to 16 rows (the decode and verification path: FP8 weights, bf16 activations), and the share of positions
  whose greedy token equals bf16's;
- the logits' error against bf16: mean absolute difference over the logits' standard deviation, and the
  largest absolute difference.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .options import MODEL_HELP, add_command, print_result

GPL3 = "/usr/share/common-licenses/GPL-3"


def _engine(model: str, dtype: torch.dtype, fp8: bool = False):
    from runtime.checkpoint import load_spec
    from runtime.cuda import CudaEngine
    from runtime.segment import Segment

    layers = load_spec(model).num_layers
    segment = Segment.from_checkpoint(model, 0, layers, embed=True, head=True)
    return CudaEngine(segment, dtype=dtype, fp8_linears=fp8, pool_tokens=1 << 15, prefill_chunk=128,
                      max_positions=4096)


def _logits(run, ids: torch.Tensor, window: int, rows: int, name: str) -> torch.Tensor:
    """(len(ids), V) fp32 logits of ``ids`` teacher-forced in windows, ``rows`` positions per call."""
    from runtime.segment import SegmentInput

    out = []
    for w, a in enumerate(range(0, len(ids), window)):
        chunk, sid = ids[a : a + window], f"{name}-{w}"
        for b in range(0, len(chunk), rows):
            got = run([SegmentInput(sid, b, input_ids=chunk[b : b + rows])])[0]
            out.append(got.float().cpu())
        run.close_session(sid)
    return torch.cat(out)


def perplexity(logits: torch.Tensor, ids: torch.Tensor, window: int) -> float:
    """exp(mean NLL) of each window's next tokens (a window's last position predicts nothing)."""
    nll, count = 0.0, 0
    for a in range(0, len(ids), window):
        lg, target = logits[a : a + window][:-1], ids[a : a + window][1:]
        nll += torch.nn.functional.cross_entropy(lg, target, reduction="sum").item()
        count += len(target)
    return math.exp(nll / count)


def compare(model: str, text: str, tokens: int = 4096, window: int = 1024, decode_tokens: int = 1024) -> dict:
    from runtime.checkpoint import load_tokenizer

    ids = load_tokenizer(model)(text, return_tensors="pt").input_ids[0]
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}")
    prefill_ids, decode_ids = ids[:tokens], ids[tokens : tokens + decode_tokens]
    if len(decode_ids) < decode_tokens:
        decode_ids = ids[:decode_tokens]
    runs = {"fp32": _engine(model, torch.float32), "bf16": _engine(model, torch.bfloat16),
            "fp8": _engine(model, torch.bfloat16, fp8=True)}
    out: dict = {"model": model, "tokens": tokens, "window": window, "decode_tokens": len(decode_ids),
                 "card": torch.cuda.get_device_name(), "weights_gb": {}}
    logits = {}
    for name, run in runs.items():
        with torch.inference_mode():
            logits[name] = (_logits(run, prefill_ids, window, window, f"{name}-p"),
                            _logits(run, decode_ids, len(decode_ids), 16, f"{name}-d"))
        out[f"prefill_perplexity_{name}"] = round(perplexity(logits[name][0], prefill_ids, window), 4)
        out[f"decode_perplexity_{name}"] = round(perplexity(logits[name][1], decode_ids, len(decode_ids)), 4)
        out["weights_gb"][name] = round(run.nbytes() / 1e9, 4)
    for name in ("fp8", "fp32"):
        for path, i in (("prefill", 0), ("decode", 1)):
            mine, base = logits[name][i], logits["bf16"][i]
            agree = (mine.argmax(-1) == base.argmax(-1)).float().mean().item()
            out[f"{path}_agreement_{name}_vs_bf16"] = round(agree, 4)
            diff = (mine - base).abs()
            out[f"{path}_logits_mae_over_std_{name}"] = round((diff.mean() / base.std()).item(), 4)
            out[f"{path}_logits_max_abs_{name}"] = round(diff.max().item(), 3)
    for path in ("prefill", "decode"):
        base = out[f"{path}_perplexity_bf16"]
        out[f"{path}_perplexity_delta_pct_fp8"] = round(100 * (out[f"{path}_perplexity_fp8"] / base - 1), 3)
    return out


def add_parser(sub) -> None:
    p = add_command(sub, "cloud-fp8", run, "FP8 weights against bf16 on the GPU: perplexity, agreement, logits")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--text", default=GPL3, help=f"held-out text to measure on (default {GPL3})")
    p.add_argument("--tokens", type=int, default=4096, help="tokens for the prefill perplexity (default 4096)")
    p.add_argument("--window", type=int, default=1024, help="tokens per prefill window (default 1024)")
    p.add_argument("--decode-tokens", type=int, default=1024, help="tokens teacher-forced in short passes")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from runtime.fp8 import support_error

    problem = support_error() if torch.cuda.is_available() else "CUDA is not available on this machine"
    if problem:
        sys.stderr.write(f"splitglm bench cloud-fp8: {problem}\n")
        return 2
    from partitioner.convert import demo_model

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    result = compare(args.model or str(demo_model()), text, args.tokens, args.window, args.decode_tokens)
    print_result({"text": args.text, **result}, args.json)
    return 0
