"""The cloud's /metrics (metrics_port): a batch of 4 sessions in the batch-size histogram, the KV pool, prompt
chunks, verifications, the process collectors; off by default."""

from __future__ import annotations

import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cloud_service.settings import CloudSettings
from protos import splitglm_pb2 as pb
from protos.frames import make_frame

from .conftest import Run, Stream, start_cloud
from .test_verify import verify_frame


def scrape(port: int) -> dict[str, float]:
    """Every sample of the cloud's /metrics: 'name{label="value",...}' (labels sorted) -> value."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def batch_of_four(cloud, edge) -> None:
    """Four sessions' first steps queued while the scheduler is held, so they run as one pass."""
    entered, hold = threading.Event(), threading.Event()
    cloud.batcher.scheduler.call(lambda: (entered.set(), hold.wait(10)))
    assert entered.wait(10)  # the scheduler's thread is inside the call: what comes now waits for one step
    runs = [Run(edge, cloud.port, [3 + i, 7, 9], 2) for i in range(4)]
    threads = [threading.Thread(target=run) for run in runs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while cloud.batcher.scheduler.queued() < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    hold.set()
    for thread in threads:
        thread.join(30)
    assert all(len(run.results) == 2 for run in runs)


def test_a_batch_of_4_sessions_shows_in_the_batch_size_histogram(tiny_plan, edge):
    with start_cloud(tiny_plan, metrics_port=0) as cloud:
        before = scrape(cloud.metrics.port)
        assert before["splitglm_cloud_batch_size_count"] == 0 and before["splitglm_cloud_sessions"] == 0
        assert "process_cpu_seconds_total" in before and "python_gc_objects_collected_total{generation=\"0\"}" in before
        batch_of_four(cloud, edge)
        session, prompt = "long", list(range(1, 21))  # 20 positions: a prompt run in a chunk
        stream = Stream(cloud.port)
        params = pb.GenerationParams(max_tokens=8)
        first = stream.step(make_frame(session, 0, 0, edge.hidden(session, 0, prompt), codec="fp32", params=params))
        during = scrape(cloud.metrics.port)
        stream.step(verify_frame(edge, session, 1, len(prompt), first.tokens[0], [5, 6]))
        stream.end()
        edge.close(session)
        after = scrape(cloud.metrics.port)

    bucket = 'splitglm_cloud_batch_size_bucket{{le="{}"}}'.format
    at_least_4 = after[bucket("+Inf")] - after[bucket("3.0")]
    assert at_least_4 >= 1, "no pass of 4 sessions was observed"
    assert after["splitglm_cloud_step_tokens_sum"] >= 4 * 3 + 4 + 20 + 3  # prompts, decode rows, long, verify
    assert after["splitglm_cloud_step_seconds_count"] == after["splitglm_cloud_batch_size_count"] > 0
    assert after["splitglm_cloud_prefill_positions_total"] == 4 * 3 + 20
    assert after["splitglm_cloud_prefill_chunks_total"] == 1
    assert after["splitglm_cloud_verifications_total"] == after["splitglm_cloud_verify_step_seconds_count"] == 1
    assert after["splitglm_cloud_eager_passes_total"] == after["splitglm_cloud_step_seconds_count"]  # the CPU
    assert after["splitglm_cloud_cuda_graph_replays_total"] == 0
    assert during["splitglm_cloud_sessions"] == 1 and after["splitglm_cloud_sessions"] == 0
    assert during["splitglm_cloud_kv_pages_used"] > 0 == after["splitglm_cloud_kv_pages_used"]
    assert after["splitglm_cloud_kv_pages_free"] > 0 and after["splitglm_cloud_queue_depth"] == 0


def test_metrics_are_off_by_default_and_take_flags(tiny_plan):
    assert CloudSettings(plan=tiny_plan).metrics_port is None
    settings = CloudSettings.load(["--plan", tiny_plan, "--metrics-port", "9464", "--metrics-host", "0.0.0.0"])
    assert (settings.metrics_port, settings.metrics_host) == (9464, "0.0.0.0")
