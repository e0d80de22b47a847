"""Baselines on one topology: whole model on the cloud / edge / device against the live split."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import pytest
import yaml

from partitioner.plan.live_tiers import _REQUEST
from splitglm.bench_baselines import bench_baselines

SYSTEMS = ("device-only", "edge-only", "cloud-only", "split-accurate", "split-fast")
EDGE_CLOUD_RTT_MS = 200.0


def _char_tokenizer(folder) -> None:
    """One token per printable ASCII character: the tiny model's 96 ids round-trip through text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={chr(32 + i): i for i in range(96)}, merges=[]))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


def _topology(path) -> str:
    tier = {"threads": 1, "memory_mb": 1024, "speed_factor": 1.0}
    topo = {
        "name": "baselines-test",
        "tiers": {"device": {**tier, "memory_mb": 0.1}, "edge": tier, "cloud": tier},
        "links": {
            "device_edge": {"bandwidth_mbit_s": 100, "rtt_ms": 10},
            "edge_cloud": {"bandwidth_mbit_s": 100, "rtt_ms": EDGE_CLOUD_RTT_MS},
        },
        "workload": [{"prompt_tokens": 8, "output_tokens": 4}],
    }
    path.write_text(yaml.safe_dump(topo))
    return str(path)


@pytest.mark.slow
def test_baselines_rows(tiny_glm, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_glm, model)
    _char_tokenizer(model)
    split = {
        "splits": [2, 4],
        "codecs": {"device_edge": "fp32", "edge_cloud": "fp32"},
        "compression": {"device": "none", "edge": "none", "cloud": "none"},
    }
    try:
        rows = bench_baselines(str(model), _topology(tmp_path / "topo.yaml"), split, prompt_tokens=8,
                               decode_steps=3, repeats=1)
    finally:
        assert [p for p in mp.active_children() if p.name.startswith("splitglm-live")] == []
    by = {r["system"]: r for r in rows}
    assert tuple(by) == SYSTEMS
    for r in rows:
        assert r["ttft_ms"] > 0 and r["per_token_p50_ms"] > 0 and r["per_token_p99_ms"] >= r["per_token_p50_ms"]
        assert r["repeats"] == 1 and r["prompt_tokens"] == 8 and r["decode_steps"] == 3
    cloud, edge, device, split_row = by["cloud-only"], by["edge-only"], by["device-only"], by["split-accurate"]
    assert cloud["ttft_ms"] - edge["ttft_ms"] >= 0.9 * EDGE_CLOUD_RTT_MS
    # the text's bytes + the request's header (steps, kind) + the message's length prefix
    assert cloud["uplink_bytes"] == edge["uplink_bytes"] == cloud["prompt_text_bytes"] + _REQUEST.size + 4
    assert cloud["prompt_text_bytes"] == 8  # one byte per character of the char tokenizer
    assert cloud["uplink_bytes"] < split_row["uplink_bytes"]
    assert device["uplink_bytes"] == 0 and device["leaves_device"] == "nothing" and not device["fits"]
    assert cloud["tokens_equal_whole_model"] and edge["tokens_equal_whole_model"]
    assert split_row["tokens_equal_whole_model"]
    assert split_row["leaves_device"].startswith("hidden states of layer 2, encoded with fp32")
    assert cloud["per_token_p50_ms"] < EDGE_CLOUD_RTT_MS / 2  # streamed: a token does not wait for the link
