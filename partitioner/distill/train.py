"""Distil a student against its teacher: the multi-granularity loss, the loop, checkpoints and export.

Loss over windows of B x T tokens of the training text (``DistillConfig``):
  kl_weight     * T^2 * KL(teacher || student) of the logits at temperature T
+ hidden_weight * mean over aligned depths of MSE(rms-normalised student, rms-normalised teacher states)
+ ce_weight     * cross-entropy of the student on the text's next tokens.
The teacher is the model's own layers [a, b) at full precision. A student without the head is scored
through the frozen layers [b, L) + head; one that does not start at 0 is fed the frozen front [0, a).

``OUT/train/state.pt`` is written every ``save_every`` steps (``resume`` continues from it: the student,
the optimiser, the step and the loss history, also to train past an earlier ``steps``); the end writes
the tier (``export_student``: weights, config, manifest), ``OUT/loss.png`` and ``OUT/history.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from partitioner.distill import qat
from partitioner.distill.dense import dense_forward
from partitioner.distill.students import Student, greedy_keep, make_student, trainable
from partitioner.plan.export import save_weights, write_config
from runtime.artifacts import checkpoint_fingerprint, write_manifest
from runtime.checkpoint import load_spec, load_tokenizer, resolve_checkpoint
from runtime.compress.common import CompressionError
from runtime.compress.sparse import check_thresholds, mean_thresholds, site_shares
from runtime.segment import Segment
from runtime.student import structure_of

logger = logging.getLogger(__name__)
STATE = Path("train") / "state.pt"
CALIBRATION_WINDOWS = 4  # training windows that choose the kept layers / score pruned channels
SPARSE_WINDOWS = 16  # training windows whose MLP inputs set a sparse student's thresholds


@dataclass
class DistillConfig:
    layers: tuple[int, int]  # [a, b): the teacher segment
    kind: str = "layer_drop"  # students.KINDS
    keep: list[int] | str | None = None  # layer_drop: teacher layers kept, or "auto" (greedy_keep); default every other
    depth: int | None = None  # layer_drop: layers kept, spread evenly (default half)
    mlp_fraction: float = 0.0  # prune: MLP channels removed
    head_fraction: float = 0.0  # prune: query heads removed
    rank_fraction: float = 0.5  # low_rank: rank kept of mlp.down_proj
    sparsity: float | list[float] | None = None  # sparse: share of both MLP inputs zeroed, or [gate_up, down]
    qat: str | None = None  # "int8" / "int4": fake-quantise the layers' weights
    qat_head: str | None = None  # "int8" / "int4": and the LM head's
    steps: int = 400
    batch: int = 8  # sequences per step
    seq_len: int = 256  # tokens per sequence
    lr: float = 2e-4  # peak learning rate (linear warm-up, cosine decay)
    warmup: int = 20  # steps
    temperature: float = 2.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    ce_weight: float = 0.0
    train_head: bool = False
    seed: int = 0
    save_every: int = 100  # steps between checkpoints
    device: str = "cpu"
    texts: list[str] = field(default_factory=list)

    def check(self) -> None:
        a, b = self.layers
        if not 0 <= a < b:
            raise ValueError(f"layers must be A,B with A < B, got {a},{b}")
        if self.qat not in (None, *qat.QAT_BITS) or self.qat_head not in (None, *qat.QAT_BITS):
            raise ValueError(f"--qat and --qat-head take one of {qat.QAT_BITS}")
        for name in ("steps", "batch", "seq_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2 (each window predicts its own next tokens)")
        if not self.texts:
            raise ValueError("give at least one training text (--text)")
        if self.kind == "sparse":
            try:
                shares = site_shares(self.sparsity)
            except CompressionError as e:
                raise ValueError(f"a sparse student needs --sparsity S or GU:DOWN: {e}") from None
            if not any(shares):
                raise ValueError("a sparse student needs --sparsity above 0 at one input at least")
            if self.qat or self.qat_head:
                raise ValueError("a sparse student cannot take --qat: sparse_mlp needs the plain MLP's weights")


# ---- data -----------------------------------------------------------------------------------------


def text_tokens(model: str | os.PathLike, texts: list[str]) -> torch.Tensor:
    """Every training text tokenised and joined: (N,) token ids."""
    tokenizer = load_tokenizer(model)
    parts = []
    for text in texts:
        if not Path(text).is_file():
            raise FileNotFoundError(f"training text {text!r} does not exist")
        parts.append(tokenizer(Path(text).read_text(encoding="utf-8", errors="replace"), return_tensors="pt")
                     .input_ids[0])
    return torch.cat(parts)


def batches(ids: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """One batch of random windows of the token stream: (B, T)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# ---- loss -----------------------------------------------------------------------------------------


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


@dataclass
class Frozen:
    """The teacher's segment and the frozen layers around it."""

    teacher: Segment
    front: Segment | None  # [0, a) with the embedding, when a > 0
    back: Segment | None  # [b, L) + head, when b < L


def distill_loss(student: Student, frozen: Frozen, ids: torch.Tensor, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The loss and its parts for one batch of windows ids (B, T)."""
    with torch.no_grad():
        x = dense_forward(frozen.front, ids)[0] if frozen.front is not None else ids
        t_out, t_hidden = dense_forward(frozen.teacher, x, collect=True)
        t_logits = dense_forward(frozen.back, t_out)[0] if frozen.back is not None else t_out  # (B, T, V)
    s_out, s_hidden = dense_forward(student.segment, x, collect=True)
    s_logits = dense_forward(frozen.back, s_out)[0] if frozen.back is not None else s_out
    T = cfg.temperature
    V = s_logits.shape[-1]
    s_log = F.log_softmax(s_logits.float().view(-1, V) / T, -1)  # (B * T, V)
    t_log = F.log_softmax(t_logits.float().view(-1, V) / T, -1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * T * T
    hidden = torch.stack([F.mse_loss(rms_normalised(s_hidden[s]).float(), rms_normalised(t_hidden[t]).float())
                          for s, t in student.aligned]).mean()
    parts = {"kl": kl, "hidden": hidden}
    loss = cfg.kl_weight * kl + cfg.hidden_weight * hidden
    if cfg.ce_weight:
        ce = F.cross_entropy(s_logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))
        parts["ce"] = ce
        loss = loss + cfg.ce_weight * ce
    return {"loss": loss, **parts}


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to a tenth of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- the loop -------------------------------------------------------------------------------------


def build(model: str | os.PathLike, cfg: DistillConfig, ids: torch.Tensor) -> tuple[Student, Frozen]:
    """The student (with its QAT parametrisations) and the frozen teacher, front and back, on ``cfg.device``;
    ``ids`` (N,): the training text's tokens, whose first windows choose kept layers / score pruned channels."""
    a, b = cfg.layers
    L = load_spec(model).num_layers
    front = Segment.from_checkpoint(model, 0, a, embed=True) if a > 0 else None
    back = Segment.from_checkpoint(model, b, L, head=True) if b < L else None
    generator = torch.Generator().manual_seed(cfg.seed)
    windows = batches(ids, CALIBRATION_WINDOWS, cfg.seq_len, generator)  # (W, T)
    sparse_windows = None
    if cfg.kind == "sparse":
        sparse_windows = batches(ids, SPARSE_WINDOWS, cfg.seq_len, generator)  # (W, T) ids
        with torch.no_grad():
            sparse_windows = dense_forward(front, sparse_windows)[0] if front is not None else sparse_windows

    def auto_keep(teacher: Segment, depth: int) -> list[int]:
        x = dense_forward(front, windows)[0] if front is not None else windows
        keep = greedy_keep(teacher, x, depth, back)
        logger.info("layers kept (greedy, on %d training windows): %s", windows.shape[0], keep)
        return keep

    student, teacher = make_student(model, cfg.layers, cfg.kind, None if cfg.keep == "auto" else cfg.keep, cfg.depth,
                                    cfg.mlp_fraction, cfg.head_fraction, cfg.rank_fraction,
                                    calibration=list(windows) if a == 0 else None,
                                    auto_keep=auto_keep if cfg.keep == "auto" else None,
                                    sparsity=cfg.sparsity, sparse_calibration=sparse_windows)
    for segment in (front, back):
        for p in (segment.parameters() if segment is not None else ()):
            p.requires_grad_(False)
    if cfg.qat:
        layers = [m for block in student.segment.layers.values() for m in block.modules()
                  if type(m) is torch.nn.Linear]
        qat.attach(layers, cfg.qat)
    if cfg.qat_head and student.segment.has_head:
        qat.attach([student.segment.lm_head], cfg.qat_head)
    device = torch.device(cfg.device)
    if device.type == "cuda":  # TF32 products: the loss needs no more, and training runs several times faster
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for segment in (student.segment, teacher, front, back):
        if segment is not None:
            segment.to(device)
    return student, Frozen(teacher, front, back)


def save_state(out: Path, student: Student, optimizer, step: int, history: list[dict], cfg: DistillConfig) -> None:
    path = out / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"student": student.segment.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history, "config": asdict(cfg),
                "sparse": student.sparse.description if student.sparse else None}, tmp)
    os.replace(tmp, path)  # a crash mid-save keeps the previous checkpoint


def distill(model: str | os.PathLike, cfg: DistillConfig, out: str | os.PathLike, resume: bool = False,
            progress: bool = True) -> dict:
    """Train the student of ``cfg`` against its teacher on ``cfg.texts``, export it into ``out``; return the record."""
    cfg.check()
    model, out = resolve_checkpoint(model), Path(out)
    if (out / "manifest.json").exists() and not resume:
        raise FileExistsError(f"{out} already holds a distilled tier; give another --out (or --resume)")
    torch.manual_seed(cfg.seed)
    ids = text_tokens(model, cfg.texts)
    student, frozen = build(model, cfg, ids)
    params = trainable(student, cfg.train_head)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    if resume:
        if not (out / STATE).is_file():
            raise FileNotFoundError(f"--resume: {out / STATE} does not exist")
        state = torch.load(out / STATE, map_location=cfg.device, weights_only=False)
        if state["config"]["kind"] != cfg.kind or list(state["config"]["layers"]) != list(cfg.layers):
            raise ValueError(f"--resume: {out} was trained as {state['config']['kind']} of {state['config']['layers']}")
        student.segment.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        if student.sparse and state.get("sparse"):
            student.sparse.use(student.segment, state["sparse"])
    generator = torch.Generator().manual_seed(cfg.seed + step)
    student.segment.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"distill {cfg.kind}", disable=not progress)
    started = time.perf_counter()
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = batches(ids, cfg.batch, cfg.seq_len, generator).to(cfg.device)
        parts = distill_loss(student, frozen, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, **{k: round(float(v.detach()), 6) for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", kl=f"{history[-1]['kl']:.4f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            if student.sparse:  # the thresholds follow the student's activations
                student.sparse.calibrate(student.segment)
                logger.info("step %d: sparse thresholds recalibrated, mean gate_up/down %s", step,
                            mean_thresholds(check_thresholds(student.sparse.description["thresholds"])))
            save_state(out, student, optimizer, step, history, cfg)
    bar.close()
    student.segment.eval()
    plot_loss(history, out / "loss.png")  # before the manifest, which covers it (a resumed run redraws it)
    return export_student(model, student, cfg, out, history, time.perf_counter() - started)


# ---- export ---------------------------------------------------------------------------------------


def student_entry(student: Student, cfg: DistillConfig) -> dict:
    """The tier's compression entry: the structure to rebuild and the passes at load (QAT weights made low-bit,
    a sparse student's thresholds)."""
    suffix = f"+qat-{cfg.qat}" if cfg.qat else ""
    suffix += f"+head-{cfg.qat_head}" if cfg.qat_head and student.segment.has_head else ""
    passes = qat.export_passes(cfg.qat, cfg.qat_head if student.segment.has_head else None)
    if student.sparse:
        shares = cfg.sparsity if isinstance(cfg.sparsity, (list, tuple)) else [cfg.sparsity]
        suffix += "-" + ":".join(f"{x:g}" for x in shares)
        passes = [student.sparse.description, *passes]
    return {
        "name": f"distilled-{cfg.kind}{suffix}",
        "backend": "torch",
        "passes": passes,
        "student": structure_of(student.segment, student.teacher_layers),
    }


def export_student(model: Path, student: Student, cfg: DistillConfig, out: Path, history: list[dict],
                   seconds: float) -> dict:
    """Write ``out/model.safetensors`` (checkpoint names), ``config.json``, ``history.json`` and the manifest."""
    segment = student.segment.to("cpu")
    qat.finish(segment)
    if student.sparse:  # the masks become the tier's sparse_mlp pass
        student.sparse.remove()
    out.mkdir(parents=True, exist_ok=True)
    save_weights(segment, out)
    write_config(model, out)
    (out / "history.json").write_text(json.dumps(history))
    a, b = cfg.layers
    info = {
        "tier": "student",
        "model": checkpoint_fingerprint(model),
        "layers": [a, b],
        "embed": segment.has_embed,
        "head": segment.has_head,
        "compression": student_entry(student, cfg),
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "device"}, "seconds": round(seconds, 1),
                     "final_loss": history[-1] if history else None},
    }
    return write_manifest(out, info, exclude=(STATE.parts[0],))  # the tier, not the training state


def plot_loss(history: list[dict], path: Path) -> None:
    """The loss curve (and its parts) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in [k for k in history[0] if k != "step"] if history else []:
        ax.plot(steps, [h[key] for h in history], label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("splitglm distill")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
