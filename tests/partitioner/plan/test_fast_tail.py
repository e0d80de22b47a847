"""The edge's fast tail: its own verified tier folder, its compression, and its choice by measurement."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from partitioner.plan.export import cached_plan, export_plan, fixed_plan
from partitioner.plan.fast_tail import FAST_TAIL_COMPRESSIONS, Floor, choose_fast_tail, pick_fast_tail
from runtime.artifacts import ArtifactError, load_plan, load_tier
from runtime.segment import SegmentInput

C = 64  # tiny_glm's hidden size


def tail_logits(segment, hidden: torch.Tensor) -> torch.Tensor:
    return segment([SegmentInput("s", 0, hidden=hidden)])[0]  # (T, V)


@pytest.fixture(scope="module")
def hidden() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(12, C)  # (T, C) at k2


def test_uncompressed_fast_tail_equals_the_cloud_tier(tiny_glm, tmp_path, hidden):
    out = tmp_path / "plan"
    export_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32"), fast_tail="none"), out)
    plan = load_plan(out)
    assert plan["fast_tail"] == {"compression": {"name": "none", "backend": "torch", "passes": []}, "quality": None}
    manifest = json.loads((out / "fast_tail" / "manifest.json").read_text())
    assert manifest["tier"] == "fast_tail" and manifest["layers"] == [4, 6] and manifest["head"] is True
    assert manifest["plan_id"] == plan["plan_id"] and not manifest["embed"]
    fast, cloud = load_tier(out, "fast_tail"), load_tier(out, "cloud")
    torch.testing.assert_close(tail_logits(fast, hidden), tail_logits(cloud, hidden), atol=0, rtol=0)


def test_int8_fast_tail_is_close_but_not_identical_and_verified(tiny_glm, tmp_path, hidden):
    out = tmp_path / "plan"
    export_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32")), out)  # the default fast tail: int8 weight-only
    assert load_plan(out)["fast_tail"]["compression"]["name"] == "int8"
    fast = load_tier(out, "fast_tail")
    assert type(fast.layers["4"].mlp.down_proj).__name__ == "Int8Linear"
    a, b = tail_logits(fast, hidden), tail_logits(load_tier(out, "cloud"), hidden)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    weights = out / "fast_tail" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors has sha256"):
        load_tier(out, "fast_tail")


def test_a_plan_without_a_fast_tail_gets_the_default(tiny_glm, tmp_path):
    plan = {"splits": [2, 4], "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"}, "compression": {}}
    export_plan(tiny_glm, plan, tmp_path / "plan")
    assert load_plan(tmp_path / "plan")["fast_tail"]["compression"]["name"] == "int8"
    assert load_tier(tmp_path / "plan", "fast_tail").has_head


def test_cached_plans_differ_by_fast_tail(tiny_glm, tmp_path):
    exact = cached_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32"), fast_tail="none"), tmp_path)
    default = cached_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32")), tmp_path)
    assert exact != default
    assert cached_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32"), fast_tail="none"), tmp_path) == exact
    with pytest.raises(ValueError, match="unknown fast-tail compression"):
        fixed_plan((2, 4), ("fp32", "fp32"), fast_tail="int3")


def measured(delta: float, agreement: float, step_ms: float) -> dict:
    return {"perplexity_delta_pct": delta, "token_agreement": agreement, "step_ms": step_ms}


def test_pick_takes_the_fastest_within_the_floor(caplog):
    floor = Floor(max_perplexity_increase_pct=2.0, min_token_agreement=0.9)
    numbers = {
        "none": measured(0.0, 1.0, 28.0),
        "int8": measured(0.3, 0.98, 20.0),
        "int8+head": measured(0.4, 0.96, 14.0),
        "int4+head": measured(4.5, 0.84, 7.5),  # fastest, below the floor
        "w8a8+head": measured(2.3, 0.91, 12.0),  # agreement fine, perplexity not
    }
    assert pick_fast_tail(numbers, floor) == "int8+head"
    assert pick_fast_tail(numbers, Floor(5.0, 0.8)) == "int4+head"
    assert pick_fast_tail({**numbers, "int4": measured(0.1, 0.99, 14.0)}, floor) == "int4"  # tie: the more accurate
    with caplog.at_level(logging.WARNING):
        assert pick_fast_tail({k: numbers[k] for k in ("int4+head", "w8a8+head")}, floor) == "w8a8+head"
    assert "no fast-tail compression meets" in caplog.text


def test_choose_measures_the_tiny_model_and_reuses_its_cache(tiny_glm):
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (256,))
    data: dict = {}
    floor = Floor(max_perplexity_increase_pct=2.0, min_token_agreement=0.9)
    choice = choose_fast_tail(tiny_glm, 4, ids, threads=1, floor=floor, data=data, names=["none", "int8"], window=128)
    exact = choice.measured["none"]
    assert exact["perplexity_delta_pct"] == 0 and exact["token_agreement"] == 1.0 and exact["tokens"] == 254
    assert exact["step_ms"] > 0 and exact["prefill_ms_per_token"] > 0
    assert choice.name in ("none", "int8") and floor.meets(choice.measured[choice.name])
    assert set(choice.record()) == {"compression", "quality", "floor", "candidates", "cpu_decode"}
    assert choice.record()["cpu_decode"] == {"path": "eager"}  # until choose_decode_path times it
    assert choice.record()["compression"]["passes"] == FAST_TAIL_COMPRESSIONS[choice.name]
    # the cache holds both; a planted number proves it is read back instead of measured again
    data["fast_tail"]["k2=4"]["int8"]["quality"]["token_agreement"] = 0.5
    again = choose_fast_tail(tiny_glm, 4, ids, threads=1, floor=floor, data=data, names=["none", "int8"], window=128)
    assert again.measured["int8"]["token_agreement"] == 0.5 and again.name == "none"


@pytest.mark.slow
def test_demo_model_fast_tail_meets_the_floor(demo_checkpoint, gpl3_text):
    from partitioner.plan.measure import QUALITY_TOKENS
    from runtime.checkpoint import load_tokenizer

    # half the planner's text (QUALITY_TOKENS): 1024 positions still weigh agreement to about 1% (the floor is 90%)
    ids = load_tokenizer(demo_checkpoint)(gpl3_text, return_tensors="pt").input_ids[0][:QUALITY_TOKENS // 2]
    floor = Floor()
    choice = choose_fast_tail(demo_checkpoint, 20, ids, threads=1, floor=floor, data={})
    chosen = choice.measured[choice.name]
    logging.getLogger(__name__).info("demo fast tail at k2=20: %s %s", choice.name, chosen)
    assert chosen["token_agreement"] >= floor.min_token_agreement
    assert chosen["perplexity_delta_pct"] <= floor.max_perplexity_increase_pct
    assert chosen["step_ms"] <= choice.measured["none"]["step_ms"] * 1.1  # never much slower than the exact copy
    assert choice.measured["none"]["token_agreement"] == 1.0
