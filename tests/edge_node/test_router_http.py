"""The router through the edge's OpenAI-compatible HTTP API: the ``splitglm`` object of each answer.

A real in-process EdgeNode serves HTTP (the official ``openai`` client) and
reaches a real ``python -m cloud_service`` through a delaying TCP proxy. The
tiny model's plan has no tokenizer, so its edge gets the character tokenizer
of ``tests/local_chain.py``; the slow test serves the real demo model with its
compressed (int8) fast tail.
"""

from __future__ import annotations

import openai
import pytest

from partitioner.plan.demo import demo_plan
from splitglm.linkproxy import DelayProxy
from tests.edge_node.test_cloud_client import start_cloud
from tests.edge_node.test_router import cloud, exact_plan, proxy, start_edge  # noqa: F401 -- fixtures
from tests.local_chain import char_tokenizer

FIELDS = {"tokens", "paths", "path", "switches", "predicted_ms", "actual_ms", "timings_ms", "latency_budget_ms",
          "budget_met", "degraded", "policy", "stages_ms", "speculative"}


def complete(client: openai.OpenAI, max_tokens: int, **extra) -> dict:
    """A greedy completion; its ``splitglm`` object (checked for every field)."""
    r = client.completions.create(model="m", prompt="The cat sat on", max_tokens=max_tokens, temperature=0,
                                  extra_body=extra)
    info = r.model_extra["splitglm"]
    assert set(info) == FIELDS and len(info["paths"]) == r.usage.completion_tokens
    assert info["actual_ms"] == info["timings_ms"]["total"]
    return info


def streamed(client: openai.OpenAI, max_tokens: int, on_chunk, **extra) -> dict:
    """A streamed greedy chat completion; ``on_chunk(i)`` per text chunk; the final chunk's ``splitglm`` object."""
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                            max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra)
    info = None
    for i, c in enumerate(chunks):
        on_chunk(i)
        info = (c.model_extra or {}).get("splitglm") or info
    assert info is not None and set(info) == FIELDS
    return info


@pytest.fixture()
def client(exact_plan, proxy):  # noqa: F811 -- the imported fixtures
    node = start_edge(exact_plan, proxy.address, model_name="m")
    node.tokenizer = char_tokenizer()  # the tiny plan has none; ids 0..95 match the tiny vocabulary
    try:
        yield openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=60)
    finally:
        node.close()


def test_splitglm_object_of_tight_loose_and_switched_answers(client, proxy):  # noqa: F811
    proxy.set_rtt(80)
    assert complete(client, 22, policy="accurate")["path"] == "accurate"  # warm-up: measured estimates
    assert complete(client, 22, policy="fast")["path"] == "fast"

    tight = complete(client, 8, latency_budget_ms=500)  # the cloud would need ~8 x 80 ms
    assert tight["path"] == "fast" and tight["paths"] == ["fast"] * 8 and tight["switches"] == []
    assert tight["policy"] == "adaptive" and tight["latency_budget_ms"] == 500 and tight["budget_met"] is True
    assert tight["degraded"] is False and 0 < tight["predicted_ms"] < 500 and tight["actual_ms"] <= 500

    loose = complete(client, 8, latency_budget_ms=20_000)
    assert loose["path"] == "accurate" and loose["paths"] == ["accurate"] * 8 and loose["budget_met"] is True
    assert 0.5 * loose["actual_ms"] < loose["predicted_ms"] < 2 * loose["actual_ms"]

    none = complete(client, 4)
    assert none["path"] == "accurate" and none["budget_met"] is None and none["latency_budget_ms"] is None

    def slow_down(i: int) -> None:
        if i == 3:
            proxy.set_rtt(600)

    switched = streamed(client, 30, slow_down, latency_budget_ms=5000)
    k = switched["switches"][0]["token"]
    assert [s["reason"] for s in switched["switches"]] == ["deadline"] and switched["path"] == "mixed"
    assert switched["paths"] == ["accurate"] * k + ["fast"] * (30 - k) and 3 <= k <= 12
    assert switched["budget_met"] is True and switched["degraded"] is False


@pytest.mark.slow
def test_demo_model_splitglm_object_for_tight_and_loose_budgets(demo_checkpoint):
    plan = str(demo_plan(demo_checkpoint, codecs=("fp32", "fp32")))  # the default fast tail: int8, compressed
    proc, address = start_cloud(plan)
    host, port = address.rsplit(":", 1)
    link = DelayProxy(host, int(port), rtt_ms=150).start()
    node = start_edge(plan, link.address, model_name="m")
    try:
        c = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=300)
        warm = {p: complete(c, 22, policy=p) for p in ("accurate", "fast")}
        assert warm["accurate"]["paths"] == ["accurate"] * 22 and warm["fast"]["paths"] == ["fast"] * 22
        accurate_ms, fast_ms = (warm[p]["actual_ms"] * 12 / 22 for p in ("accurate", "fast"))  # for 12 tokens
        assert accurate_ms > 2 * fast_ms, warm  # 150 ms a step on the link: the fast tail is well ahead

        tight_ms = int((accurate_ms + fast_ms) / 2)
        tight = complete(c, 12, latency_budget_ms=tight_ms)
        assert tight["path"] == "fast" and tight["budget_met"] is True and tight["predicted_ms"] < tight_ms
        loose = complete(c, 12, latency_budget_ms=int(5 * accurate_ms))
        assert loose["path"] == "accurate" and loose["budget_met"] is True and loose["switches"] == []
        assert 0.5 * loose["actual_ms"] < loose["predicted_ms"] < 2 * loose["actual_ms"]

        def slow_down(i: int) -> None:
            if i == 3:
                link.set_rtt(3000)

        switched = streamed(c, 24, slow_down, latency_budget_ms=int(3 * accurate_ms * 24 / 12))
        assert [s["reason"] for s in switched["switches"]] == ["deadline"] and switched["budget_met"] is True
        replay = node.estimates.fast.stats["replay"]
        assert replay.count == 1 and replay.last > 0  # ms per history position, measured
    finally:
        node.close()
        link.stop()
        proc.stop()
