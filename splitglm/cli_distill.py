"""``splitglm distill``: its options and its command (kept apart from ``cli.py``, which is long enough)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """\
Train a student of layers [A, B) of a model against the same layers at full precision (the teacher),
and write it as a tier folder that `splitglm partition --student DIR` and `splitglm eval --plan` use.

Students (--student):
  layer_drop  keep M of the teacher's B - A layers (--depth M; default half, every other one; or
              --keep i,j,...; or --keep auto: drop greedily the layer whose absence changes the logits
              least on training windows), each initialised from the teacher layer it keeps: the
              structured speed-up of a CPU edge. The fast tail's student: --layers K2,L.
  prune       the teacher with --mlp-fraction of its MLP channels and/or --head-fraction of its query
              heads removed (compress.prune_mlp / prune_heads), recovered by distillation.
  low_rank    the teacher with mlp.down_proj factorised at --rank-fraction (compress.low_rank).
  sparse      the teacher with its MLP inputs below per-layer thresholds zeroed (compress.sparse_mlp, TEAL)
              at --sparsity S (both inputs) or GU:DOWN, trained with the inputs zeroed (sparsity-aware
              fine-tuning); the thresholds are recalibrated on the student's own inputs at every
              checkpoint and travel in the tier as its sparse_mlp pass. Not with --qat.
Any student can add quantisation-aware training: --qat int8|int4 fake-quantises the layers' weights
(straight-through estimator) and --qat-head int8|int4 the LM head's; the tier then loads them as real
int8 / int4 kernels.

Loss: --kl-weight x T^2 x KL of the logits at --temperature T + --hidden-weight x MSE of rms-normalised
hidden states at aligned depths (a dropped student's layer j against the teacher layer before the next
kept one) + --ce-weight x cross-entropy on the text. A student without the head is scored through the
frozen rest of the model.

Writes OUT/model.safetensors, config.json, manifest.json (the structure and passes), history.json,
loss.png and OUT/train/state.pt (every --save-every steps; --resume continues, also past an earlier
--steps). --eval-text (never a training text) judges the exported tier at the end.
"""


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes A,B, got {text!r}") from None
    return a, b


def _ints(text: str) -> list[int] | str:
    if text == "auto":
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _sparsity(text: str) -> float | list[float]:
    try:
        shares = [float(part) for part in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity takes S or GU:DOWN, shares in [0, 1), got {text!r}") from None
    if len(shares) > 2 or not all(0 <= s < 1 for s in shares):
        raise argparse.ArgumentTypeError(f"--sparsity takes S or GU:DOWN, shares in [0, 1), got {text!r}")
    return shares[0] if len(shares) == 1 else shares


def add_parser(sub) -> None:
    from partitioner.distill.qat import QAT_BITS
    from partitioner.distill.students import KINDS

    p = sub.add_parser("distill", help="distil a student segment (layer-dropped, pruned, low-rank, sparse, QAT) "
                       "against its teacher", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GLM checkpoint folder (default: the demo model)")
    p.add_argument("--layers", type=_pair, required=True, help="A,B: the teacher's layers [A, B) "
                   "(B = L: with the head)")
    p.add_argument("--student", choices=KINDS, default="layer_drop", help="the student (default layer_drop)")
    p.add_argument("--depth", type=int, help="layer_drop: layers kept, spread evenly (default half)")
    p.add_argument("--keep", type=_ints, help="layer_drop: the teacher layers kept, e.g. 20,22,24,26,28, or auto: drop "
                   "greedily the layer whose absence changes the logits least on the training text")
    p.add_argument("--mlp-fraction", type=float, default=0.0, help="prune: MLP channels removed (e.g. 0.25)")
    p.add_argument("--head-fraction", type=float, default=0.0, help="prune: query heads removed per kv group")
    p.add_argument("--rank-fraction", type=float, default=0.5, help="low_rank: rank kept (default 0.5)")
    p.add_argument("--sparsity", type=_sparsity, help="sparse: share of the MLP inputs zeroed, S or GU:DOWN "
                   "(e.g. 0.4 or 0.2:0.5)")
    p.add_argument("--qat", choices=QAT_BITS, help="fake-quantise the layers' weights while training")
    p.add_argument("--qat-head", choices=QAT_BITS, help="fake-quantise the LM head's weights too")
    p.add_argument("--text", action="append", required=True, help="training text file (repeatable)")
    p.add_argument("--eval-text", action="append", default=[], help="text to judge the result on (repeatable; "
                   "never a training text)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each --eval-text (default 4096)")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps (default 400)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4; warm-up, cosine)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (default 20)")
    p.add_argument("--temperature", type=float, default=2.0, help="KL temperature (default 2)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--train-head", action="store_true", help="train the LM head too (default: layers + norm)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--out", required=True, help="folder of the distilled tier")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train/state.pt")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from partitioner.convert import demo_model
    from partitioner.distill.judge import judge
    from partitioner.distill.train import DistillConfig, distill

    model = args.model or str(demo_model())
    trained = {Path(t).resolve() for t in args.text}
    same = [t for t in args.eval_text if Path(t).resolve() in trained]
    if same:
        raise ValueError(f"--eval-text {same[0]} is also a training text: judge on text the student never saw")
    cfg = DistillConfig(
        layers=args.layers, kind=args.student, keep=args.keep, depth=args.depth, mlp_fraction=args.mlp_fraction,
        sparsity=args.sparsity, head_fraction=args.head_fraction, rank_fraction=args.rank_fraction, qat=args.qat,
        qat_head=args.qat_head,
        steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        temperature=args.temperature, kl_weight=args.kl_weight, hidden_weight=args.hidden_weight,
        ce_weight=args.ce_weight, train_head=args.train_head, seed=args.seed, save_every=args.save_every,
        device=args.device, texts=list(args.text),
    )
    record = distill(model, cfg, args.out, resume=args.resume, progress=not args.quiet)
    judged = [judge(model, args.out, text, args.eval_tokens) for text in args.eval_text]
    if judged:
        (Path(args.out) / "judged.json").write_text(json.dumps(judged, indent=2))
    summary = {"out": args.out, "compression": record["compression"]["name"], "training": record["training"],
               "judged": judged}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    final = record["training"]["final_loss"] or {}
    print(f"distilled {record['compression']['name']} of layers {list(args.layers)} into {args.out} "
          f"({record['training']['seconds']} s, final loss {final.get('loss')})")
    for row in judged:
        print(f"  on {row['text']}: perplexity {row['perplexity']:.4f} (teacher {row['baseline_perplexity']:.4f}), "
              f"delta {row['perplexity_delta_pct']:+.3f} %, agreement {row['token_agreement']:.4f}")
    return 0
