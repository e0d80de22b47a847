"""The ``splitglm`` command as a user runs it: a real subprocess, real files, real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GPL3


def splitglm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitglm.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_arguments_fail_clearly(tmp_path):
    r = splitglm("eval", "--model", str(tmp_path), "--text", GPL3, "--splits", "20,10")
    assert r.returncode == 2 and "K1 <= K2" in r.stderr
    r = splitglm("eval", "--model", str(tmp_path), "--text", GPL3, "--splits", "1,2", "--codecs", "zip9")
    assert r.returncode == 2 and "unknown codec" in r.stderr
    r = splitglm("eval", "--model", "org/some-model", "--text", GPL3, "--splits", "1,2")
    assert r.returncode == 1 and "hub id" in r.stderr
    r = splitglm("convert", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_demo_model_prints_its_folder_last(demo_checkpoint):
    r = splitglm("demo-model")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == demo_checkpoint


@pytest.mark.slow
def test_two_demo_model_conversions_at_once_both_succeed(tmp_path):
    """Two first runs at once (say `make demo` beside `make test`): the later rename must not fail."""
    out = tmp_path / "glm"
    cmd = [sys.executable, "-m", "splitglm.cli", "demo-model", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert stdout.strip().splitlines()[-1] == str(out)
    # one converts; the other, started at the same time, finds the folder filled while it converted
    # (or, if it started late, already there)
    assert sum("converted the demo model into" in stderr for _, stderr in results) == 1
    assert sum("by another process" in e or "already converted" in e for _, e in results) == 1
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".convert-")]


@pytest.mark.slow
def test_convert_checks_itself(tmp_path):
    from partitioner.convert import find_demo_gguf

    out = tmp_path / "glm"
    r = splitglm("convert", "--gguf", str(find_demo_gguf()), "--out", str(out))
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.split("load: ")[1].split()[0])
    assert diff <= 1e-3
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm"
    assert (out / "tokenizer.json").is_file()
    r = splitglm("convert", "--gguf", str(find_demo_gguf()), "--out", str(out))
    assert r.returncode == 1 and "not empty" in r.stderr


@pytest.mark.slow
def test_eval_json_on_the_demo_model(demo_checkpoint):
    r = splitglm(
        "eval",
        "--model",
        demo_checkpoint,
        "--text",
        GPL3,
        "--splits",
        "10,20",
        "--codecs",
        "fp32,fp16,int8,int8+outliers",
        "--tokens",
        "600",
        "--window",
        "300",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rows = {row["codec"]: row for row in json.loads(r.stdout)}
    assert list(rows) == ["fp32", "fp16", "int8", "int8+outliers"]
    for row in rows.values():
        assert set(row) >= {"codec", "bytes_per_element", "perplexity", "perplexity_delta_pct", "token_agreement"}
        assert row["tokens"] == 598  # two windows of 300, each predicting 299 tokens
    assert rows["fp32"]["perplexity_delta_pct"] == 0 and rows["fp32"]["token_agreement"] == 1.0
    assert 4 < rows["fp32"]["bytes_per_element"] < 4.1
    assert 2 < rows["fp16"]["bytes_per_element"] < 2.1
    assert rows["int8"]["bytes_per_element"] < 1.1
    assert rows["int8+outliers"]["bytes_per_element"] < 1.1
    assert abs(rows["int8+outliers"]["perplexity_delta_pct"]) < 1.0


@pytest.mark.slow
def test_local_demo_generates_through_three_segments(demo_checkpoint):
    r = splitglm("demo", "--local", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    answer = r.stdout.split("answer: ", 1)[1].split("\n\nsplits")[0]
    assert len(answer.strip()) > 0
    assert "frame bytes device->edge" in r.stdout


@pytest.mark.slow
def test_partition_writes_a_verified_plan(demo_checkpoint, tmp_path):
    out = tmp_path / "plan"
    topology = tmp_path / "cellular.yaml"  # the edge eager: compiling its samples is tests/partitioner/plan's
    text = Path("examples/topologies/cellular.yaml").read_text()
    topology.write_text(text.replace("edge:   {backend: torch,", "edge:   {backend: torch, cpu_decode: eager,"))
    assert topology.read_text() != text
    r = splitglm(
        "partition",
        "--model",
        demo_checkpoint,
        "--topology",
        str(topology),
        "--out",
        str(out),
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "plan.json").read_text())
    k1, k2 = plan["splits"]
    assert 1 <= k1 <= k2 <= 30
    assert set(plan["codecs"]) == {"device_edge", "edge_cloud"}
    assert set(plan["compression"]) == {"device", "edge", "cloud"}
    assert plan["predicted"]["ttft_ms"] > 0 and plan["predicted"]["per_token_ms"] > 0
    assert plan["cpu_decode"] == {"device": "eager", "edge": "eager", "fast_tail": "eager"}
    assert plan["perplexity_delta_pct"] <= 1.5  # the topology's quality floor
    for tier in ("device", "edge", "cloud", "fast_tail"):
        manifest = json.loads((out / tier / "manifest.json").read_text())
        assert manifest["plan_id"] == plan["plan_id"] and manifest["files"]
    report = (out / "report.md").read_text()
    assert "Best candidates" in report and (out / "report.png").stat().st_size > 10_000

    r = splitglm(
        "eval",
        "--model",
        demo_checkpoint,
        "--text",
        GPL3,
        "--plan",
        str(out),
        "--tokens",
        "300",
        "--window",
        "150",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    row, *tiers, fast = json.loads(r.stdout)  # the plan as deployed, each compressed tier alone, the fast tail
    compressed = [t for t in ("device", "edge", "cloud") if plan["compression"][t]["name"] != "none"]
    assert [t["codec"] for t in tiers] == [f"tier:{t}" for t in compressed]
    assert all(t["tokens"] == 298 and 0 < t["token_agreement"] <= 1 for t in tiers)
    assert row["codec"] == f"{plan['codecs']['device_edge']}/{plan['codecs']['edge_cloud']}"
    assert 0 < row["token_agreement"] <= 1 and row["tokens"] == 298
    assert fast["codec"] == "fast_tail" and fast["compression"] == plan["fast_tail"]["compression"]["name"]
    assert plan["fast_tail"]["quality"]["token_agreement"] >= 0.9 and 0.8 <= fast["token_agreement"] <= 1
