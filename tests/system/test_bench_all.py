"""``splitglm bench all`` at its smallest: every section through the real parts (processes, Mosquitto with the
secure configuration, gRPC, shaped links), on the tiny model with a character tokenizer; the report's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitglm.bench.all import GPU_RESULT, SECTIONS, TOPOLOGIES, bench_all, tiny_scale

GPL3 = "/usr/share/common-licenses/GPL-3"
APACHE = "/usr/share/common-licenses/Apache-2.0"


def test_a_section_list_is_checked():
    with pytest.raises(ValueError, match="unknown sections"):
        bench_all("/nonexistent", sections=("codecs", "latency"))
    with pytest.raises(ValueError, match="give the splits section too"):
        bench_all("/nonexistent", sections=("baselines",))


@pytest.mark.slow
def test_bench_all_writes_every_section(talking_model, tmp_path):
    lines = []
    results = bench_all(tmp_path, model=talking_model, scale=tiny_scale(), topologies=TOPOLOGIES[:1],
                        texts=(GPL3, APACHE), say=lines.append)
    assert results["errors"] == {}, results["errors"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["sections"] == list(SECTIONS) and saved["machine"]["cores"] >= 1
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ("## 1. Codecs", "## 2. Splits", "## 3. Baselines", "## 4. Router", "## 5. Batching",
                    "## 6. MQTT fan-in"):
        assert heading in report
    for plot in ("codecs.png", "splits.png", "baselines.png", "batching.png"):
        assert (tmp_path / plot).stat().st_size > 1000

    codecs = saved["codecs"]
    assert {r["text"] for r in codecs} == {"GPL-3", "Apache-2.0"}
    assert all(r["bytes_per_element"] > 0 and r["step_bytes_per_element"] > r["bytes_per_element"] for r in codecs)
    assert {r["codec"]: r["perplexity_delta_pct"] for r in codecs if r["codec"] == "fp32"} == {"fp32": 0.0}

    (split,) = saved["splits"]
    assert split["topology"] == "lan" and split["chosen_over_best"] >= 1.0
    measured = [c["measured"]["expected_ms"] for c in split["candidates"]]
    assert split["chosen_over_best"] == pytest.approx(measured[0] / min(measured), abs=1e-4)
    assert all(m["measured_rtt_ms"] >= 0.9 * m["rtt_ms"] for m in split["links"].values())

    by_system = {r["system"]: r for r in saved["baselines"]}
    assert set(by_system) >= {"cloud-only", "edge-only", "device-only", "split-accurate", "split-fast",
                              "split-speculative"}
    for r in saved["baselines"]:
        assert {"system", "topology", "ttft_ms", "per_token_p50_ms", "uplink_bytes", "leaves_device"} <= set(r)
        assert r["per_token_p50_ms"] >= 0 and r.get("per_token_mean_ms", 1) > 0
    assert by_system["split-speculative"]["per_token_mean_ms_without"] > 0
    assert by_system["device-only"]["uplink_bytes"] == 0 and by_system["device-only"]["leaves_device"] == "nothing"
    assert by_system["cloud-only"]["leaves_device"].startswith("raw text")
    assert by_system["split-accurate"]["uplink_bytes"] > 0

    router = saved["router"]
    assert {(r["policy"], r["speculate"]) for r in router} == {(p, s) for p in ("adaptive", "accurate", "fast")
                                                              for s in (False, True)}
    assert all(r["errors"] == 0 and r["requests"] == tiny_scale().router_requests for r in router)

    cpu = saved["batching"]["cpu"]
    assert [r["sessions"] for r in cpu] == list(tiny_scale().cloud_sessions)
    assert all(r["decode_steps_per_s"] > 0 for r in cpu)
    if Path(GPU_RESULT).exists():
        assert saved["batching"]["gpu"]["card"] and saved["batching"]["gpu"]["date"]

    fanin = saved["fanin"]
    assert [r["devices"] for r in fanin] == list(tiny_scale().fanin_devices)
    for r in fanin:
        assert r["readings"] == r["devices"] * tiny_scale().fanin_readings
        assert r["delivered"] == r["readings"] and r["lost"] == 0 and r["duplicated"] == 0
    assert any("fan-in" in line for line in lines)
