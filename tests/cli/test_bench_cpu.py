"""``splitglm bench cpu`` on the tiny model: its rows, their quality, and no llama.cpp without llama-cpp-python."""

from __future__ import annotations

import argparse

from splitglm.bench import cpu, llama_cpp

GPL3 = "/usr/share/common-licenses/GPL-3"
APACHE2 = "/usr/share/common-licenses/Apache-2.0"


def args(model: str, **over) -> argparse.Namespace:
    values = dict(model=model, gguf="model.gguf", gguf_precision="Q4_1", splits=[2, 4], tiers=["device", "fast-tail"],
                  engines=["eager"], precisions=["fp32", "int4"], threads=[1], prompt=4, decode=3, prefill=8,
                  relay_batch=2, text=APACHE2, tuning_text=GPL3, tokens=64, window=32, json=True)
    return argparse.Namespace(**{**values, **over})


def test_rows_without_llama_cpp(talking_model, monkeypatch):
    def missing(*a, **k):
        raise llama_cpp.LlamaCppMissing(f"llama.cpp rows need llama-cpp-python: {llama_cpp.INSTALL}")

    monkeypatch.setattr(llama_cpp, "load", missing)
    result = cpu.bench_cpu(args(talking_model))
    assert result["llama_cpp"] == llama_cpp.INSTALL  # says how to install it, and still reports splitglm's rows
    rows = {(r["tier"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("device", "fp32"), ("device", "int4"), ("fast-tail", "fp32"), ("fast-tail", "int4")}
    for row in rows.values():
        assert {"engine", "tier", "precision", "threads", "decode_ms", "prefill_tok_s", "perplexity_delta_pct",
                "vs_llama_cpp"} <= set(row)
        assert row["decode_ms"] > 0 and row["prefill_tok_s"] > 0 and row["vs_llama_cpp"] is None
    assert rows["device", "fp32"]["perplexity_delta_pct"] == 0
    assert rows["fast-tail", "int4"]["perplexity_delta_pct"] != 0  # the tail's int4 layers and int8 head
    assert rows["fast-tail", "int4"]["layers"] == [4, 6]
    assert "no llama.cpp rows" in "\n".join(cpu.format_report(result))


def test_a_llama_cpp_that_crashes_is_found_in_a_child_and_named(monkeypatch):
    """The probe runs llama.cpp in a child process: a crash there (a native build's AMX kernel on some CPUs)
    becomes a line with the rebuild command, not the death of the bench; a clean exit is no problem."""
    monkeypatch.setattr(llama_cpp, "PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    problem = llama_cpp.probe.__wrapped__("model.gguf")
    assert "signal 11" in problem and llama_cpp.REBUILD in problem
    monkeypatch.setattr(llama_cpp, "PROBE", "import sys\nassert sys.argv[1] == 'model.gguf'\n")
    assert llama_cpp.probe.__wrapped__("model.gguf") is None
    assert "failed (1)" in llama_cpp.probe.__wrapped__("other.gguf")
    assert cpu.llama_status("model.gguf", [], problem) == problem


def test_relay_tier_steps_its_batch(talking_model, monkeypatch):
    seen = []
    real = cpu.decode_ms
    monkeypatch.setattr(cpu, "decode_ms", lambda seg, prompt, steps, batch=1: seen.append(batch) or real(
        seg, prompt, steps, batch))
    result = cpu.bench_cpu(args(talking_model, gguf="", tiers=["edge-relay"], precisions=["fp32"]))
    assert seen == [2] and result["rows"][0]["batch"] == 2 and result["rows"][0]["layers"] == [2, 4]
    assert result["llama_cpp"] == "not asked"


def test_engines_run_their_paths(talking_model, monkeypatch):
    """eager: no graphs; compiled: the layers and the head's row; compiled-layers: the layers, the head eager;
    compiled-aten: both, the int4 products on ATen's kernel (the others on the row kernel, where it runs)."""
    from runtime.compress import int4_rows

    seen = {}
    real = cpu.decode_ms

    def timed(seg, prompt, steps, batch=1):
        compiled = seg.compiled
        seen[len(seen)] = None if compiled is None else ("layers", compiled.head is not None, compiled.row_kernels)
        return real(seg, prompt, steps, batch)

    monkeypatch.setattr(cpu, "decode_ms", timed)
    engines = ["compiled", "eager", "compiled-layers", "compiled-aten"]
    result = cpu.bench_cpu(args(talking_model, gguf="", tiers=["fast-tail"], precisions=["int4"], engines=engines))
    assert [r["engine"] for r in result["rows"]] == engines
    rows = 2 * 6 if int4_rows.available() else 0  # the fast tail's 2 layers x 6 int4 linears
    assert seen == {0: ("layers", True, rows), 1: None, 2: ("layers", False, rows), 3: ("layers", True, 0)}
    assert result["rows"][1]["compile_s"] is None and result["rows"][2]["compile_s"] is not None
