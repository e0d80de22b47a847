"""Plans that use the compiled CPU decode path: the planner's choice by measured step time, the draft cost it
predicts, the report, and the agents' loading of the planned path."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from partitioner.plan.export import export_plan
from partitioner.plan.fast_tail import FastTailChoice, Floor, choose_decode_path
from partitioner.plan.measure import compression_costs, key
from partitioner.plan.partition import _tier_choices, cpu_decode_record, path_predictions
from partitioner.plan.planner import plan
from partitioner.plan.report import cpu_decode_lines
from runtime.artifacts import load_tier
from runtime.cpu_decode import CpuDecode
from tests.partitioner.plan.test_planner import FP32, L, profile, topology

FP32_MEASURED = {"bytes_per_element": 4.0, "step_bytes_per_element": 4.1, "perplexity_delta_pct": 0.0,
                 "token_agreement": 1.0}


def measurements(compiled_ms: dict[str, float], threads: int = 2) -> dict:
    """Synthetic measurements: every compression's profile at 1 ms a layer, its sample step 4 ms eager."""
    return {
        "profiles": {key("torch", c, threads): asdict(profile(1.0)) for c in ("none", "int4")},
        "compression": {"none": {"perplexity_delta_pct": 0.0}, "int4": {"perplexity_delta_pct": 0.3}},
        "codecs": {"fp32": FP32_MEASURED},
        "cpu_decode": {key("torch", c, threads): {"layers": 2, "threads": threads, "eager_ms": 4.0,
                                                  "compiled_ms": ms} for c, ms in compiled_ms.items()},
    }


def test_each_compression_takes_the_path_of_the_shorter_measured_step():
    data = measurements({"none": 1.0, "int4": 5.0})
    costs = {c.name: c for c in compression_costs(data, 2, L)}
    assert costs["none"].cpu_decode == costs["int4"].cpu_decode == "eager"  # a topology's "eager": as measured
    auto = {c.name: c for c in compression_costs(data, 2, L, cpu_decode="auto")}
    assert auto["none"].cpu_decode == "compiled" and auto["int4"].cpu_decode == "eager"
    none = auto["none"].profile
    assert [none.layers[i].decode_ms for i in range(L)] == pytest.approx([0.25] * L)  # 1 ms x 1/4
    assert none.layers[0].prefill_ms_per_token == costs["none"].profile.layers[0].prefill_ms_per_token
    assert none.head == costs["none"].profile.head  # the head and the prefill stay eager
    forced = {c.name: c for c in compression_costs(data, 2, L, cpu_decode="compiled")}
    assert forced["int4"].cpu_decode == "compiled" and forced["int4"].profile.layers[0].decode_ms == 1.25


def test_the_plan_records_and_predicts_the_faster_path():
    data = measurements({"none": 1.0, "int4": 1.0})
    topo = topology(tiers={"edge": {"threads": 2}, "device": {"threads": 2, "cpu_decode": "eager"}})
    choices = _tier_choices(topo, data, L)
    assert {c.cpu_decode for c in choices["device"]} == {"eager"}
    assert {c.cpu_decode for c in choices["edge"]} == {"compiled"}
    assert {c.cpu_decode for c in choices["cloud"]} == {"eager"}
    best = plan(topo, choices, [FP32], L)[0]
    k1, k2 = best.splits
    assert best.cpu_decode == {"device": "eager", "edge": "compiled"}
    eager_topo = topology(tiers={"edge": {"cpu_decode": "eager"}, "device": {"cpu_decode": "eager"}})
    eager = plan(eager_topo, _tier_choices(eager_topo, data, L), [FP32], L, top=1 << 20)
    same = next(c for c in eager if c.splits == best.splits and c.compression == best.compression)
    assert same.per_token_ms - best.per_token_ms == pytest.approx((k2 - k1) * 0.75)  # 1 -> 0.25 ms a layer

    fast = FastTailChoice("int8", Floor(), {"int8": {"step_ms": 8.0, "prefill_ms_per_token": 0.5,
                                                     "perplexity_delta_pct": 0.1, "token_agreement": 0.95}})
    measured = {"eager_ms": 8.0, "compiled_ms": 3.0, "threads": 2, "layers": L - k2}
    fast.decode = {"path": "eager"}
    front = k2 * 0.25 + 0.01  # the edge's [0, k2) compiled, with the embedding
    assert path_predictions(topo, data, best, L, fast)["fast"]["step_ms"] == pytest.approx(front + 8.0)
    fast.decode = {**measured, "path": "compiled"}
    paths = path_predictions(topo, data, best, L, fast)
    assert paths["fast"]["step_ms"] == pytest.approx(front + 3.0)  # the draft cost: the compiled tail's step
    record = cpu_decode_record(best, fast)
    assert record == {"device": "eager", "edge": "compiled", "fast_tail": "compiled"}

    planned = {"cpu_decode": record, "compression": {"edge": {"name": "int4"}},
               "fast_tail": {**fast.record(), "compression": {"name": "none"}},
               "predicted": {"paths": paths}}
    text = "\n".join(cpu_decode_lines(planned, data))
    assert "device `eager`, edge `compiled`, fast tail `compiled`" in text
    assert "`int4` (low-bit)" in text and "`none` (exact)" in text
    assert f"{paths['fast']['step_ms']:.2f} ms" in text and "| int4@2 | 2 | 4.000 | 1.000 | 0.25 |" in text
    assert "eager 8.000 ms, compiled 3.000 ms at 2 threads" in text


def test_compiled_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="cpu_decode: compiled is for a device or edge tier"):
        topology(tiers={"cloud": {"cpu_decode": "compiled"}})
    with pytest.raises(ValueError, match="onnxruntime"):
        topology(tiers={"device": {"backend": "onnxruntime", "cpu_decode": "compiled"}})


def test_fast_tail_path_is_measured_once_and_chosen(tiny_glm):
    """The chosen tail compiled and eager side by side on the tiny model; cached; "eager" measures nothing."""
    choice = FastTailChoice("none", Floor(), {"none": {"step_ms": 1.0}})
    assert choose_decode_path(tiny_glm, 4, choice, 1, "eager", data := {}) == {"path": "eager"} and data == {}
    decode = choose_decode_path(tiny_glm, 4, choice, 1, "auto", data)
    assert decode["layers"] == 2 and decode["eager_ms"] > 0 and decode["compiled_ms"] > 0
    assert decode["path"] == ("compiled" if decode["compiled_ms"] < decode["eager_ms"] else "eager")
    assert choice.step_ms == decode[f"{decode['path']}_ms"]
    cached = data["fast_tail"]["k2=4"]["none"]["cpu_decode"]["1"]
    cached["compiled_ms"], cached["eager_ms"] = 1.0, 2.0  # a second call reads the cache, measures nothing
    assert choose_decode_path(tiny_glm, 4, choice, 1, "auto", data)["path"] == "compiled"
    assert choose_decode_path(tiny_glm, 4, choice, 1, "eager", data)["path"] == "eager"


def test_agents_load_the_planned_path_unless_overridden(tiny_glm, tmp_path):
    out = tmp_path / "plan"
    export_plan(tiny_glm, {"splits": [2, 4], "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"},
                           "compression": {}, "cpu_decode": {"device": "compiled", "edge": "eager",
                                                             "fast_tail": "eager"}}, out)
    assert json.loads((out / "plan.json").read_text())["cpu_decode"]["device"] == "compiled"
    device = load_tier(out, "device", cpu_decode=CpuDecode("plan", 1))
    assert device.compiled is not None and device.compiled.max_rows == 1
    assert load_tier(out, "device", cpu_decode=CpuDecode("eager")).compiled is None  # --cpu-decode eager
    assert load_tier(out, "edge", cpu_decode=CpuDecode("plan")).compiled is None
    assert CpuDecode("plan").for_plan(None) == CpuDecode("eager")  # a plan that names no path
    assert CpuDecode("compiled", 3).for_plan("eager") == CpuDecode("compiled", 3)


def test_a_host_without_a_compiler_plans_eager(tiny_glm, monkeypatch):
    from partitioner.plan.profiler import decode_paths
    from runtime.segment import Segment

    eager, compiled = (Segment.from_checkpoint(tiny_glm, 0, 2) for _ in range(2))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "compile_decode", no_compiler)
    measured = decode_paths(eager, compiled, threads=1, rounds=1, steps=2)
    assert measured["compiled_ms"] is None and measured["eager_ms"] > 0
    data = measurements({"none": 1.0})
    data["cpu_decode"][key("torch", "none", 2)] = measured
    auto = {c.name: c for c in compression_costs(data, 2, L, cpu_decode="auto")}
    assert auto["none"].cpu_decode == "eager"
    forced = {c.name: c for c in compression_costs(data, 2, L, cpu_decode="compiled")}["none"]
    assert forced.cpu_decode == "compiled" and forced.profile.layers[0].decode_ms == 1.0  # asked for, unmeasured
    text = "\n".join(cpu_decode_lines({"cpu_decode": {"device": "eager", "edge": "eager", "fast_tail": "eager"},
                                       "compression": {"edge": {"name": "none"}},
                                       "fast_tail": {"compression": {"name": "none"}}}, data))
    assert "| none@2 | 2 | " in text and "- (no compiler) | - |" in text
