"""ONNX Runtime profiles of the whole model and a planner that honours each tier's backend."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

pytest.importorskip("onnxruntime")

from partitioner.plan.measure import ONNX, compression_entry, key  # noqa: E402
from partitioner.plan.partition import _tier_choices, tier_backend  # noqa: E402
from partitioner.plan.profiler_onnx import SHARED, _attribute, export_whole_model, profile_exported  # noqa: E402
from partitioner.plan.topology import Topology  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_glm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-whole")
    export_whole_model(tiny_glm, folder, keep_fp32=["layers.0.*"])
    return folder


@pytest.fixture(scope="module", params=["fp32", "int8"])
def profile(request, exported, tiny_glm):
    return profile_exported(exported, tiny_glm, 1, request.param, prompt_tokens=16, decode_steps=3, repeats=2)


def test_every_stage_has_positive_cost(profile):
    assert profile.backend == ONNX
    assert sorted(profile.layers) == list(range(6))
    for cost in [profile.embed, profile.head, *profile.layers.values()]:
        assert cost.prefill_ms_per_token > 0 and cost.decode_ms > 0 and cost.weight_bytes > 0


def test_int8_layers_are_smaller_except_kept_ones(exported, tiny_glm):
    fp32 = profile_exported(exported, tiny_glm, 1, "fp32", prompt_tokens=4, decode_steps=1, repeats=1)
    int8 = profile_exported(exported, tiny_glm, 1, "int8", prompt_tokens=4, decode_steps=1, repeats=1)
    assert int8.layers[0].weight_bytes == pytest.approx(fp32.layers[0].weight_bytes, rel=0.05)  # kept fp32
    assert all(int8.layers[i].weight_bytes < 0.5 * fp32.layers[i].weight_bytes for i in range(1, 6))


def test_unknown_kernels_take_the_next_known_stage():
    stages = {"a": "embed", "r": SHARED, "m": "0", "n": "1"}
    names = ["a", "r", "x_QuantizeLinear", "m_quant", "y", "n/Fusion/", "z"]
    assert _attribute(names, stages) == ["embed", SHARED, "0", "0", "1", "1", SHARED]


def _topology(device_backend: str) -> Topology:
    tier = {"threads": 1, "memory_mb": 1024}
    return Topology.model_validate(
        {
            "name": "t",
            "tiers": {
                "device": {**tier, "backend": device_backend},
                "edge": {**tier, "backend": "torch"},
                "cloud": {**tier, "backend": "onnxruntime"},  # the cloud is planned with torch anyway
            },
            "links": {n: {"bandwidth_mbit_s": 10, "rtt_ms": 1} for n in ("device_edge", "edge_cloud")},
            "workload": [{"prompt_tokens": 8, "output_tokens": 4}],
        }
    )


def test_tier_choices_use_the_tiers_backend(profile):
    torch_profile = replace(profile, backend="torch")
    quality = {"perplexity_delta_pct": 0.6, "token_agreement": 0.9}
    data = {
        "profiles": {
            key("torch", "none", 1): asdict(torch_profile),
            key(ONNX, "none", 1): asdict(profile),
            key(ONNX, "int8", 1): asdict(profile),
        },
        "compression": {"none": {**quality, "perplexity_delta_pct": 0.0}, key(ONNX, "none"): quality},
    }
    topo = _topology("onnxruntime")
    assert [tier_backend(topo, t) for t in ("device", "edge", "cloud")] == [ONNX, "torch", "torch"]
    choices = _tier_choices(topo, data, 6)
    assert [(c.name, c.profile.backend) for c in choices["device"]] == [("none", ONNX)]  # int8: no quality yet
    assert choices["device"][0].perplexity_delta_pct_per_layer == pytest.approx(0.1)
    assert [c.profile.backend for c in choices["edge"] + choices["cloud"]] == ["torch", "torch"]
    assert [c.profile.backend for c in _tier_choices(_topology("torch"), data, 6)["device"]] == ["torch"]


def test_plan_entry_records_the_backend():
    entry = compression_entry(ONNX, "int8")
    assert entry["backend"] == ONNX and entry["passes"] == [] and entry["onnx"]["precision"] == "int8"
    assert compression_entry("torch", "int8")["passes"][0]["pass"] == "int8"
