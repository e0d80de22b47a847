"""ONNX Runtime backend: an exported segment equals its PyTorch segment, one-shot and step by step."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from runtime.backends import (
    BackendUnavailable,
    OnnxSegment,
    build_tensorrt_engine,
    export_onnx,
    module_path,
    quantize_onnx_int8,
    tensorrt_available,
)
from runtime.compress import quantize_int8_weights
from runtime.segment import Segment, SegmentInput, SessionError

# device: embedding + layers [0, 2); edge: hidden in, layers [3, 5) + norm + head (the shape of a tail).
# Two layers each: enough to check per-layer caches, and export time grows with the graph.
KINDS = {"device": dict(start=0, end=2, embed=True), "edge": dict(start=3, end=5, head=True)}


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tiny_checkpoint, tmp_path_factory):
    """(PyTorch segment, export folder, metadata) for each segment kind and tiny config."""
    segment = Segment.from_checkpoint(tiny_checkpoint, **KINDS[request.param])
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    meta = export_onnx(segment, folder, quantize_int8=True)
    return segment, folder, meta


def step_input(segment: Segment, session: str, pos: int, n: int, seed: int) -> SegmentInput:
    g = torch.Generator().manual_seed(seed)
    if segment.has_embed:
        return SegmentInput(session, pos, input_ids=torch.randint(0, segment.spec.vocab_size, (n,), generator=g))
    return SegmentInput(session, pos, hidden=torch.randn(n, segment.spec.hidden_size, generator=g))


def run_both(segment: Segment, onnx_segment: OnnxSegment, steps: list[int], session: str = "s"):
    """Feed the same steps to both backends; return per step (PyTorch out, ONNX out)."""
    pairs, pos = [], 0
    for seed, n in enumerate(steps):
        item = step_input(segment, session, pos, n, seed)
        pairs.append((segment([item])[0], onnx_segment([item])[0]))
        pos += n
    segment.close_session(session)
    return pairs


def test_graph_has_kv_inputs_and_outputs(exported):
    segment, folder, meta = exported
    graph = onnx.load(str(folder / meta["models"]["fp32"])).graph
    names = [i.name for i in graph.input]
    first = "input_ids" if segment.has_embed else "hidden"
    layers = range(segment.start, segment.end)
    assert names == [first, "position_offset"] + [f"past_{k}_{i}" for i in layers for k in ("key", "value")]
    outputs = [o.name for o in graph.output]
    assert outputs[0] == ("logits" if segment.has_head else "hidden_states")
    assert outputs[1:] == [f"present_{k}_{i}" for i in layers for k in ("key", "value")]
    past_dims = graph.input[2].type.tensor_type.shape.dim
    assert past_dims[2].dim_param and not past_dims[2].dim_value  # the cache length is dynamic
    assert [d.dim_value for d in past_dims[1::2]] == [segment.spec.num_kv_heads, segment.spec.head_dim]


def test_one_shot_prefill_matches_pytorch(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    ((expected, got),) = run_both(segment, onnx_segment, [9])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_matches_pytorch(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    steps = [6, 1, 1, 3, 1, 1]  # prefill, decode, a chunk, decode
    for expected, got in run_both(segment, onnx_segment, steps):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert onnx_segment.cached_length("s") == sum(steps)
    k = onnx_segment.sessions["s"].keys[segment.start]
    assert k.shape == (1, segment.spec.num_kv_heads, sum(steps), segment.spec.head_dim)


def test_int8_model_is_quantised_and_close(exported):
    segment, folder, meta = exported
    ops = {n.op_type for n in onnx.load(str(folder / meta["models"]["int8"])).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, sorted(ops)
    onnx_segment = OnnxSegment(folder, precision="int8", threads=1)
    for expected, got in run_both(segment, onnx_segment, [7, 1, 1, 1]):
        relative = float((got - expected).norm() / expected.norm())
        # onnxruntime quantises activations per tensor (one scale a matrix): on these tiny random models that
        # costs 0.02-0.21 relative error (onnxruntime 1.30-1.32; PyTorch's per-token W8A8: 0.00-0.02). What
        # int8 costs a real model is measured on text by the partitioner, not here.
        assert relative < 0.3
        assert not torch.equal(got, expected)  # it really is another (quantised) model


def test_int8_keeps_chosen_linears_fp32(exported, tmp_path):
    segment, folder, _ = exported
    dst = tmp_path / "partial.int8.onnx"
    kept = quantize_onnx_int8(folder / "model.onnx", dst, keep_fp32=["layers.*.mlp.down_proj"])
    assert kept == [f"layers.{i}.mlp.down_proj" for i in range(segment.start, segment.end)]
    graph = onnx.load(str(dst)).graph
    float_linears = [module_path(n) for n in graph.node if n.op_type == "MatMul"]
    fp32 = sorted(p for p in float_linears if p and "proj" in p)
    assert fp32 == kept  # only the kept linears are still float MatMuls
    quantised = sum(n.op_type == "MatMulInteger" for n in graph.node)
    assert quantised == 5 * len(kept) + segment.has_head  # q, k, v, o, gate_up per layer, and the LM head


def test_last_only_and_interface(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    assert (onnx_segment.start, onnx_segment.end) == (segment.start, segment.end)
    assert (onnx_segment.has_embed, onnx_segment.has_head, onnx_segment.spec) == (
        segment.has_embed,
        segment.has_head,
        segment.spec,
    )
    item = step_input(segment, "l", 0, 5, 3)
    full = onnx_segment([item])[0]
    last = onnx_segment([item], last_only=True)[0]  # the same step again (a retry)
    width = segment.spec.vocab_size if segment.has_head else segment.spec.hidden_size
    assert last.shape == ((1, width) if segment.has_head else (5, width))
    torch.testing.assert_close(last[-1], full[-1], atol=0, rtol=0)


def test_sessions_interleave_and_rewind(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    a0, b0 = step_input(segment, "a", 0, 4, 1), step_input(segment, "b", 0, 6, 2)
    onnx_segment([a0, b0])
    a1 = step_input(segment, "a", 4, 1, 3)
    first = onnx_segment([a1])[0]
    onnx_segment([step_input(segment, "a", 5, 2, 4)])
    again = onnx_segment([a1])[0]  # rewinds "a" to position 4
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-6)
    assert onnx_segment.cached_length("a") == 5 and onnx_segment.cached_length("b") == 6
    onnx_segment.close_session("b")
    assert set(onnx_segment.sessions) == {"a"}


def test_session_errors_match_segment(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    with pytest.raises(SessionError, match="unknown session"):
        onnx_segment([step_input(segment, "nobody", 5, 1, 0)])
    onnx_segment([step_input(segment, "e", 0, 2, 0)])
    with pytest.raises(SessionError, match="2 positions cached"):
        onnx_segment([step_input(segment, "e", 3, 1, 0)])
    with pytest.raises(SessionError, match="at most one step per session"):
        onnx_segment([step_input(segment, "e", 2, 1, 0), step_input(segment, "e", 2, 1, 1)])
    assert onnx_segment.cached_length("e") == 2  # failed calls left the cache alone
    wrong = SegmentInput("e", 2, hidden=torch.zeros(1, 3)) if not segment.has_embed else SegmentInput("e", 2)
    with pytest.raises(ValueError, match=r"must be \(T, 64\)|give input_ids"):
        onnx_segment([wrong])


def test_export_refuses_custom_int8_kernels(tiny_glm, tmp_path):
    segment = Segment.from_checkpoint(tiny_glm, 0, 2)
    quantize_int8_weights(segment)
    with pytest.raises(ValueError, match="quantize_int8=True"):
        export_onnx(segment, tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_export_and_precision_are_clear(exported, tmp_path):
    _, folder, _ = exported
    with pytest.raises(FileNotFoundError, match="not an exported ONNX segment"):
        OnnxSegment(tmp_path)
    with pytest.raises(ValueError, match="no 'int4' model"):
        OnnxSegment(folder, precision="int4")


def test_tensorrt_builds_or_says_how_to_install(exported, tmp_path):
    _, folder, meta = exported
    engine = tmp_path / "segment.engine"
    if tensorrt_available():
        build_tensorrt_engine(folder / meta["models"]["fp32"], engine)
        assert engine.stat().st_size > 0
    else:
        with pytest.raises(BackendUnavailable, match="pip install tensorrt on a machine with an NVIDIA GPU"):
            build_tensorrt_engine(folder / meta["models"]["fp32"], engine)
        assert not engine.exists()


def test_tensorrt_absent_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as where it is absent
    assert tensorrt_available() is False
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        build_tensorrt_engine(tmp_path / "model.onnx", tmp_path / "x.engine")


def test_numpy_caches_start_empty(exported):
    segment, folder, _ = exported
    onnx_segment = OnnxSegment(folder, threads=1)
    onnx_segment.open_session("z")
    cache = onnx_segment.sessions["z"]
    assert cache.length == 0
    assert all(a.dtype == np.float32 and a.shape[2] == 0 for a in [*cache.keys.values(), *cache.values.values()])


def test_embedding_only_device_segment(tiny_glm, tmp_path):
    segment = Segment.from_checkpoint(tiny_glm, 0, 0, embed=True)  # k1 = 0: the device only embeds
    export_onnx(segment, tmp_path)
    onnx_segment = OnnxSegment(tmp_path, threads=1)
    for expected, got in run_both(segment, onnx_segment, [4, 1]):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert onnx_segment.cached_length("s") == 5
