"""Distillation on a tiny random model: the dense forward, each student kind, QAT, resume, export and load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from partitioner.distill import qat
from partitioner.distill.dense import dense_forward
from partitioner.distill.judge import judge, load_distilled
from partitioner.distill.students import every_other, greedy_keep, layer_dropped, make_student
from partitioner.distill.train import STATE, DistillConfig, batches, build, distill, distill_loss, text_tokens
from runtime.artifacts import ArtifactError
from runtime.compress.quant import Int4Linear, Int8Linear
from runtime.compress.sparse import SparseMLP, attach_input_masks
from runtime.segment import Segment, SegmentInput
from runtime.student import StudentError, load_student, structure_of
from tests.conftest import GPL3


@pytest.fixture(scope="module")
def tiny_text_model(tiny_glm, tmp_path_factory):
    """The tiny model with a character tokenizer, so it can read text files."""
    from splitglm.fuzz.stack import char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-text")
    shutil.copytree(tiny_glm, folder, dirs_exist_ok=True)
    char_tokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A training text and a judging text of another file (both from the GPL, split in two halves)."""
    folder = tmp_path_factory.mktemp("texts")
    body = open(GPL3).read()
    (folder / "train.txt").write_text(body[: len(body) // 2])
    (folder / "judge.txt").write_text(body[len(body) // 2 :])
    return str(folder / "train.txt"), str(folder / "judge.txt")


def config(text: str, **overrides) -> DistillConfig:
    base = dict(layers=(2, 6), steps=30, batch=4, seq_len=32, lr=1e-3, warmup=3, save_every=10, texts=[text])
    return DistillConfig(**{**base, **overrides})


def held_out_loss(model, cfg, state=None, sparse=None) -> float:
    """The loss of a student (fresh, or with ``state`` and a sparse tier's ``sparse`` pass) on a fixed batch
    the training never draws."""
    ids = text_tokens(model, cfg.texts)
    student, frozen = build(model, cfg, ids)
    if state is not None:
        student.segment.load_state_dict(state, strict=False)
    if sparse is not None:
        student.sparse.use(student.segment, sparse)
    ids = batches(ids, 8, cfg.seq_len, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        return float(distill_loss(student, frozen, ids, cfg)["loss"])


def test_dense_forward_equals_the_runtime(tiny_checkpoint):
    tail = Segment.from_checkpoint(tiny_checkpoint, 2, 6, head=True)
    front = Segment.from_checkpoint(tiny_checkpoint, 0, 2, embed=True)
    ids = torch.randint(0, 96, (1, 24))
    hidden, _ = dense_forward(front, ids)
    assert torch.allclose(hidden[0], front([SegmentInput("f", 0, input_ids=ids[0])])[0], atol=1e-5)
    logits, layers = dense_forward(tail, hidden, collect=True)
    assert list(layers) == ["2", "3", "4", "5"]
    assert torch.allclose(logits[0], tail([SegmentInput("t", 0, hidden=hidden[0])])[0], atol=1e-4)


def test_layer_dropped_student_aligns_each_kept_layer_with_the_teacher_before_the_next(tiny_glm):
    teacher = Segment.from_checkpoint(tiny_glm, 2, 6, head=True)
    student = layer_dropped(teacher, [2, 5])
    assert list(student.segment.layers) == ["2", "3"]
    assert student.aligned == [("2", "4"), ("3", "5")]
    for j, t in enumerate([2, 5]):  # initialised from the kept teacher layer
        ours, theirs = student.segment.layers[str(2 + j)].state_dict(), teacher.layers[str(t)].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert every_other(20, 30) == [20, 22, 24, 26, 28]
    with pytest.raises(ValueError, match="increasing distinct"):
        layer_dropped(teacher, [5, 2])


def test_greedy_keep_never_does_worse_than_every_other(tiny_glm):
    import torch.nn.functional as F

    teacher = Segment.from_checkpoint(tiny_glm, 0, 6, embed=True, head=True)
    ids = torch.randint(0, 96, (2, 32))
    keep = greedy_keep(teacher, ids, 3)
    assert len(keep) == 3 and keep == sorted(keep) and set(keep) <= set(range(6))

    def kl(kept):
        logits, _ = dense_forward(layer_dropped(teacher, kept).segment, ids)
        full, _ = dense_forward(teacher, ids)
        return float(F.kl_div(logits.log_softmax(-1).flatten(0, 1), full.log_softmax(-1).flatten(0, 1),
                              log_target=True, reduction="batchmean"))

    with torch.no_grad():
        assert kl(keep) <= kl(every_other(0, 6, 3)) + 1e-6


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "layer_drop"},
        {"kind": "layer_drop", "keep": "auto", "qat": "int4", "qat_head": "int8"},
        {"kind": "prune", "mlp_fraction": 0.5, "head_fraction": 0.5, "lr": 2e-4},
        {"kind": "low_rank", "rank_fraction": 0.25, "lr": 2e-4},
        {"kind": "prune", "mlp_fraction": 0.5, "layers": (0, 3), "lr": 2e-4},  # device: through the rest
        {"kind": "layer_drop", "qat": "int8", "layers": (1, 5)},  # a middle segment
        {"kind": "sparse", "sparsity": 0.7, "lr": 2e-4},  # the tiny random model shrugs off less
        {"kind": "sparse", "sparsity": [0.6, 0.8], "layers": (0, 3), "lr": 2e-4},  # device: through the rest
    ],
    ids=["layer-drop", "layer-drop-auto-qat4", "prune", "low-rank", "prune-device", "qat8-middle", "sparse",
         "sparse-device"],
)
def test_each_student_learns_and_its_exported_tier_loads(tiny_text_model, texts, tmp_path, overrides):
    cfg = config(texts[0], **overrides)
    before = held_out_loss(tiny_text_model, cfg)
    record = distill(tiny_text_model, cfg, tmp_path / "out", progress=False)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history) == cfg.steps and (tmp_path / "out" / "loss.png").stat().st_size > 1000
    tier, manifest = load_distilled(tmp_path / "out")  # manifest verified, structure rebuilt, passes applied
    assert manifest["compression"] == record["compression"]
    state = load_student(tmp_path / "out", cfg.layers[0], manifest["compression"]["student"], tier.has_embed,
                         tier.has_head).state_dict()
    passes = manifest["compression"]["passes"]
    after = held_out_loss(tiny_text_model, cfg, state, passes[0] if cfg.kind == "sparse" else None)
    assert after < before, f"the held-out loss did not fall: {before} -> {after}"
    a, b = cfg.layers
    x = torch.randint(0, 96, (20,)) if a == 0 else torch.randn(20, 64)
    item = SegmentInput("s", 0, input_ids=x) if a == 0 else SegmentInput("s", 0, hidden=x)
    out = tier([item])[0]
    assert out.shape == (20, 96 if b == 6 else 64) and torch.isfinite(out).all()
    if cfg.qat:  # the tier runs real low-bit kernels
        kinds = {type(m) for m in tier.modules()}
        assert (Int4Linear if cfg.qat == "int4" else Int8Linear) in kinds
    if cfg.kind == "sparse":  # the tier's MLPs zero their inputs, at the thresholds it trained with
        assert [type(b.mlp) for b in tier.layers.values()] == [SparseMLP] * (b - a)
        assert manifest["compression"]["passes"][0]["pass"] == "sparse_mlp"


def test_a_sparse_student_trains_the_model_it_becomes(tiny_text_model, texts, tmp_path):
    """The masks in training compute what the exported SparseMLP tier does; the recalibrated thresholds keep
    the sparsity asked for on the student's own inputs; bad settings are refused."""
    cfg = config(texts[0], kind="sparse", sparsity=0.5, steps=10, save_every=5, lr=1e-3)
    distill(tiny_text_model, cfg, tmp_path / "out", progress=False)
    tier, manifest = load_distilled(tmp_path / "out")
    description = manifest["compression"]["passes"][0]
    plain = load_student(tmp_path / "out", 2, manifest["compression"]["student"], False, True)
    handles = attach_input_masks(plain, description["thresholds"])
    x = torch.randn(1, 24, 64)
    with torch.no_grad():
        masked = dense_forward(plain, x)[0]
    for h in handles:
        h.remove()
    with torch.no_grad():
        unmasked = dense_forward(plain, x)[0]
    item = SegmentInput("s", 0, hidden=x[0])
    assert torch.allclose(tier([item])[0], masked[0], atol=1e-4)  # train-time masks == the deployed kernel
    assert (masked - unmasked).abs().max() > 1e-4  # and the masks do zero something
    row = judge(tiny_text_model, tmp_path / "out", texts[1], tokens=300, window=64)
    assert row["compression"] == "distilled-sparse-0.5"
    assert 0.35 < row["mlp_inputs_zeroed"]["gate_up"] < 0.65 and 0.35 < row["mlp_inputs_zeroed"]["down"] < 0.65
    with pytest.raises(ValueError, match="--sparsity"):
        config(texts[0], kind="sparse").check()
    with pytest.raises(ValueError, match="--sparsity"):
        config(texts[0], kind="sparse", sparsity=1.0).check()
    with pytest.raises(ValueError, match="--qat"):
        config(texts[0], kind="sparse", sparsity=0.3, qat="int8").check()


def test_qat_weights_are_what_the_runtime_kernels_hold():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    for bits, kernel in (("int8", Int8Linear.from_linear(linear, "bf16")), ("int4", None)):
        fake = qat.fake_quantize(linear.weight.detach(), bits)
        again = qat.fake_quantize(fake, bits)
        assert torch.allclose(fake, again, atol=1e-6), "quantising the exported weights again changes them"
        if kernel is not None:
            assert torch.allclose(fake, kernel.dequantized_weight(), atol=1e-6)
    qat.attach([linear], "int4")
    x = torch.randn(3, 64, requires_grad=True)
    linear(x).sum().backward()  # the straight-through gradient reaches the raw weight
    assert linear.parametrizations.weight.original.grad is not None


def test_resume_continues_from_the_checkpoint(tiny_text_model, texts, tmp_path):
    out = tmp_path / "out"
    distill(tiny_text_model, config(texts[0], steps=10, save_every=5), out, progress=False)
    assert (out / STATE).is_file()
    with pytest.raises(FileExistsError):
        distill(tiny_text_model, config(texts[0], steps=10), out, progress=False)
    distill(tiny_text_model, config(texts[0], steps=20, save_every=5), out, resume=True, progress=False)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 21))
    load_distilled(out)  # the manifest covers the files as the resumed run left them (loss.png redrawn)
    with pytest.raises(ValueError, match="trained as"):
        distill(tiny_text_model, config(texts[0], steps=30, kind="low_rank"), out, resume=True, progress=False)


def test_a_tampered_or_misdescribed_tier_is_refused(tiny_text_model, texts, tmp_path):
    out = tmp_path / "out"
    distill(tiny_text_model, config(texts[0], steps=2, kind="prune", mlp_fraction=0.5), out, progress=False)
    _, manifest = load_distilled(out)
    structure = manifest["compression"]["student"]
    assert structure["layers"]["2"]["intermediate"] == 48
    wrong = {**structure, "layers": {**structure["layers"], "2": {"num_heads": 4, "intermediate": 40}}}
    with pytest.raises(StudentError, match="structure says"):
        load_student(out, 2, wrong, False, True)
    with pytest.raises(StudentError, match="holds 0..4 layers"):
        load_student(out, 2, {**structure, "depth": 9}, False, True)
    with (out / "model.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match="sha256"):
        load_distilled(out)


def test_structure_of_a_plain_segment_lists_no_layer(tiny_glm):
    segment = Segment.from_checkpoint(tiny_glm, 2, 6, head=True)
    assert structure_of(segment, [2, 3, 4, 5]) == {"depth": 4, "teacher_layers": [2, 3, 4, 5], "layers": {}}
    student, _ = make_student(tiny_glm, (2, 6), "low_rank", rank_fraction=0.25)
    shapes = structure_of(student.segment, student.teacher_layers)["layers"]
    assert shapes["2"]["ranks"] == {"mlp.down_proj": 16}  # a quarter of min(64, 96)


def test_judge_reports_the_tier_against_its_teacher(tiny_text_model, texts, tmp_path):
    distill(tiny_text_model, config(texts[0], steps=5), tmp_path / "out", progress=False)
    row = judge(tiny_text_model, tmp_path / "out", texts[1], tokens=200, window=64)
    assert row["compression"] == "distilled-layer_drop" and row["tokens"] > 100
    assert 0 <= row["token_agreement"] <= 1 and row["perplexity"] > 0


def test_cli_documents_the_students_and_refuses_judging_on_training_text(texts, tmp_path, capsys):
    from splitglm.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for word in ("layer_drop", "prune", "low_rank", "sparse", "--sparsity", "--qat", "--resume", "KL", "MSE"):
        assert word in text
    code = main(["distill", "--layers", "2,6", "--text", texts[0], "--eval-text", texts[0], "--out", str(tmp_path)])
    assert code == 1 and "also a training text" in capsys.readouterr().err


def test_a_distilled_fast_tail_joins_the_choice_and_ships_in_the_plan(tiny_text_model, texts, tmp_path):
    from partitioner.plan.export import export_plan, fixed_plan
    from partitioner.plan.fast_tail import DistilledTail, Floor, choose_fast_tail
    from runtime.artifacts import checkpoint_fingerprint, load_plan, load_tier

    distill(tiny_text_model, config(texts[0], layers=(4, 6), depth=1, steps=5), tmp_path / "tail", progress=False)
    distill(tiny_text_model, config(texts[0], layers=(3, 6), depth=1, steps=2), tmp_path / "other", progress=False)
    model_id = checkpoint_fingerprint(tiny_text_model)
    offered = DistilledTail.offer([tmp_path / "tail", tmp_path / "other"], model_id, 4, 6)
    assert list(offered) and all(name.startswith("distilled-layer_drop@") for name in offered)  # "other": k2 = 3
    name = next(iter(offered))
    ids = torch.randint(0, 96, (256,))
    choice = choose_fast_tail(tiny_text_model, 4, ids, threads=1, floor=Floor(1000.0, 0.0), data={}, names=["none"],
                              window=128, students=offered)
    assert set(choice.measured) == {"none", name} and choice.measured[name]["step_ms"] > 0
    choice.name = name  # as if it had been the fastest within the floor
    plan = {**fixed_plan((2, 4), ("fp32", "fp32")), "fast_tail": choice.record()}
    export_plan(tiny_text_model, plan, tmp_path / "plan", sources={"fast_tail": choice.source})
    assert load_plan(tmp_path / "plan")["fast_tail"]["compression"]["student"]["depth"] == 1
    fast = load_tier(tmp_path / "plan", "fast_tail")  # verified against the plan, rebuilt as the student
    assert list(fast.layers) == ["4"]
    student, _ = load_distilled(tmp_path / "tail")
    hidden = torch.randn(10, 64)
    ours, theirs = (s([SegmentInput("a", 0, hidden=hidden)])[0] for s in (fast, student))
    assert torch.equal(ours, theirs)


def test_eval_of_a_plan_reports_each_distilled_tier_against_the_uncompressed_model(tiny_text_model, texts, tmp_path):
    from partitioner.eval.assess import evaluate_tiers
    from partitioner.plan.export import export_plan, fixed_plan

    cfg = config(texts[0], layers=(0, 2), kind="prune", mlp_fraction=0.5, steps=3)
    record = distill(tiny_text_model, cfg, tmp_path / "device", progress=False)
    plan = fixed_plan((2, 4), ("fp32", "fp32"))
    plan["compression"]["device"] = record["compression"]
    export_plan(tiny_text_model, plan, tmp_path / "plan", sources={"device": tmp_path / "device"})
    rows = evaluate_tiers(tiny_text_model, texts[1], tmp_path / "plan", tokens=300, window=100)
    assert [r["codec"] for r in rows] == ["tier:device"] and rows[0]["compression"] == "distilled-prune"
    assert rows[0]["perplexity_delta_pct"] != 0 and rows[0]["tokens"] > 200
