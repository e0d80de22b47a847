"""Forked sessions (n > 1 completions of one prompt): KV pages shared copy-on-write, exactly a fresh prefill.

The pool's accounting (pages shared, copied, freed), a forked segment session against one that prefilled the
whole prompt itself (also after either session rewinds into the shared pages), and the terminal's fork
admission with and without the scheduler: the answers equal a fresh session's, refusals carry their status.
"""

from __future__ import annotations

import pytest
import torch

from protos import splitglm_pb2 as pb
from protos.status import STATUS_NAMES
from runtime.checkpoint import load_spec
from runtime.kv_pool import KVPool, PoolExhausted
from runtime.local import LocalTail
from runtime.scheduler import Scheduler
from runtime.segment import Segment, SegmentInput, SessionError
from runtime.terminal import StepError, Terminal

PS = 4  # page size of the pool tests


def pool_with(tokens: int = 64, grow: str = "exact") -> KVPool:
    return KVPool(2, 1, 2, tokens=tokens, page_size=PS, grow=grow)


def free_pages(pool: KVPool) -> int:
    return pool.free_positions // PS


def fill(pool: KVPool, session: str, start: int, count: int, value: float) -> None:
    """Write ``value`` + position into the keys and values of positions [start, start + count)."""
    pool.reserve_all([(session, start, start + count)])
    slots = torch.tensor(pool.slots(session, start, count))
    rows = (value + torch.arange(start, start + count, dtype=torch.float32))[:, None, None].expand(count, 1, 2)
    for layer in range(2):
        pool.write(layer, slots, rows, rows)
    pool.sessions[session].length = start + count


def read(pool: KVPool, session: str, count: int) -> torch.Tensor:
    keys = torch.cat([pool.flat(0)[0][a:b] for a, b in pool.runs(session, count)])  # through the runs
    values = pool.flat(1)[1][torch.tensor(pool.slots(session, 0, count))]  # through the page table
    assert torch.equal(keys, values)
    return keys[:, 0, 0]


def test_fork_shares_full_pages_copies_the_partial_one_and_takes_only_what_it_does_not_share():
    pool = pool_with()
    free = free_pages(pool)
    fill(pool, "a", 0, 10, 0.0)  # 3 pages: 2 full, 1 partial
    assert free_pages(pool) == free - 3
    pool.fork("a", "b", 10, positions=12)  # 12 positions fit its 3 pages: only the partial page's copy is taken
    a, b = pool.sessions["a"].pages, pool.sessions["b"].pages
    assert b[:2] == a[:2] and b[2] != a[2] and len(b) == 3 and pool.sessions["b"].length == 10
    assert [pool.holders(p) for p in a] == [2, 2, 1] and pool.holders(b[2]) == 1 and pool.shared_pages == 2
    assert free_pages(pool) == free - 4
    assert pool.stats == {"forks": 1, "pages_shared": 2, "pages_copied": 1}
    assert torch.equal(read(pool, "b", 10), torch.arange(10.0))
    pool.fork("a", "c", 8)  # page-aligned: nothing copied, nothing taken
    assert free_pages(pool) == free - 4 and pool.holders(a[0]) == 3 and pool.stats["pages_copied"] == 1


def test_writes_into_shared_pages_are_copied_first_and_never_leak():
    pool = pool_with()
    fill(pool, "a", 0, 10, 0.0)
    pool.fork("a", "b", 10)
    fill(pool, "b", 10, 3, 100.0)  # the fork goes on in its own (copied) page
    fill(pool, "a", 10, 3, 200.0)  # and so does the source
    assert pool.stats["pages_copied"] == 1
    fill(pool, "a", 5, 1, 300.0)  # the source rewinds into the second shared page: it gets a copy of it
    assert pool.stats["pages_copied"] == 2 and pool.shared_pages == 1
    assert torch.equal(read(pool, "a", 6), torch.tensor([0.0, 1, 2, 3, 4, 305]))
    assert torch.equal(read(pool, "b", 13), torch.cat([torch.arange(10.0), 100 + torch.arange(10.0, 13)]))
    fill(pool, "b", 0, 2, 400.0)  # the fork rewinds to 0: the last shared page is copied, nobody shares now
    assert pool.shared_pages == 0 and pool.stats["pages_copied"] == 3
    assert torch.equal(read(pool, "a", 6), torch.tensor([0.0, 1, 2, 3, 4, 305]))
    assert torch.equal(read(pool, "b", 2), torch.tensor([400.0, 401]))


def test_closing_drops_references_and_the_pool_returns_to_its_start():
    pool = pool_with(grow="double")
    free = free_pages(pool)
    fill(pool, "a", 0, 9, 0.0)
    pool.fork("a", "b", 9, positions=40)
    own = len(pool.sessions["b"].pages) - 2
    assert own == 8  # 40 positions = 10 pages, 2 of them shared: doubling does not count the shared ones
    pool.close("a")  # the source first: its shared pages stay, held by the fork
    assert pool.shared_pages == 0 and all(pool.holders(p) == 1 for p in pool.sessions["b"].pages)
    assert torch.equal(read(pool, "b", 9), torch.arange(9.0))
    pool.close("b")
    assert free_pages(pool) == free and pool.shared_pages == 0


def test_a_fork_is_all_or_nothing():
    pool = pool_with(tokens=16)  # 4 pages
    fill(pool, "a", 0, 10, 0.0)
    with pytest.raises(PoolExhausted):
        pool.fork("a", "b", 10, positions=16)  # the partial copy fits, the room after it does not
    assert "b" not in pool.sessions and free_pages(pool) == 1 and pool.shared_pages == 0
    with pytest.raises(SessionError, match="unknown session 'x'"):
        pool.fork("x", "b", 1)
    with pytest.raises(SessionError, match="has 10 positions cached"):
        pool.fork("a", "b", 11)
    with pytest.raises(SessionError, match="already has a cache"):
        pool.fork("a", "a", 1)
    pool.fork("a", "b", 10)  # its partial page takes the last free one
    with pytest.raises(PoolExhausted, match="no free page to copy"):
        pool.reserve_all([("a", 2, 3)])  # a write into a shared page needs a copy
    assert pool.sessions["a"].length == 2 and pool.shared_pages == 2  # rewound, nothing else changed


# ---- a segment and the CUDA engine ------------------------------------------------------------------------

ON_CUDA = torch.cuda.is_available()
TABLE = torch.randn(100, 64, generator=torch.Generator().manual_seed(3))  # "token" -> its row (C = 64)


def cuda_engine(segment: Segment):
    """The CUDA engine over the segment (graphs on a GPU; on the CPU, Triton's interpreter), or a skip."""
    ops = pytest.importorskip("runtime.triton_ops")
    if not ops.AVAILABLE:
        pytest.skip("triton is not installed")
    if not ON_CUDA and type(ops._rms_norm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)")
    from runtime.cuda import CudaEngine

    return CudaEngine(segment, dtype=torch.float32, device="cuda" if ON_CUDA else "cpu", graphs=ON_CUDA,
                      pool_tokens=1024, max_positions=256, prefill_chunk=16)


@pytest.fixture(scope="module", params=["segment", "cuda"])
def backend(request, tiny_glm):
    """The tail of the tiny model ([2, L) + head) as a PyTorch segment, or as the CUDA engine."""
    segment = Segment.from_checkpoint(tiny_glm, 2, load_spec(tiny_glm).num_layers, head=True)
    return segment if request.param == "segment" else cuda_engine(segment)


def run(segment, session: str, start: int, ids: list[int]) -> torch.Tensor:
    return segment([SegmentInput(session, start, hidden=TABLE[ids])])[0].float().cpu()  # (T, V)


def test_a_forked_session_computes_what_a_full_prefill_does_and_rewinds_do_not_leak(backend):
    prompt = [(7 * i + 3) % 100 for i in range(37)]  # 2 full pages of 16 and a partial one
    tail, more = [5, 17, 29, 41], [60, 61, 62, 63]
    P = len(prompt)
    # sessions that prefill everything themselves, in the same passes as the fork and its source
    want = torch.cat([run(backend, "ref", 0, prompt[:-1]), run(backend, "ref", P - 1, prompt[-1:])]
                     + [run(backend, "ref", P + i, tail[i : i + 1]) for i in range(4)])  # (P + 4, V)
    want_src = torch.cat([run(backend, "ref2", 0, prompt), run(backend, "ref2", P, more[:3]),
                          run(backend, "ref2", P + 3, more[3:])])
    rewound = [run(backend, "ref3", 0, prompt[:20] + [1, 2]), run(backend, "ref3", 22, [3])]
    rewound += [run(backend, "ref4", 0, prompt[:3] + [90, 91, 92]), run(backend, "ref4", 6, [93])]
    run(backend, "src", 0, prompt)
    pool, stats = backend.pool, backend.stats
    positions, copies = stats["positions"], pool.stats["pages_copied"]
    backend.fork_session("src", "fork", P - 1)
    assert stats["forked_positions"] == P - 1 and pool.shared_pages == 2
    torch.testing.assert_close(run(backend, "fork", P - 1, prompt[-1:]), want[P - 1 : P], atol=1e-5, rtol=1e-5)
    run(backend, "src", P, more[:3])  # the source generates on
    run(backend, "fork", 20, [1, 2])  # the fork rewinds into the second shared page: its own copy of it ...
    torch.testing.assert_close(run(backend, "fork", 22, [3]), rewound[1], atol=1e-5, rtol=1e-5)  # read there
    run(backend, "fork", 20, prompt[20:])  # ... and restores its prompt there
    got = torch.cat([run(backend, "fork", P + i, tail[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(got, want[P : P + 2], atol=1e-5, rtol=1e-5)
    got = run(backend, "src", P + 3, more[3:])  # the source still reads its own prompt in that page
    torch.testing.assert_close(got, want_src[P + 3 :], atol=1e-5, rtol=1e-5)
    run(backend, "src", 3, [90, 91, 92])  # the source rewinds into the first shared page: its own copy of it
    torch.testing.assert_close(run(backend, "src", 6, [93]), rewound[3], atol=1e-5, rtol=1e-5)
    got = run(backend, "fork", P + 2, tail[2:3])  # the fork still reads the prompt there
    torch.testing.assert_close(got, want[P + 2 : P + 3], atol=1e-5, rtol=1e-5)
    assert pool.stats["pages_copied"] - copies == 3 and pool.shared_pages == 0
    assert stats["positions"] == positions + 1 + 3 + 2 + 1 + (P - 20) + 2 + 1 + 3 + 1 + 1
    for session in ("ref", "ref2", "ref3", "ref4", "src", "fork"):
        backend.close_session(session)
    assert pool.free_positions == pool.capacity_positions


# ---- the terminal ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tail(tiny_glm) -> Segment:
    spec = load_spec(tiny_glm)
    segment = Segment.from_checkpoint(tiny_glm, 2, spec.num_layers, head=True)
    segment.configure_pool(tokens=1024)
    return segment


P, STEPS = 21, 4


def rows(n: int, seed: int, width: int = 64) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))  # (n, C)


PROMPT = rows(P, 1)
DECODE = rows(STEPS, 2)  # the rows after the first STEPS tokens (the terminal does not care which tokens)


def frame(session: str, seq: int, start: int, params: pb.GenerationParams | None = None, fork_of: str = ""):
    f = pb.Frame(session_id=session, seq=seq, start_pos=start, fork_of=fork_of)
    if params is not None:
        f.params.CopyFrom(params)
    return f


def generation(send, session: str, params: pb.GenerationParams, fork_of: str = "") -> list[tuple]:
    """A session's answers: (tokens, logprobs, top log-probs), its first frame a fork or the whole prompt."""
    first = frame(session, 0, P - 1, params, fork_of) if fork_of else frame(session, 0, 0, params)
    answers = [send(first, PROMPT[P - 1 :] if fork_of else PROMPT)]
    for i in range(STEPS):
        answers.append(send(frame(session, i + 1, P + i), DECODE[i : i + 1]))
    for a in answers:
        assert not a.error, a.error
    return [(list(a.tokens), list(a.logprobs), [list(t.logprobs) for t in a.top_logprobs]) for a in answers]


def same(got: list[tuple], want: list[tuple]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1] == pytest.approx(w[1], abs=1e-5) and len(g[2]) == len(w[2])
        for a, b in zip(g[2], w[2]):
            assert a == pytest.approx(b, abs=1e-5)


PARAMS = {
    "greedy": pb.GenerationParams(max_tokens=8, top_logprobs=3),
    "seeded": pb.GenerationParams(max_tokens=8, temperature=0.9, seed=11),
}


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("scheduled", [False, True], ids=["step", "submit"])
def test_fork_answers_equal_a_fresh_prefill(tail, kind, scheduled):
    scheduler = Scheduler(tail, prefill_chunk=8).start() if scheduled else None
    terminal = Terminal(tail, scheduler=scheduler)
    send = (lambda f, h: terminal.submit(f, h).result(timeout=60)) if scheduled else terminal.step
    free = tail.kv_pool().free_positions
    other = pb.GenerationParams(max_tokens=3, temperature=1.3, seed=5)  # the source's own parameters
    try:
        want = generation(send, "fresh", PARAMS[kind])
        terminal.close("fresh").result()
        if scheduled:  # the fork is sent before the source's (chunked) prefill is done: it waits for it
            first = terminal.submit(frame("src", 0, 0, other), PROMPT)
            fork = terminal.submit(frame("f", 0, P - 1, PARAMS[kind], "src"), PROMPT[P - 1 :])
            assert not first.result(timeout=60).error and not fork.result(timeout=60).error
            terminal.close("f").result()
        else:
            send(frame("src", 0, 0, other), PROMPT)
        counts = dict(terminal.counts)
        got = generation(send, "fork", PARAMS[kind], fork_of="src")
        same(got, want)
        assert terminal.counts["prefill_positions"] - counts["prefill_positions"] == 1  # the prompt: once
        assert terminal.counts["forked_positions"] - counts["forked_positions"] == P - 1
        assert tail.pool.stats["forks"] >= 1
    finally:
        for session in ("fresh", "src", "f", "fork"):
            terminal.close(session).result()
        if scheduler is not None:
            scheduler.stop()
    assert tail.kv_pool().free_positions == free and tail.pool.shared_pages == 0
    assert terminal.stats()["sessions"] == 0 and terminal.stats()["caches"] == 0


def test_closing_the_source_first_does_not_break_the_fork(tail):
    terminal = Terminal(tail)
    free = tail.kv_pool().free_positions
    params = PARAMS["seeded"]
    want = generation(terminal.step, "fresh", params)
    terminal.close("fresh")
    terminal.step(frame("src", 0, 0, params), PROMPT)
    first = terminal.step(frame("fork", 0, P - 1, params, "src"), PROMPT[P - 1 :])
    terminal.close("src")
    got = [first] + [terminal.step(frame("fork", i + 1, P + i), DECODE[i : i + 1]) for i in range(STEPS)]
    same([(list(a.tokens), list(a.logprobs), []) for a in got], [(w[0], w[1], []) for w in want])
    terminal.close("fork")
    assert tail.kv_pool().free_positions == free


@pytest.mark.parametrize("scheduled", [False, True], ids=["step", "submit"])
def test_forks_the_tier_cannot_serve_are_refused_with_their_status(tail, scheduled):
    scheduler = Scheduler(tail).start() if scheduled else None
    terminal = Terminal(tail, scheduler=scheduler)

    def status(f, h):
        if not scheduled:
            return STATUS_NAMES[terminal.step(f, h).status]
        try:
            terminal.submit(f, h).result(timeout=60)
        except StepError as e:
            return e.status
        return "OK"

    params = PARAMS["greedy"]
    try:
        assert status(frame("src", 0, 0, params), PROMPT[:5]) == "OK"
        assert status(frame("f", 0, 4, params, "nobody"), PROMPT[:1]) == "NOT_FOUND"
        assert status(frame("f", 0, 6, params, "src"), PROMPT[:1]) == "FAILED_PRECONDITION"  # src holds 5
        assert terminal.stats()["sessions"] == 1 and "f" not in tail.sessions  # nothing of the refused forks
        assert status(frame("f", 0, 5, params, "src"), PROMPT[:1]) == "OK"  # all 5 of them: fine
    finally:
        for session in ("src", "f"):
            terminal.close(session).result()
        if scheduler is not None:
            scheduler.stop()


def test_a_fork_without_room_leaves_nothing(tiny_glm):
    segment = Segment.from_checkpoint(tiny_glm, 4, load_spec(tiny_glm).num_layers, head=True)
    segment.configure_pool(tokens=64)  # 4 pages of 16
    scheduler = Scheduler(segment).start()
    terminal = Terminal(segment, scheduler=scheduler)
    try:
        terminal.submit(frame("src", 0, 0, pb.GenerationParams(max_tokens=8)), PROMPT).result(timeout=60)  # 2 pages
        free = segment.pool.free_positions
        with pytest.raises(StepError) as refused:
            terminal.submit(frame("f", 0, P - 1, pb.GenerationParams(max_tokens=40), "src"),
                            PROMPT[P - 1 :]).result(timeout=60)
        assert refused.value.status == "RESOURCE_EXHAUSTED"
        assert segment.pool.free_positions == free and "f" not in segment.sessions
        assert terminal.stats()["sessions"] == 1
    finally:
        terminal.close("src").result()
        scheduler.stop()


def test_the_local_chain_forks_every_segment(tiny_glm):
    L = load_spec(tiny_glm).num_layers
    local = LocalTail([Segment.from_checkpoint(tiny_glm, 1, 3), Segment.from_checkpoint(tiny_glm, 3, L, head=True)])
    params = PARAMS["seeded"]
    want = generation(local.terminal.step, "fresh", params)
    local.terminal.step(frame("src", 0, 0, params), PROMPT)
    got = generation(local.terminal.step, "fork", params, fork_of="src")
    same(got, want)
    assert all(s.stats["forked_positions"] == P - 1 for s in local.segments)


def test_onnx_segments_fork_by_copying(tiny_glm, tmp_path):
    from runtime.backends import OnnxSegment, export_onnx

    L = load_spec(tiny_glm).num_layers
    export_onnx(Segment.from_checkpoint(tiny_glm, L - 2, L, head=True), tmp_path)
    onnx = OnnxSegment(tmp_path)
    prompt = list(range(10, 31))
    want = run(onnx, "ref", 0, prompt + [5, 6])
    run(onnx, "src", 0, prompt)
    onnx.fork_session("src", "fork", len(prompt) - 1)
    run(onnx, "src", 2, [90])  # the source rewinds: the fork holds its own copy
    got = run(onnx, "fork", len(prompt) - 1, prompt[-1:] + [5, 6])
    torch.testing.assert_close(got, want[-3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(SessionError, match="has 3 positions cached"):
        onnx.fork_session("src", "other", 4)
    with pytest.raises(SessionError, match="already has a cache"):
        onnx.fork_session("src", "fork", 1)
