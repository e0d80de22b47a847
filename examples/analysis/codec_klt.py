# ruff: noqa: T201
"""Step-frame codec: does a calibrated decorrelating rotation (KLT / PCA) lower the bits per value?

An analysis, not a codec. Hidden states at splits 10 and 20 of the demo model, 4 outliers per token sent
apart as ``gr+outliers`` does, the rest divided by the token's RMS. Calibrated on 8 windows of 1024 tokens
of TRAIN: per link the mean and the eigenvectors of the covariance. Judged on GPL-3 and argparse.py (never
in TRAIN), 2048 tokens each in windows of 256, both links at once: bits per value under a static
per-channel (or per-component) histogram from the calibration (an ideal arithmetic coder), and the
perplexity change, for the plain per-channel quantiser and for the rotated one at 1x to 2x the step.

    .venv/bin/python examples/analysis/codec_klt.py TRAIN OUT.json   # about 10 minutes, 2 threads
"""

import json
import math
import sys

import numpy as np
import torch

from partitioner.convert import demo_model
from partitioner.distill.dense import dense_forward
from partitioner.eval.assess import text_ids
from protos import quant
from runtime.local import split_segments

torch.set_num_threads(2)
M = str(demo_model())
TRAIN, OUT = sys.argv[1], sys.argv[2]
dev, edge, cloud = split_segments(M, 10, 20)
K, W = 4, 256  # outliers per token, window
BASE_STEP = math.sqrt(12 * 0.0065)  # gr+outliers' step in RMS units


def windows(ids):
    return [ids[i : i + W] for i in range(0, len(ids) - W + 1, W)]


def hidden(ids):
    """Hidden states at both links over ``ids``: [(N, C), (N, C)]."""
    a, b = [], []
    with torch.no_grad():
        for w in windows(ids):
            h10, _ = dense_forward(dev, w[None])
            h20, _ = dense_forward(edge, h10)
            a.append(h10[0])
            b.append(h20[0])
    return [torch.cat(a), torch.cat(b)]


def normalised(x):
    """The non-outlier values over the token's RMS (outliers zeroed), the RMS, the outliers' positions."""
    idx, _ = quant.top_outliers(x, K)
    y = x.clone().scatter_(1, idx, 0.0)
    rms = quant.row_rms(y)
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)
    return (y / rms[:, None]).double(), keep, rms, idx


def code(h, step, rotation=None):
    """Reconstructed hidden states and the integer symbols (N, C), plain or rotated."""
    z, keep, rms, idx = normalised(h)
    if rotation is None:
        q = torch.round(z / step) * keep
        zr = q * step
    else:
        mu, V = rotation
        q = torch.round((z - mu) @ V / step)
        zr = (q * step) @ V.T + mu
    out = (zr.float() * rms[:, None]).scatter(1, idx, h.gather(1, idx).half().float())
    return out, q.long().numpy()


def static_bits(q_eval, q_cal):
    """Bits per value of q_eval under per-column histograms of q_cal (Laplace-smoothed)."""
    total = 0.0
    for c in range(q_eval.shape[1]):
        e, k = q_eval[:, c], q_cal[:, c]
        lo, hi = int(min(e.min(), k.min())), int(max(e.max(), k.max()))
        p = np.bincount(k - lo, minlength=hi - lo + 1) + 0.5
        total += float(-np.log2((p / p.sum())[e - lo]).sum())
    return total / q_eval.size


def perplexity(ids, f10, f20):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows(ids):
            h10, _ = dense_forward(dev, w[None])
            h20, _ = dense_forward(edge, f10(h10[0])[None])
            logits, _ = dense_forward(cloud, f20(h20[0])[None])
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
            n += W - 1
    return math.exp(nll / n)


train = text_ids(M, TRAIN, 400000)
calibration = hidden(torch.cat([train[i : i + 1024] for i in range(0, train.numel() - 1024, train.numel() // 8)][:8]))
rotations = []
for h in calibration:
    z = normalised(h)[0]
    mu = z.mean(0)
    _, V = torch.linalg.eigh(torch.cov((z - mu).T))
    rotations.append((mu, V))

results = []
for text in ["/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py"]:
    ids = text_ids(M, text, 2048)
    judged = hidden(ids)
    p0 = perplexity(ids, lambda h: h, lambda h: h)
    for rotated, mult in [(False, 1.0), (True, 1.0), (True, 1.3), (True, 1.6), (True, 2.0)]:
        step = BASE_STEP * mult
        rot = rotations if rotated else [None, None]
        bits = [static_bits(code(judged[i], step, rot[i])[1], code(calibration[i], step, rot[i])[1]) for i in (0, 1)]
        p = perplexity(ids, lambda h, s=step, r=rot[0]: code(h, s, r)[0], lambda h, s=step, r=rot[1]: code(h, s, r)[0])
        row = {"text": text.split("/")[-1], "rotated": rotated, "mult": mult,
               "dppl_pct": round(100 * (p / p0 - 1), 3), "bits_per_value": [round(b, 3) for b in bits]}
        print(json.dumps(row), flush=True)
        results.append(row)
json.dump(results, open(OUT, "w"), indent=1)
