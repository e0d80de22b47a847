# ruff: noqa: T201
"""Step-frame codec headroom: what static per-channel tables and sensitivity-weighted steps could save.

An analysis, not a codec: hidden states at splits 10 and 20 of the demo model, the non-outlier values
quantised as ``gr+outliers`` does (4 outliers, step = mult x sqrt(12 x 0.0065) x RMS), both links at once.
Calibration (per-channel means, spreads, symbol histograms and Fisher sensitivities E[(dNLL/dh)^2]) on
TRAIN; judged on GPL-3 and argparse.py (never in TRAIN), 2048 tokens each in windows of 256. Bits per
value: ``rice_tok`` (today's per-token Rice parameter), ``rice_chan`` (a static Rice parameter per
channel), ``H_pooled`` / ``H_chan`` (cross-entropy under a static histogram, pooled / per channel: what
an arithmetic coder with that table would reach). ``step_B_el_*``: a 576-value step frame, 51 B of frame
header and 22 B of scale, parameter and outliers counted.

    .venv/bin/python examples/analysis/codec_headroom.py TRAIN OUT.json   # about 8 minutes, 1 thread
"""

import json
import math
import sys
import time

import numpy as np
import torch

from partitioner.convert import demo_model
from partitioner.distill.dense import dense_forward
from partitioner.eval.assess import text_ids
from protos import quant
from runtime.local import split_segments

torch.set_num_threads(1)

M = str(demo_model())
TRAIN, OUT = sys.argv[1], sys.argv[2]
dev, edge, cloud = split_segments(M, 10, 20)
K = 4  # outliers per token
W = 256


def windows(ids):
    return [ids[i : i + W] for i in range(0, len(ids) - W + 1, W)]


def calib_ids():
    a = text_ids(M, TRAIN, 200000)
    return torch.cat([a[:2048], a[60000:62048]])


def hidden_and_fisher(ids):
    H10, H20, G10, G20 = [], [], [], []
    for w in windows(ids):
        with torch.no_grad():
            h10, _ = dense_forward(dev, w[None])
        h10 = h10.detach().requires_grad_(True)
        h20, _ = dense_forward(edge, h10)
        h20.retain_grad()
        logits, _ = dense_forward(cloud, h20)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum")
        nll.backward()
        H10.append(h10.detach()[0])
        H20.append(h20.detach()[0])
        G10.append(h10.grad[0])
        G20.append(h20.grad[0])
    return [torch.cat(H10), torch.cat(H20)], [torch.cat(G10), torch.cat(G20)]


def split_out(x):
    idx, _ = quant.top_outliers(x, K)
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)
    y = x.clone().scatter_(1, idx, 0.0)
    rms = quant.row_rms(y)
    return y, keep, rms, idx


def stats(h, g):
    y, keep, rms, _ = split_out(h)
    z = y / rms[:, None]
    cnt = keep.float().sum(0).clamp_min(1)
    mu = (z * keep).sum(0) / cnt
    sd = (((z - mu) ** 2) * keep).sum(0).div(cnt).sqrt().clamp_min(1e-3)
    F = ((g * rms[:, None]) ** 2 * keep).sum(0) / cnt  # sensitivity per channel, normalised units
    return mu, sd, F.clamp_min(F[F > 0].min() if (F > 0).any() else 1e-12)


def rice_bits(m, r):
    return float(((m >> r) + 1 + r).sum() + (m > 0).sum())


def best_r_rows(m):
    best = None
    for r in range(0, 12):
        b = ((m >> r) + 1 + r).sum(1)
        best = b if best is None else np.minimum(best, b)
    return float(best.sum() + (m > 0).sum())


def entropy_bits(q_eval, keep_eval, q_cal=None, keep_cal=None, per_channel=False):
    """Cross-entropy (bits) of eval symbols under a histogram from calibration (Laplace-smoothed)."""
    if not per_channel:
        vals = q_cal[keep_cal]
        lo, hi = int(min(vals.min(), q_eval[keep_eval].min())), int(max(vals.max(), q_eval[keep_eval].max()))
        hist = np.bincount((vals - lo).astype(np.int64), minlength=hi - lo + 1) + 0.5
        p = hist / hist.sum()
        return float(-np.log2(p[(q_eval[keep_eval] - lo).astype(np.int64)]).sum())
    total = 0.0
    for c in range(q_eval.shape[1]):
        ve, vc = q_eval[keep_eval[:, c], c], q_cal[keep_cal[:, c], c]
        if ve.size == 0:
            continue
        lo = int(min(ve.min(), vc.min() if vc.size else 0))
        hi = int(max(ve.max(), vc.max() if vc.size else 0))
        hist = np.bincount((vc - lo).astype(np.int64), minlength=hi - lo + 1) + 0.5
        p = hist / hist.sum()
        total += float(-np.log2(p[(ve - lo).astype(np.int64)]).sum())
    return total


def quantise(h, step_rel, mu=None, w=None):
    """Returns reconstructed h, symbols (T, C) int, keep mask."""
    y, keep, rms, idx = split_out(h)
    z = y / rms[:, None]
    steps = torch.full((h.shape[1],), step_rel) if w is None else step_rel * w
    off = mu if mu is not None else torch.zeros(h.shape[1])
    q = torch.round((z - off) / steps) * keep
    zr = (q * steps + off) * keep
    out = zr * rms[:, None]
    out = out.scatter(1, idx, h.gather(1, idx).half().float())
    return out, q.numpy().astype(np.int64), keep.numpy()


def ppl(ids, f10, f20):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows(ids):
            h10, _ = dense_forward(dev, w[None])
            h10 = f10(h10[0])[None]
            h20, _ = dense_forward(edge, h10)
            h20 = f20(h20[0])[None]
            lg, _ = dense_forward(cloud, h20)
            nll += float(torch.nn.functional.cross_entropy(lg[0, :-1], w[1:], reduction="sum"))
            n += W - 1
    return math.exp(nll / n)


t0 = time.time()
cal = calib_ids()
Hc, Gc = hidden_and_fisher(cal)
ST = [stats(h, g) for h, g in zip(Hc, Gc)]
print(f"calibrated in {time.time() - t0:.0f} s", flush=True)
for link, (mu, sd, F) in enumerate(ST):
    print(
        f"link {link}: |mu| mean {mu.abs().mean():.3f} max {mu.abs().max():.2f}; sd min/median/max "
        f"{sd.min():.3f}/{sd.median():.3f}/{sd.max():.2f}; F max/median {float(F.max() / F.median()):.1f}, "
        f"AM/GM {float(F.mean() / F.log().mean().exp()):.2f}",
        flush=True,
    )

results = []
base_step = math.sqrt(12 * 0.0065)
for text in ["/usr/share/common-licenses/GPL-3", "/usr/lib/python3.11/argparse.py"]:
    ids = text_ids(M, text, 2048)
    with torch.no_grad():
        p0 = ppl(ids, lambda h: h, lambda h: h)
        He = []
        for w in windows(ids):
            h10, _ = dense_forward(dev, w[None])
            h20, _ = dense_forward(edge, h10)
            He.append((h10[0], h20[0]))
        He = [torch.cat([a for a, _ in He]), torch.cat([b for _, b in He])]
    variants = []
    for mult in [1.0, 1.15, 1.3]:
        variants.append(("uniform", mult, False, 0.0))
        variants.append(("mean", mult, True, 0.0))
    for alpha in [0.25, 0.5]:
        for mult in [1.0, 1.3, 1.6, 2.0]:
            variants.append((f"fisher{alpha}", mult, True, alpha))
    for name, mult, use_mu, alpha in variants:
        fs, bits = [], {}
        for link in range(2):
            mu, _, F = ST[link]
            w = None
            if alpha:
                w = (F.log().mean().exp() / F) ** alpha  # step_c ~ F_c^-alpha, geometric mean 1
            step = base_step * mult
            _, qe, ke = quantise(He[link], step, mu if use_mu else None, w)
            _, qc, kc = quantise(Hc[link], step, mu if use_mu else None, w)
            n = ke.sum()
            m = np.abs(qe) * ke
            # Rice: per-token parameter (today) / per-channel static offset on top
            bits["rice_tok"] = bits.get("rice_tok", 0) + best_r_rows(m) - (~ke).sum()
            # per-channel static parameter from calibration magnitudes
            mc = np.abs(qc) * kc
            rc = np.zeros(qe.shape[1], dtype=np.int64)
            for c in range(qe.shape[1]):
                col = mc[kc[:, c], c]
                if col.size:
                    rc[c] = min(range(12), key=lambda r: ((col >> r) + 1 + r).sum())
            bits["rice_chan"] = bits.get("rice_chan", 0) + rice_bits(m[ke], np.broadcast_to(rc, m.shape)[ke])
            bits["H_pooled"] = bits.get("H_pooled", 0) + entropy_bits(qe, ke, qc, kc)
            bits["H_chan"] = bits.get("H_chan", 0) + entropy_bits(qe, ke, qc, kc, per_channel=True)
            bits["n"] = bits.get("n", 0) + n
            fs.append((step, mu if use_mu else None, w))

        def f10(h, a=fs[0]):
            return quantise(h, *a)[0]

        def f20(h, a=fs[1]):
            return quantise(h, *a)[0]

        p = ppl(ids, f10, f20)
        row = {
            "text": text.split("/")[-1],
            "variant": name,
            "mult": mult,
            "dppl_pct": round(100 * (p / p0 - 1), 3),
            **{k: round(v / bits["n"], 3) for k, v in bits.items() if k != "n"},
        }
        # bytes per step frame of 576 values: header 51 + scales/rice/outliers ~22 + values (rice_chan bits)
        row["step_B_el_rice_chan"] = round((51 + 22 + row["rice_chan"] * 572 / 8) / 576, 3)
        row["step_B_el_H_chan"] = round((51 + 22 + row["H_chan"] * 572 / 8) / 576, 3)
        results.append(row)
        print(json.dumps(row), flush=True)
json.dump(results, open(OUT, "w"), indent=1)
