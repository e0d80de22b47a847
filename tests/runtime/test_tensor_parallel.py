"""Tensor parallelism on CPU (gloo, fp32): 2 ranks give 1 rank's greedy tokens and logits within 1e-4.

The same script of steps (a chunked prefill, a mixed batch, decode steps, a multi-position verification, a
rewind, a fork, a session closed and reopened) runs on the whole segment here and through a ``Leader`` on
rank 0 of a spawned 2-rank replica, whose follower runs the broadcast calls on its shard.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.checkpoint import GlmSpec
from runtime.sampling import SampleRow
from runtime.segment import Segment, SegmentInput
from runtime.tensor_parallel import ShardError, head_slices, shard_segment, split_problem
from runtime.tp_ranks import Leader, Ranks, follow, init_ranks

GLM = GlmSpec(model_type="glm", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True,
              tie_word_embeddings=False, eos_token_ids=())
GLM4_ONE_KV = dataclasses.replace(GLM, model_type="glm4", num_kv_heads=1)  # 2 ranks: the KV head replicated
GREEDY = SampleRow()


def tiny_segment(spec: GlmSpec, seed: int = 0) -> Segment:
    """A whole random segment (embedding, layers, head), biases and norms perturbed."""
    torch.manual_seed(seed)
    segment = Segment(spec, 0, spec.num_layers, embed=True, head=True)
    with torch.no_grad():
        for name, p in segment.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return segment.eval()


def script(segment) -> list:
    """Steps of three sessions through ``segment`` (a Segment or a Leader); every output, in order."""
    out: list = []

    def run(items, last_only=False):
        got = segment(items, last_only)
        out.extend(got)
        return got

    def ids(*tokens):
        return torch.tensor(tokens)

    prompt = ids(5, 17, 33, 2, 90, 41, 8)
    run([SegmentInput("a", 0, input_ids=prompt[:3], reserve=16)])  # a prompt in chunks of 3
    run([SegmentInput("a", 3, input_ids=prompt[3:6])])
    (a,) = run([SegmentInput("a", 6, input_ids=prompt[6:], sample=(GREEDY,))])
    b = None
    for step in range(4):  # a's decode steps; b's prompt joins the first, then decodes beside a
        items = [SegmentInput("a", 7 + step, input_ids=ids(a.tokens[-1]), sample=(GREEDY,))]
        items.append(SegmentInput("b", 0, input_ids=ids(60, 61, 62, 63, 64), sample=(GREEDY,)) if b is None else
                     SegmentInput("b", 4 + step, input_ids=ids(b.tokens[-1]), sample=(GREEDY,)))
        a, b = run(items)
    drafts = ids(a.tokens[-1], 7, 9)  # a verification: the last token and 2 drafts, sampled after each
    run([SegmentInput("a", 11, input_ids=drafts, sample=(GREEDY,) * 3)])
    run([SegmentInput("a", 11, input_ids=drafts)])  # the same positions again (a rewind), every row's logits
    segment.fork_session("a", "c", 11, reserve=14)
    run([SegmentInput("c", 11, input_ids=ids(3, 4), sample=(GREEDY,))])
    segment.close_session("b")
    run([SegmentInput("b", 0, input_ids=ids(1, 2, 3), sample=(GREEDY,) * 2)])  # reopened: a new prompt
    segment.reserve("b", 8)
    run([SegmentInput("b", 3, input_ids=ids(11)), SegmentInput("a", 14, input_ids=ids(12))], last_only=True)
    return out


def _rank(rank: int, world: int, folder: str, spec: GlmSpec, state: dict, engine: dict | None) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(f"{folder}/store", world)  # (no port to race for on a shared machine)
    ranks = init_ranks(rank, world, store, "gloo", 120)
    segment = tiny_segment(spec)
    segment.load_state_dict(state)
    shard_segment(segment, ranks)
    if engine is not None:  # the CUDA engine's code over the shard (on CPU: Triton's interpreter)
        from runtime.cuda import CudaEngine

        segment = CudaEngine(segment, ranks=ranks, **engine)
    if rank == 0:
        leader = Leader(segment, ranks)
        results = {"outputs": script(leader), "kv_heads": segment.pool.k.shape[-2]}
        leader.stop()
    else:
        results = {"follower_code": follow(segment, ranks)}
    results[f"stats{rank}"] = dict(getattr(segment, "stats", {}))
    ranks.close()
    torch.save(results, f"{folder}/rank{rank}.pt")


def _replica(world: int, spec: GlmSpec, state: dict, folder, engine: dict | None = None) -> dict:
    """Run ``script`` on a ``world``-rank replica of the segment with these weights (``engine``: the CUDA
    engine's settings, to run it over each shard): every rank's results."""
    mp.spawn(_rank, args=(world, str(folder), spec, state, engine), nprocs=world, join=True)
    results = {}
    for rank in range(world):
        results.update(torch.load(folder / f"rank{rank}.pt", weights_only=False))
    return results


def assert_same(whole: list, split: list) -> None:
    assert len(whole) == len(split)
    for ours, theirs in zip(whole, split):
        if isinstance(ours, torch.Tensor):
            assert ours.shape == theirs.shape and ours.shape[-1] == GLM.vocab_size
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        else:
            assert theirs.tokens == ours.tokens
            torch.testing.assert_close(torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", [GLM, GLM4_ONE_KV], ids=["glm-kv-split", "glm4-kv-replicated"])
def test_two_ranks_give_one_ranks_tokens_and_logits(spec, tmp_path):
    whole = tiny_segment(spec)
    expected = script(whole)
    results = _replica(2, spec, whole.state_dict(), tmp_path)
    assert results["follower_code"] == 0
    assert results["kv_heads"] == max(spec.num_kv_heads // 2, 1)  # each rank's pool holds its heads only
    assert_same(expected, results["outputs"])


def test_head_slices_follow_their_kv_heads():
    assert head_slices(4, 2, 1, 2) == (slice(2, 4), slice(1, 2))
    assert head_slices(8, 2, 3, 4) == (slice(6, 8), slice(1, 2))  # 4 ranks, 2 KV heads: each on 2 ranks
    assert head_slices(32, 2, 0, 2) == (slice(0, 16), slice(0, 1))
    for world in (1, 2, 4, 8):  # GLM-4-9B's shape: every query head once, reading its own KV head
        seen = []
        for rank in range(world):
            q, kv = head_slices(32, 2, rank, world)
            seen += list(range(q.start, q.stop))
            assert {h // 16 for h in range(q.start, q.stop)} == set(range(kv.start, kv.stop))
        assert seen == list(range(32))


def test_split_problems_are_named():
    assert split_problem(32, 2, 13696, 2) is None and split_problem(32, 2, 13696, 8) is None
    assert "query heads" in split_problem(4, 2, 96, 3)
    assert "KV heads" in split_problem(12, 4, 96, 6)
    assert "MLP width" in split_problem(4, 2, 90, 4)
    assert ">= 1" in split_problem(4, 2, 96, 0)
    with pytest.raises(ShardError, match="query heads"):
        shard_segment(tiny_segment(GLM), Ranks(0, 3))


@pytest.mark.parametrize("spec", [GLM, GLM4_ONE_KV], ids=["glm", "glm4-one-kv"])
def test_the_cuda_engines_weights_of_a_shard_are_its_slices(spec):
    """``weights_of`` a shard (what the CUDA engine runs with ranks) takes its slices, in the shape the bench's
    random shard weights have; rank 1's q|k|v rows are the whole layer's rows of its heads."""
    from runtime.cuda_weights import random_weights, weights_of

    whole = tiny_segment(spec)
    shard = shard_segment(tiny_segment(spec), Ranks(1, 2))
    got, made = weights_of(shard, torch.float32, "cpu"), random_weights(spec, spec.num_layers, False, True,
                                                                        torch.float32, "cpu", world=2)
    for ours, theirs in zip(got.layers, made.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            assert getattr(ours, name).shape == getattr(theirs, name).shape, name
    assert got.lm_head.shape == made.lm_head.shape == (-(-spec.vocab_size // 2), spec.hidden_size)
    q, kv = head_slices(spec.num_heads, spec.num_kv_heads, 1, 2)
    attn, D = whole.layers["0"].self_attn, spec.head_dim
    expected = torch.cat([attn.q_proj.weight[q.start * D : q.stop * D], attn.k_proj.weight[kv.start * D : kv.stop * D],
                          attn.v_proj.weight[kv.start * D : kv.stop * D]])
    assert torch.equal(got.layers[0].qkv, expected)
    assert torch.equal(got.layers[0].o, attn.o_proj.weight[:, q.start * D : q.stop * D])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_a_one_rank_nccl_shard_on_a_gpu_equals_the_plain_engine():
    """The CUDA engine of a shard (world 1, NCCL: the all-reduces and the head's gather captured in its graphs)
    gives the plain engine's greedy tokens and logits, bit for bit (a collective over one rank changes no
    value). What several GPUs add cannot be run here: no multi-GPU machine is lent."""
    pytest.importorskip("triton")
    from runtime.cuda import CudaEngine
    from runtime.tp_ranks import rendezvous

    whole = tiny_segment(GLM)
    store = rendezvous("127.0.0.1", 0, 1, 60.0, serve=True)
    ranks = init_ranks(0, 1, store, "nccl", 60.0)
    try:
        kw = dict(dtype=torch.bfloat16, device="cuda", pool_tokens=512, max_positions=256, prefill_chunk=4)
        plain = CudaEngine(whole, **kw)
        shard = CudaEngine(whole, ranks=ranks, **kw)
        for engine in (plain, shard):
            engine.outputs = script(engine)
        assert shard.stats["captures"] > 0 and shard.stats["eager_passes"] == 0
        for ours, theirs in zip(plain.outputs, shard.outputs, strict=True):
            if isinstance(ours, torch.Tensor):
                assert torch.equal(ours, theirs)
            else:
                assert ours.tokens == theirs.tokens and ours.logprobs == theirs.logprobs
    finally:
        ranks.close()


def test_two_ranks_of_the_cuda_engine_build_the_same_mixed_passes(tmp_path):
    """The CUDA engine over 2 gloo ranks (fp32; Triton's interpreter without a GPU), with a mixed pass (b's
    prompt chunk beside a's decode step): the follower, which samples nothing, builds the passes rank 0 builds,
    so their collectives meet; the tokens and logits equal the whole engine's."""
    if torch.cuda.is_available():
        pytest.skip("the gloo ranks run the engine on CPU tensors (under Triton's interpreter)")
    ops = pytest.importorskip("runtime.triton_ops")
    if not ops.AVAILABLE:
        pytest.skip("triton is not installed")
    if type(ops._rms_norm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)")
    from runtime.cuda import CudaEngine

    engine = dict(dtype=torch.float32, device="cpu", graphs=False, pool_tokens=512, max_positions=256,
                  prefill_chunk=4, decode_rows=2, mixed_passes=True)  # b's 5-position prompt: a chunk of 4
    # beside a's step, then 1
    whole = tiny_segment(GLM)
    plain = CudaEngine(tiny_segment(GLM), **engine)
    expected = script(plain)
    assert plain.stats["mixed_passes"] == 1
    results = _replica(2, GLM, whole.state_dict(), tmp_path, engine)
    assert results["follower_code"] == 0
    assert results["stats0"]["mixed_passes"] == results["stats1"]["mixed_passes"] == 1
    assert results["stats0"]["eager_passes"] == results["stats1"]["eager_passes"] == plain.stats["eager_passes"]
    assert_same(expected, results["outputs"])
