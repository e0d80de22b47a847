"""Fair shares (``edge_node.shares``): the accounting, and the HTTP API's per-key quotas through a real uvicorn server.

The accounting: acquire and release per holder, exact and idempotent, under
concurrent threads, each refusal naming its setting and counted without the
holder as a label. The HTTP side (``tests/local_chain.py``'s TestNode, API
keys on): a key at its session or KV-position quota gets a 429 with OpenAI's
error body and ``Retry-After`` while another key is served, and whatever way
a request ends (done, streamed, failed, walked away from) its share comes back.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client import CollectorRegistry

from edge_node.http_api import create_app
from edge_node.metrics import EdgeMetrics
from edge_node.shares import FrameRates, Quota, QuotaExceeded, Shares
from runtime.rates import RateBuckets
from tests.edge_node.test_relay import wait_until
from tests.local_chain import TestNode, char_tokenizer, serve

COMPLETIONS = "/v1/completions"


def refusals(metrics: EdgeMetrics, limit: str, kind: str) -> float:
    value = metrics.registry.get_sample_value("splitglm_edge_quota_refusals_total", {"limit": limit, "kind": kind})
    return value or 0.0


def device_shares(metrics=None, sessions: int = 2, positions: int = 100) -> Shares:
    return Shares("device", Quota("sessions", "device_max_sessions", "sessions", sessions),
                  Quota("kv_positions", "device_max_kv_positions", "KV positions", positions), metrics)


# ---- the accounting -------------------------------------------------------------------------------------


def test_acquire_refuse_and_release_per_holder():
    metrics = EdgeMetrics(CollectorRegistry())
    shares = device_shares(metrics)
    shares.acquire("dev-a", "s1", 40)
    shares.acquire("dev-a", "s2", 40)
    with pytest.raises(QuotaExceeded) as refused:
        shares.acquire("dev-a", "s3", 1)  # a third session
    assert refused.value.status == "RESOURCE_EXHAUSTED" and refused.value.quota.limit == "sessions"
    assert "device_max_sessions is 2 sessions per device; this device holds 2" in str(refused.value)
    shares.acquire("dev-b", "s4", 100)  # another device is not held back by dev-a's sessions
    assert shares.held("dev-a") == (2, 80) and shares.held("dev-b") == (1, 100)
    assert shares.release("s1") and not shares.release("s1")  # idempotent
    with pytest.raises(QuotaExceeded, match="device_max_kv_positions is 100 KV positions per device; this device "
                       "holds 40 and asked for 61 more"):
        shares.acquire("dev-a", "s5", 61)
    with pytest.raises(QuotaExceeded, match="device_max_kv_positions"):
        shares.acquire("dev-c", "s6", 101)  # one session larger than the whole share
    shares.acquire("dev-a", "s5", 60)
    assert shares.held("dev-a") == (2, 100)
    for key in ("s2", "s4", "s5"):
        assert shares.release(key)
    assert shares.holders() == 0 and shares.held("dev-a") == (0, 0)
    assert refusals(metrics, "sessions", "device") == 1 and refusals(metrics, "kv_positions", "device") == 2
    labels = {s.labels["kind"] for m in metrics.registry.collect() for s in m.samples
              if s.name.startswith("splitglm_edge_quota_refusals")}
    assert labels == {"device"}  # the holder's id is never a label
    shares.acquire("dev-a", "s7", 1)
    with pytest.raises(ValueError, match="held already"):
        shares.acquire("dev-a", "s7", 1)  # one key is held once


def test_zero_is_no_limit():
    shares = device_shares(sessions=0, positions=0)
    for i in range(50):
        shares.acquire("dev", i, 10_000)
    assert shares.held("dev") == (50, 500_000)


def test_concurrent_acquire_and_release_never_pass_the_limit_and_end_at_zero():
    metrics = EdgeMetrics(CollectorRegistry())
    shares = device_shares(metrics, sessions=3, positions=1_000)
    start, peaks, taken, errors = threading.Barrier(8), [], [0] * 8, []

    def work(i: int) -> None:
        holder, peak = f"dev-{i % 2}", 0
        start.wait()
        for n in range(400):
            try:
                shares.acquire(holder, (i, n), 100)
            except QuotaExceeded:
                continue
            taken[i] += 1
            count, amount = shares.held(holder)
            peak = max(peak, count)
            if amount > 1_000:
                errors.append(amount)
            shares.release((i, n))
        peaks.append(peak)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and max(peaks) <= 3 and sum(taken) > 0
    assert shares.holders() == 0 and shares.held("dev-0") == shares.held("dev-1") == (0, 0)
    assert refusals(metrics, "sessions", "device") == 8 * 400 - sum(taken)


def test_rates_per_second_refill_and_frame_rates_refuse_by_name():
    now = [0.0]
    buckets = RateBuckets(3, clock=lambda: now[0], period_s=1.0)
    assert [buckets.take("d") for _ in range(3)] == [0.0] * 3
    assert buckets.take("d") == pytest.approx(1 / 3) and buckets.take("e") == 0.0  # per client
    now[0] = 0.5  # 1.5 tokens back
    assert buckets.take("d") == 0.0 and buckets.take("d") > 0
    metrics = EdgeMetrics(CollectorRegistry())
    rates = FrameRates(type("S", (), {"device_frames_per_s": 2})(), metrics)
    rates.buckets.clock = lambda: now[0]
    rates.take("d")
    rates.take("d")
    with pytest.raises(QuotaExceeded, match="device_frames_per_s is 2 frames per second per device; retry in"):
        rates.take("d")
    assert refusals(metrics, "frames_rate", "device") == 1


# ---- the HTTP API, per key ------------------------------------------------------------------------------


@pytest.fixture()
def keyed(tiny_glm, tmp_path):
    """start(**settings) -> (node, app, {key index: httpx client}) for a TestNode served with two API keys."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("key-zero\nkey-one\n")
    opened = []

    def start(**settings):
        node = TestNode(tiny_glm, char_tokenizer(), 1, 3, api_keys_file=keys_file, **settings)
        app = create_app(node)
        context = serve(app)
        url = context.__enter__()
        opened.append(context)
        clients = {}
        for i, key in enumerate(("key-zero", "key-one")):
            clients[i] = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})
            opened.append(clients[i])
        return node, app, clients

    yield start
    for item in reversed(opened):
        item.__exit__(None, None, None)


def body(max_tokens: int, stream: bool = False) -> dict:
    return {"prompt": "abcde", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


@pytest.mark.parametrize("limit, settings, setting", [
    ("sessions", {"key_max_sessions": 1}, "key_max_sessions is 1 sessions"),
    ("kv_positions", {"key_max_kv_positions": 40}, "key_max_kv_positions is 40 KV positions"),
])
def test_a_key_at_its_quota_gets_429_while_another_key_is_served(keyed, limit, settings, setting):
    node, app, http = keyed(**settings)
    node.downstream.delay_s = 0.05  # the first request holds its share for a second or so
    first = {}
    runner = threading.Thread(target=lambda: first.update(r=http[0].post(COMPLETIONS, json=body(20))))
    runner.start()
    try:
        assert wait_until(lambda: app.state.shares.held("key:0") == (1, 25))  # 5 prompt tokens + 20
        refused = http[0].post(COMPLETIONS, json=body(20))
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded" and error["type"] == "requests" and setting in error["message"]
        assert "API key" in error["message"]
        other = http[1].post(COMPLETIONS, json=body(4))  # another key is served meanwhile
        assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 4
    finally:
        runner.join(60)
    assert first["r"].status_code == 200
    assert refusals(node.metrics, limit, "key") == 1
    assert app.state.shares.holders() == 0  # every share given back
    again = http[0].post(COMPLETIONS, json=body(4))
    assert again.status_code == 200


def test_the_share_comes_back_however_a_request_ends(keyed):
    node, app, http = keyed(key_max_sessions=1)
    shares = app.state.shares
    assert http[0].post(COMPLETIONS, json=body(3, stream=True)).status_code == 200  # streamed to its end
    assert wait_until(lambda: shares.holders() == 0)
    node.downstream.fail = (14, "the cloud is gone")  # UNAVAILABLE on every step: 503
    assert http[0].post(COMPLETIONS, json=body(3)).status_code == 503
    assert shares.holders() == 0
    node.downstream.fail_after = 2  # fails mid-stream: an error event
    assert "the cloud is gone" in http[0].post(COMPLETIONS, json=body(6, stream=True)).text
    assert wait_until(lambda: shares.holders() == 0)
    node.downstream.fail, node.downstream.delay_s = None, 0.1
    with http[0].stream("POST", COMPLETIONS, json=body(30, stream=True)) as r:  # walked away from
        next(r.iter_lines())
    assert wait_until(lambda: shares.holders() == 0)
    try:
        http[0].post(COMPLETIONS, json=body(30), timeout=0.3)  # a plain request walked away from
    except httpx.TimeoutException:
        pass
    assert wait_until(lambda: shares.holders() == 0)
    assert wait_until(lambda: node.open_sessions() == 0)
    node.downstream.delay_s = 0.0
    assert http[0].post(COMPLETIONS, json=body(2)).status_code == 200
    assert refusals(node.metrics, "sessions", "key") == 0
