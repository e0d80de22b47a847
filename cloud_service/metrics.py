"""Prometheus metrics of the cloud service, served over plain HTTP on ``metrics_port`` (off by default).

Every name starts with ``splitglm_cloud_``; ``docs/metrics.md`` lists them all. Per step the scheduler's
``on_step`` observes three histograms (batch size, positions, step time) and a verification's answer one
more; everything else is read at scrape time from the plain counters the runtime keeps anyway (the
terminal's sessions and counts, the scheduler's queue and stats, the KV pool, the CUDA engine's stats,
torch's CUDA allocator), so the steps pay nothing for it. The registry also holds the process, platform
and gc collectors (``runtime.metrics_http.new_registry``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import torch
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.metrics_http import LATENCY_BUCKETS_S, TierMetrics
from runtime.scheduler import StepStats

PREFIX = "splitglm_cloud_"
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)  # sessions in one pass
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # positions in one pass


class CloudMetrics(TierMetrics):
    """The cloud's registry: histograms fed by the scheduler's steps, the rest read from a ``Batcher``."""

    def __init__(self):
        super().__init__()
        r = self.registry
        self.batch_size = Histogram(PREFIX + "batch_size", "Sessions in one batched forward pass (a step of the "
                                    "scheduler).", buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram(PREFIX + "step_tokens", "Positions in one batched forward pass: decode and "
                                     "verification rows, plus a prompt chunk.", buckets=TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram(PREFIX + "step_seconds", "Time of one batched forward pass (the scheduler's "
                                      "step: the segment, its head and sampling).", buckets=LATENCY_BUCKETS_S,
                                      registry=r)
        self.verify_step_seconds = Histogram(PREFIX + "verify_step_seconds", "Compute time of a step that verified "
                                             "a session's drafts (a speculative frame), per frame.",
                                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.verifications_total = Counter(PREFIX + "verifications_total", "Speculative frames (frames with draft "
                                           "tokens) answered.", registry=r)

    def on_step(self, step: StepStats) -> None:
        """One step of the scheduler (on its thread): three observations."""
        self.batch_size.observe(step.sessions)
        self.step_tokens.observe(step.rows)
        self.step_seconds.observe(step.compute_ms / 1e3)

    def on_verified(self, answer: Future) -> None:
        """A verification frame's answer (a done future of its StepResult): its step's compute time."""
        if answer.exception() is None:
            self.verifications_total.inc()
            self.verify_step_seconds.observe(answer.result().timings_ms.get("compute", 0.0) / 1e3)

    def watch(self, batcher) -> None:
        """Read the batcher's sessions, queue, KV pool, passes and GPU memory at each scrape."""
        self.registry.register(BatcherCollector(batcher))


GAUGES = {
    "sessions": "Sessions open now (sampling state held).",
    "queue_depth": "Steps waiting for the scheduler now.",
    "kv_pages_used": "KV pool pages held by sessions now.",
    "kv_pages_free": "KV pool pages free now.",
}
COUNTERS = {  # exposed as ..._total
    "prefill_chunks": "Prompt chunks run: steps of more than 16 positions run in chunks of at most prefill_chunk "
                      "positions, one per pass.",
    "prefill_positions": "Prompt positions of new sessions run here.",
    "forked_positions": "Prompt positions new sessions took from another session's cache instead of running them.",
    "cuda_graph_replays": "Forward passes replayed from a captured CUDA graph.",
    "eager_passes": "Forward passes run eagerly: shapes without a graph on CUDA; on the CPU, every pass (counted "
                    "as the scheduler's steps).",
}
GPU_MEMORY = {
    "gpu_memory_allocated_bytes": ("GPU memory held by tensors now (torch.cuda.memory_allocated).",
                                   torch.cuda.memory_allocated),
    "gpu_memory_reserved_bytes": ("GPU memory held by the CUDA caching allocator now (torch.cuda.memory_reserved).",
                                  torch.cuda.memory_reserved),
}


class BatcherCollector(Collector):
    """Gauges and counters read from a ``cloud_service.batcher.Batcher`` when scraped."""

    def __init__(self, batcher):
        self.batcher = batcher

    def describe(self) -> Iterator[Metric]:
        yield from families({}, None)

    def collect(self) -> Iterator[Metric]:
        device = self.batcher.device
        yield from families(readings(self.batcher), device if device.type == "cuda" else None)


def readings(batcher) -> dict[str, int]:
    """The values of ``GAUGES`` and ``COUNTERS`` now (the KV pool's once it exists)."""
    stats, steps, counts = batcher.stats(), batcher.scheduler.stats, batcher.terminal.counts
    engine = getattr(batcher.segment, "stats", None)
    graphs = engine if isinstance(engine, dict) and "graph_replays" in engine else None  # a CudaEngine's
    values = {"sessions": stats["sessions"], "queue_depth": stats["queued"], "prefill_chunks": steps["chunks"],
              "prefill_positions": counts["prefill_positions"], "forked_positions": counts["forked_positions"],
              "cuda_graph_replays": graphs["graph_replays"] if graphs else 0,
              "eager_passes": graphs["eager_passes"] if graphs else steps["steps"]}
    pool = getattr(batcher.segment, "pool", None)  # (a CPU segment makes its pool at its first session)
    if pool is not None:
        values["kv_pages_free"] = free = pool.free_positions // pool.page_size
        values["kv_pages_used"] = pool.capacity_positions // pool.page_size - free
    return values


def families(values: dict[str, int], gpu: torch.device | None) -> Iterator[Metric]:
    """Every family, with the ``values`` it has (none: only its name and help) and ``gpu``'s memory."""
    for name, help_text in GAUGES.items():
        yield GaugeMetricFamily(PREFIX + name, help_text, value=values.get(name))
    for name, help_text in COUNTERS.items():
        yield CounterMetricFamily(PREFIX + name, help_text, value=values.get(name))
    for name, (help_text, read) in GPU_MEMORY.items():
        family = GaugeMetricFamily(PREFIX + name, help_text, labels=["device"])
        if gpu is not None and torch.cuda.is_initialized():
            family.add_metric([str(gpu)], read(gpu))
        yield family
