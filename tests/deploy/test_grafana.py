"""deploy/compose/grafana/splitglm.json: a dashboard Grafana can import, querying only series the tiers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy/compose/grafana/splitglm.json").read_text())
SERIES = re.compile(r"\b((?:splitglm_(?:edge|cloud|device)|process)_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def queried() -> set[str]:
    """Every metric family the panels query (a histogram's _bucket/_sum/_count read as the histogram)."""
    names = set()
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            for name in SERIES.findall(target["expr"]):
                names.add(next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name))
    return names


def test_panels_cover_every_tier():
    titles = " ".join(panel["title"] for panel in DASHBOARD["panels"])
    for words in ("time to first token", "inter-token latency", "end-to-end", "tokens/s by path", "batch size",
                  "queue depth", "KV pool", "step time", "answers"):
        assert words in titles, words
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)) and all(panel["targets"] for panel in DASHBOARD["panels"])
    assert {name.split("_")[1] for name in queried() if name.startswith("splitglm_")} == {"edge", "cloud", "device"}


def test_every_queried_series_is_documented():
    """docs/metrics.md lists every metric (issue 24's metrics work writes it); each query names one of them."""
    docs = ROOT / "docs/metrics.md"
    documented = set(SERIES.findall(docs.read_text())) if docs.is_file() else set()
    names = {name for name in queried() if name.startswith("splitglm_")}
    assert names, "the dashboard queries no splitglm series"
    if documented:
        assert names <= documented, sorted(names - documented)
