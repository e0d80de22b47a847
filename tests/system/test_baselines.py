"""Baselines on one topology: the whole model on the cloud / edge / device against the split, all on the live
rig (real processes, the link proxy on every link), checked against the model run in one process."""

from __future__ import annotations

import psutil
import pytest
import torch
import yaml

from runtime.local import Chain, split_segments
from splitglm.bench.baselines import bench_baselines

pytestmark = pytest.mark.slow
SYSTEMS = ("device-only", "edge-only", "cloud-only", "split-accurate", "split-fast")
DEVICE_EDGE_RTT_MS, EDGE_CLOUD_RTT_MS = 10.0, 200.0
PROMPT_TOKENS, DECODE_STEPS = 8, 3
HTTP_ENVELOPE_BYTES = 600  # most an HTTP request line, its headers and the JSON body's other fields add to the text


def _topology(path) -> str:
    tier = {"threads": 1, "memory_mb": 1024, "speed_factor": 1.0}
    topo = {
        "name": "baselines-test",
        "tiers": {"device": {**tier, "memory_mb": 0.1}, "edge": tier, "cloud": tier},
        "links": {
            "device_edge": {"bandwidth_mbit_s": 100, "rtt_ms": DEVICE_EDGE_RTT_MS},
            "edge_cloud": {"bandwidth_mbit_s": 100, "rtt_ms": EDGE_CLOUD_RTT_MS},
        },
        "workload": [{"prompt_tokens": PROMPT_TOKENS, "output_tokens": 4}],
    }
    path.write_text(yaml.safe_dump(topo))
    return str(path)


def test_baselines_rows(talking_model, tmp_path):
    split = {
        "splits": [2, 4],
        "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"},
        "compression": {"device": "none", "edge": "none", "cloud": "none"},
    }
    # the bench's prompt (seed 0), and the whole model's greedy tokens for it, in this process
    ids = torch.randint(0, 96, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = [t for t, _ in Chain(split_segments(talking_model, 2, 4)).generate(ids, DECODE_STEPS + 1)]
    before = set(psutil.Process().children(recursive=True))
    rows = bench_baselines(talking_model, _topology(tmp_path / "topo.yaml"), split, prompt_tokens=PROMPT_TOKENS,
                           decode_steps=DECODE_STEPS, repeats=1)
    left = set(psutil.Process().children(recursive=True)) - before
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    by = {r["system"]: r for r in rows}
    assert tuple(by) == SYSTEMS
    for r in rows:
        assert r["ttft_ms"] > 0 and r["per_token_p50_ms"] > 0 and r["per_token_p99_ms"] >= r["per_token_p50_ms"]
        assert r["repeats"] == 1 and r["prompt_tokens"] == PROMPT_TOKENS and r["decode_steps"] == DECODE_STEPS
        assert len(r["tokens"]) == DECODE_STEPS + 1
    cloud, edge, device, split_row = by["cloud-only"], by["edge-only"], by["device-only"], by["split-accurate"]
    # the character tokenizer round-trips the prompt: every exact system gives the in-process model's tokens
    for system in ("device-only", "edge-only", "cloud-only", "split-accurate"):
        assert by[system]["tokens"] == expected, system
        assert by[system]["tokens_equal_whole_model"], system
    assert device["uplink_bytes"] == device["downlink_bytes"] == 0 and device["leaves_device"] == "nothing"
    assert not device["fits"]  # 0.1 MB of device memory
    # the whole-model servers get the prompt's raw text (one byte per character here) in one HTTP request
    assert cloud["prompt_text_bytes"] == PROMPT_TOKENS
    assert cloud["uplink_bytes"] == edge["uplink_bytes"]
    assert PROMPT_TOKENS < cloud["uplink_bytes"] < PROMPT_TOKENS + HTTP_ENVELOPE_BYTES
    assert cloud["leaves_device"].startswith("raw text")
    assert cloud["uplink_bytes"] < split_row["uplink_bytes"]  # 8 positions of 64 fp32 hidden states weigh more
    assert split_row["leaves_device"].startswith("hidden states of layer 2, encoded with fp32")
    # the links' delays: the cloud is one edge-cloud round trip further; its tokens stream back
    assert cloud["ttft_ms"] - edge["ttft_ms"] >= 0.9 * EDGE_CLOUD_RTT_MS
    assert cloud["per_token_p50_ms"] < EDGE_CLOUD_RTT_MS / 2
    # a split step crosses both links; the fast tail's never reaches the cloud
    assert split_row["per_token_p50_ms"] >= 0.9 * (DEVICE_EDGE_RTT_MS + EDGE_CLOUD_RTT_MS)
    assert by["split-fast"]["per_token_p50_ms"] < EDGE_CLOUD_RTT_MS
