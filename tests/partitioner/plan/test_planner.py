"""Planner maths on synthetic profiles, topology validation, plan export and verified loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from partitioner.plan.export import export_plan
from partitioner.plan.planner import CodecCost, CompressionCost, plan
from partitioner.plan.profiler import Profile, StageCost
from partitioner.plan.topology import Topology, TopologyError, load_topology
from runtime.artifacts import ArtifactError, load_tier
from runtime.segment import Segment, SegmentInput

L, C = 6, 64


def profile(decode_ms: float, weight_bytes: int = 1000) -> Profile:
    layers = {i: StageCost(decode_ms / 4, decode_ms, weight_bytes) for i in range(L)}
    return Profile("m", "torch", "none", 2, "x", C, 16, layers, StageCost(0.01, 0.01, 100), StageCost(0.1, 1.0, 100))


def topology(**over) -> Topology:
    base = {
        "name": "t",
        "tiers": {
            "device": {"memory_mb": 1000, "speed_factor": 1.0},
            "edge": {"memory_mb": 1000, "speed_factor": 1.0},
            "cloud": {"memory_mb": 1000, "speed_factor": 1.0},
        },
        "links": {
            "device_edge": {"bandwidth_mbit_s": 100, "rtt_ms": 1},
            "edge_cloud": {"bandwidth_mbit_s": 100, "rtt_ms": 1},
        },
        "workload": [{"prompt_tokens": 32, "output_tokens": 16}],
        "max_perplexity_increase_pct": 1.0,
    }
    for tier, fields in over.pop("tiers", {}).items():
        base["tiers"][tier].update(fields)
    return Topology.model_validate({**base, **over})


FP32 = CodecCost("fp32", 4.0, 4.1, 0.0)
LOSSY = CodecCost("tiny", 0.5, 0.6, 0.8)


def choices(device=1.0, edge=1.0, cloud=1.0):
    return {
        t: [CompressionCost("none", profile(ms), 0.0)]
        for t, ms in (("device", device), ("edge", edge), ("cloud", cloud))
    }


def test_layers_go_to_the_fastest_tier():
    best = plan(topology(tiers={"edge": {"speed_factor": 10.0}}), choices(), [FP32], L)[0]
    assert best.splits == (1, L)  # the device keeps its minimum, the fast edge takes the rest
    best = plan(topology(tiers={"cloud": {"speed_factor": 10.0}}), choices(), [FP32], L)[0]
    assert best.splits == (1, 1)


def test_memory_cap_limits_the_device():
    mib = 1024 * 1024
    # each layer weighs 1 MiB; the device may hold 3.5 MiB: at most 3 layers (+ embedding)
    topo = topology(tiers={"device": {"speed_factor": 10.0, "memory_mb": 3.5}}, context_tokens=1)
    ch = {t: [CompressionCost("none", profile(1.0, mib), 0.0)] for t in ("device", "edge", "cloud")}
    best = plan(topo, ch, [FP32], L)[0]
    assert best.splits[0] == 3 and best.memory_mb["device"] <= 3.5


def test_quality_floor_and_bandwidth_pick_the_codec():
    slow = {
        "links": {
            "device_edge": {"bandwidth_mbit_s": 0.1, "rtt_ms": 1},
            "edge_cloud": {"bandwidth_mbit_s": 0.1, "rtt_ms": 1},
        }
    }
    best = plan(topology(**slow), choices(), [FP32, LOSSY], L)[0]
    assert sorted(best.codecs.values()) == ["fp32", "tiny"]  # tiny on both links (0.8 + 0.8) breaks the 1% floor
    assert best.perplexity_delta_pct == pytest.approx(0.8)
    tiny_link = next(link for link, codec in best.codecs.items() if codec == "tiny")
    assert best.link_bytes_per_token[tiny_link] == pytest.approx(0.6 * C)


def test_prediction_is_the_stated_formula():
    topo = topology()
    best = plan(topo, choices(), [FP32], L)[0]
    k1, k2 = best.splits
    per_token = L * 1.0 + 0.01 + 1.0 + 2 * (1 + C * 4.1 * 8 / 100e3)  # layers + embed + head + 2 x (RTT + send)
    assert best.per_token_ms == pytest.approx(per_token)
    ttft = 32 * (L * 0.25 + 0.01) + 1.0 + 2 * (1 + 32 * C * 4.0 * 8 / 100e3)
    assert best.ttft_ms == pytest.approx(ttft)
    assert best.expected_ms == pytest.approx(ttft + 15 * per_token)


def test_no_feasible_plan_is_an_empty_list():
    assert plan(topology(tiers={"cloud": {"memory_mb": 1e-6}}), choices(), [FP32], L) == []


def test_topology_files_validate(tmp_path):
    for name in ("lan", "wifi_wan", "cellular"):
        assert load_topology(f"examples/topologies/{name}.yaml").name == name
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ntiers: {device: {memory_mb: 1}}\nlinks: {}\nworkload: [{prompt_tokens: 1, output_tokens: 1}]\n"
    )
    with pytest.raises(TopologyError, match="tiers must be exactly"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(tmp_path / "none.yaml")


@pytest.fixture()
def plan_dir(tiny_glm, tmp_path):
    out = tmp_path / "plan"
    export_plan(
        tiny_glm,
        {
            "splits": [2, 4],
            "codecs": {"device_edge": "fp16", "edge_cloud": "fp16"},
            "compression": {"device": {"name": "int8", "passes": [{"pass": "int8", "activations": "bf16"}]}},
        },
        out,
    )
    return out


def test_exported_tiers_rebuild_the_model(plan_dir, tiny_glm):
    plan_json = json.loads((plan_dir / "plan.json").read_text())
    assert plan_json["splits"] == [2, 4] and len(plan_json["plan_id"]) == 16
    for tier in ("device", "edge", "cloud"):
        manifest = json.loads((plan_dir / tier / "manifest.json").read_text())
        assert manifest["plan_id"] == plan_json["plan_id"] and "model.safetensors" in manifest["files"]
    ids = torch.arange(10)
    cloud = load_tier(plan_dir, "cloud")
    reference = Segment.from_checkpoint(tiny_glm, 4, 6, head=True)
    hidden = torch.randn(10, C)
    torch.testing.assert_close(
        cloud([SegmentInput("s", 0, hidden=hidden)])[0],
        reference([SegmentInput("s", 0, hidden=hidden)])[0],
        atol=0,
        rtol=0,
    )
    device = load_tier(plan_dir, "device")
    assert type(device.layers["0"].mlp.down_proj).__name__ == "Int8Linear"  # compression applied on load
    assert device([SegmentInput("s", 0, input_ids=ids)])[0].shape == (10, C)


def test_tampered_artifact_is_refused(plan_dir):
    weights = plan_dir / "edge" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors has sha256"):
        load_tier(plan_dir, "edge")
    (plan_dir / "cloud" / "config.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_tier(plan_dir, "cloud")


def test_plan_for_another_model_is_refused(plan_dir):
    with pytest.raises(ArtifactError, match="this deployment serves"):
        load_tier(plan_dir, "device", expect_model="0123456789abcdef")
    manifest = plan_dir / "device" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["plan_id"] = "another"
    manifest.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="plan_id"):
        load_tier(plan_dir, "device")


def test_onnx_tier_loads_as_onnx_and_matches_torch(tiny_glm, tmp_path):
    from runtime.backends import OnnxSegment

    out = tmp_path / "plan"
    onnx_fp32 = {"name": "none", "backend": "onnxruntime", "passes": [], "onnx": {"precision": "fp32"}}
    export_plan(
        tiny_glm,
        {
            "splits": [2, 4],
            "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"},
            "compression": {"device": onnx_fp32},
        },
        out,
    )
    device = load_tier(out, "device")
    assert isinstance(device, OnnxSegment)
    ids = torch.arange(9)
    reference = Segment.from_checkpoint(tiny_glm, 0, 2, embed=True)
    torch.testing.assert_close(
        device([SegmentInput("s", 0, input_ids=ids)])[0],
        reference([SegmentInput("s", 0, input_ids=ids)])[0],
        atol=1e-4,
        rtol=0,
    )


def test_tier_profile_file_is_resolved_and_checked(tmp_path):
    from partitioner.plan.partition import PlanError, _tier_choices

    shipped = Path("examples/profiles/smollm2_135m_h100_fp32.json").resolve()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "h100.json").write_text(shipped.read_text())
    yaml_text = (
        Path("examples/topologies/lan.yaml").read_text().replace("speed_factor: 8.0", "profile: profiles/h100.json")
    )
    (tmp_path / "t.yaml").write_text(yaml_text)
    topo = load_topology(tmp_path / "t.yaml")
    assert topo.tiers["cloud"].profile == str(tmp_path / "profiles" / "h100.json")
    data = {"profiles": {}, "compression": {}}
    assert _tier_choices(topo, data, 30)["cloud"][0].profile.machine.startswith("NVIDIA")
    with pytest.raises(PlanError, match="describes 30 layers, the model has 6"):
        _tier_choices(topo, data, 6)
    (tmp_path / "profiles" / "h100.json").unlink()
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(tmp_path / "t.yaml")


def test_gpu_weights_belong_to_the_cloud_and_reach_its_compression_entry():
    from partitioner.plan.partition import tier_compressions

    topo = topology(tiers={"cloud": {"gpu_weights": "fp8"}})
    entries = tier_compressions(topo, {"device": "none", "edge": "int8", "cloud": "none"})
    assert entries["cloud"]["gpu_weights"] == "fp8" and "gpu_weights" not in entries["edge"]
    assert entries["edge"]["passes"] and not entries["cloud"]["passes"]
    with pytest.raises(ValueError, match="gpu_weights is the cloud tier's setting"):
        topology(tiers={"edge": {"gpu_weights": "fp8"}})
