"""The compiled CPU decode path (runtime.cpu_decode) against its eager reference: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from runtime.compress import apply_compression, int4_rows
from runtime.compress.named import tier_passes
from runtime.compress.quant import Int8Linear
from runtime.segment import Segment, SegmentInput

INT4_EVERYWHERE = [{"pass": "int4", "group_size": 32}, {"pass": "int4", "group_size": 32, "layers": [0, 0],
                                                        "include_head": True}]
INT4_TIER = tier_passes("int4", head=True)  # what a terminal CPU tier runs: int4 layers, int8 head


def whole(model: str, compression: list[dict] | None = None, compiled: bool = False, max_rows: int = 4) -> Segment:
    L = Segment.from_checkpoint(model, 0, 0).spec.num_layers
    segment = Segment.from_checkpoint(model, 0, L, embed=True, head=True)
    if compression:
        apply_compression(segment, compression)
    if compiled:
        segment.compile_decode(max_rows)
    return segment


def greedy(segment: Segment, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens after ``prompt`` (a prefill, then one-row steps), and each step's last-row logits."""
    logits = segment([SegmentInput("g", 0, input_ids=prompt)], last_only=True)[0][-1]
    tokens, seen, pos = [], [logits], prompt.shape[0]
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = segment([SegmentInput("g", pos, input_ids=torch.tensor([tokens[-1]]))], last_only=True)[0][-1]
        seen.append(logits)
        pos += 1
    segment.close_session("g")
    return tokens, seen


@pytest.mark.parametrize("compression, atol", [(None, 1e-4), (INT4_EVERYWHERE, 2e-2), (INT4_TIER, 2e-2)],
                         ids=["fp32", "int4", "int4-int8-head"])
def test_compiled_decode_equals_eager(tiny_glm, compression, atol):
    prompt = torch.arange(5) * 7 % 96
    eager_tokens, eager_logits = greedy(whole(tiny_glm, compression), prompt, 12)
    compiled = whole(tiny_glm, compression, compiled=True)
    tokens, logits = greedy(compiled, prompt, 12)
    assert tokens == eager_tokens
    for got, want in zip(logits, eager_logits):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert compiled.compiled.compile_s is not None  # compiled at load, not at the first request


def test_relay_batch_of_decode_rows_equals_eager(tiny_glm):
    """The edge relay's shape: a view [k1, k2) running several sessions' decode rows (and a rewind) in one step."""
    eager = Segment.from_checkpoint(tiny_glm, 0, 6).view(2, 5)
    compiled = Segment.from_checkpoint(tiny_glm, 0, 6)
    compiled.compile_decode(max_rows=4)
    compiled = compiled.view(2, 5)
    assert compiled.compiled is not None and compiled.compiled.layers == list(compiled.layers.values())
    C = eager.spec.hidden_size
    gen = torch.Generator().manual_seed(3)
    prompts = {name: torch.randn(n, C, generator=gen) for name, n in (("a", 3), ("b", 9), ("c", 1))}
    for segment in (eager, compiled):
        segment([SegmentInput(name, 0, hidden=rows) for name, rows in prompts.items()])
    steps = [torch.randn(3, C, generator=gen) for _ in range(4)]
    for i, step in enumerate(steps):  # three decode rows a step; session "b" retries its step 1 at step 2
        starts = {"a": 3 + i, "b": 9 + i - (i >= 2), "c": 1 + i}
        outs = []
        for segment in (eager, compiled):
            items = [SegmentInput(name, starts[name], hidden=step[j : j + 1]) for j, name in enumerate("abc")]
            outs.append(segment(items))
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_steps_take_their_graph(tiny_glm):
    """A prompt longer than ``max_rows`` runs eagerly, a step of a few rows the rows graph, a decode row the
    one-session graph; the answers stay the eager ones."""
    from torch._dynamo.utils import counters

    eager, segment = whole(tiny_glm), whole(tiny_glm, compiled=True)
    graphs = counters["stats"]["unique_graphs"]
    calls = []
    for name in ("_one", "_rows"):
        real = getattr(segment.compiled, name)
        setattr(segment.compiled, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    steps = [(0, torch.arange(9)), (9, torch.arange(3)), (12, torch.tensor([5])), (12, torch.tensor([6]))]
    for start, ids in steps:  # the last one rewinds: a retried step
        want, got = (s([SegmentInput("p", start, input_ids=ids)])[0] for s in (eager, segment))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert calls == ["_rows", "_one", "_one"]
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's graphs serve the real pool: no recompile


@pytest.mark.parametrize("compression", [None, INT4_TIER], ids=["fp32-head", "int8-head"])
def test_compiled_head_is_exact_on_decode_rows(tiny_glm, compression):
    """One row's logits (a decode step, a prompt's last row) come from the compiled head: the fp32 product of
    the normed row and the head's stored weights (an int8 head's codes times their scales), within fp32
    rounding of float64 maths. A step of several rows takes the eager head."""
    segment = whole(tiny_glm, compression, compiled=True)
    head, lm_head = segment.compiled.head, segment.lm_head
    rows = []
    real = head._one
    head._one = lambda x: rows.append(x.clone()) or real(x)
    logits = greedy(segment, torch.arange(5) * 7 % 96, 4)[1]
    assert len(rows) == 5  # the prompt's last row and each decode row took the graph
    weight = lm_head.dequantized_weight() if isinstance(lm_head, Int8Linear) else lm_head.weight
    for row, got in zip(rows, logits):
        want = segment.norm(row).double() @ weight.double().t()  # (1, V)
        torch.testing.assert_close(got.double(), want[0], atol=1e-5, rtol=1e-5)
    segment([SegmentInput("v", 0, input_ids=torch.arange(4))])  # logits of every row: the eager head
    segment([SegmentInput("v", 4, input_ids=torch.arange(3))])  # a verification's rows: the eager head
    assert len(rows) == 5


@pytest.mark.skipif(not int4_rows.available(), reason="no AVX-512 BF16 or no C++ compiler")
@pytest.mark.parametrize("rows_kernel", [True, False], ids=["int4-rows", "aten"])
def test_compiled_int4_steps_take_the_row_kernel(tiny_glm, rows_kernel):
    """The graphs' int4 products run ``splitglm_int4::int4_rows`` (ATen's kernel where asked: the bench's
    A/B), a decode row and a step of several rows alike; the eager prompt keeps ATen's kernel."""
    from torch.profiler import profile

    segment = whole(tiny_glm, INT4_TIER)  # int4 layers, int8 head
    compiled = segment.compile_decode(max_rows=4, int4_rows=rows_kernel)
    assert compiled.row_kernels == (6 * 6 if rows_kernel else 0)  # 6 layers x 6 linears
    ops = {True: "splitglm_int4::int4_rows", False: "aten::_weight_int4pack_mm_for_cpu"}
    steps = [(0, torch.arange(9)), (9, torch.tensor([5])), (10, torch.arange(3))]  # prompt, decode row, 3 rows
    for start, ids in steps:
        with profile() as prof:
            segment([SegmentInput("p", start, input_ids=ids)])
        names = {e.key for e in prof.key_averages()}
        in_graph = start > 0
        assert (ops[True] in names) == (in_graph and rows_kernel)
        assert (ops[False] in names) == (not in_graph or not rows_kernel)


@pytest.mark.slow
def test_demo_model_int4_greedy_tokens_equal_eager(demo_checkpoint):
    """The demo model in the precision the CPU tiers run (int4 layers, int8 head): the same 24 greedy tokens.

    Its int4 kernel rounds activations to bf16, so the graph's fp32 rounding differences grow through 30
    layers: logits agree within 1.0 (the int4 quantisation itself moves them by 1.3). In fp32 the two paths
    agree within 5e-5 on this prompt.
    """
    from runtime.checkpoint import load_tokenizer

    text = "The GNU General Public License is a free, copyleft license for software and other kinds of works."
    prompt = load_tokenizer(demo_checkpoint)(text, return_tensors="pt").input_ids[0]
    eager_tokens, eager_logits = greedy(whole(demo_checkpoint, INT4_TIER), prompt, 24)
    compiled = whole(demo_checkpoint, INT4_TIER, compiled=True, max_rows=1)
    assert compiled.compiled.row_kernels == (180 if int4_rows.available() else 0)  # 30 layers x 6 linears
    tokens, logits = greedy(compiled, prompt, 24)
    assert tokens == eager_tokens
    for got, want in zip(logits, eager_logits):
        torch.testing.assert_close(got, want, atol=1.0, rtol=0)


def test_settings_choose_the_path(tiny_glm, tiny_plan):
    from device_agent.settings import DeviceSettings
    from edge_node.settings import EdgeSettings
    from runtime.cpu_decode import CpuDecode

    device = DeviceSettings(plan=tiny_plan, device_id="d", cpu_decode="compiled", cpu_decode_max_rows=3)
    assert CpuDecode.of(device) == CpuDecode("compiled", 3)
    assert CpuDecode.of(EdgeSettings(plan=tiny_plan)) == CpuDecode("plan", 16)  # the plan's path
    with pytest.raises(ValueError):
        DeviceSettings(plan=tiny_plan, device_id="d", cpu_decode="fast")
    eager, compiled = (Segment.from_checkpoint(tiny_glm, 0, 2) for _ in range(2))
    CpuDecode("eager").apply(eager)
    CpuDecode("compiled", 3).apply(compiled)
    assert eager.compiled is None and compiled.compiled.max_rows == 3


def test_tier_loads_compiled(tiny_plan):
    from runtime.artifacts import load_tier
    from runtime.cpu_decode import CpuDecode

    edge = load_tier(tiny_plan, "edge", cpu_decode=CpuDecode("compiled", 4))
    assert edge.compiled is not None and edge.compiled.compile_s is not None
    assert edge.view(2, 4).compiled is not None  # the relay's view [k1, k2) compiles too
    assert load_tier(tiny_plan, "edge").compiled is None
