"""docs/metrics.md lists every splitglm_* metric family of the three tiers' registries, with its type, and
nothing else; each registry also holds the process collectors."""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from cloud_service.metrics import CloudMetrics
from device_agent.metrics import DeviceMetrics
from edge_node.estimates import Estimates
from edge_node.metrics import EdgeMetrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(splitglm_\w+)` \| (counter|gauge|histogram) \|", re.MULTILINE)


def documented() -> dict[str, str]:
    rows = ROW.findall(DOCS.read_text())
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]
    return dict(rows)


def families(registry) -> dict[str, str]:
    """Exposed name (counters with _total) -> type of every splitglm_* family; and the registry's others."""
    found = {}
    for family in registry.collect():
        found[family.name + ("_total" if family.type == "counter" else "")] = family.type
    assert "process_cpu_seconds_total" in found and "python_info" in found  # the process collectors
    return {name: kind for name, kind in found.items() if name.startswith("splitglm_")}


def edge_registry():
    metrics = EdgeMetrics()
    Estimates.from_plan(None).register(metrics.registry)
    return metrics.registry


def cloud_registry():
    """A CloudMetrics watching a stand-in batcher of a CUDA device (so the GPU families are collected too)."""
    metrics = CloudMetrics()
    metrics.watch(SimpleNamespace(stats=lambda: {"sessions": 0, "queued": 0}, device=torch.device("cuda"),
                                  scheduler=SimpleNamespace(stats=Counter()),
                                  terminal=SimpleNamespace(counts=Counter()), segment=SimpleNamespace(pool=None)))
    return metrics.registry


def device_registry():
    metrics = DeviceMetrics()
    metrics.watch(SimpleNamespace(ready=threading.Event(), link=SimpleNamespace(stats=Counter()),
                                  links=SimpleNamespace(stats=Counter())))
    return metrics.registry


def test_docs_list_every_metric_of_every_tier_and_nothing_else():
    registered = {**families(edge_registry()), **families(cloud_registry()), **families(device_registry())}
    docs = documented()
    assert sorted(set(registered) - set(docs)) == [], "registered but not in docs/metrics.md"
    assert sorted(set(docs) - set(registered)) == [], "in docs/metrics.md but registered nowhere"
    assert {n: k for n, k in docs.items() if registered[n] != k} == {}, "documented with another type"
    for prefix in ("splitglm_edge_", "splitglm_cloud_", "splitglm_device_"):
        assert any(name.startswith(prefix) for name in registered), prefix


def test_counters_and_only_counters_end_in_total():
    registered = {**families(edge_registry()), **families(cloud_registry()), **families(device_registry())}
    assert [name for name, kind in registered.items() if (kind == "counter") != name.endswith("_total")] == []
    assert not [name for name in registered if re.search(r"_ms\b|milli", name)]  # base units: seconds
