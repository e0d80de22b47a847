"""``sample_static`` (fixed shapes, device buffers) gives ``sample_processed``'s tokens, log-probabilities and
top alternatives for the same rows, whatever each row asks."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.sampling import SamplingParams, sample_processed
from runtime.static_sampling import StaticRows, TooManyPairs, sample_static

V = 300


def _mask(rng: random.Random, vocab: int) -> torch.Tensor:
    allowed = torch.zeros(-(-vocab // 32) * 32, dtype=torch.bool)
    allowed[torch.tensor(rng.sample(range(vocab), rng.randint(1, 40)))] = True
    return _pack(allowed)


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    words = allowed.view(-1, 32).long() << torch.arange(32)
    packed = words.sum(1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _rows(rng: random.Random, n: int):
    rows = []
    for i in range(n):
        kind = rng.random()
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9, 0.5]), seed=rng.randint(0, 99),
            top_k=rng.choice([0, 0, 5, 50]), min_p=rng.choice([0.0, 0.0, 0.05]),
            presence_penalty=rng.choice([0.0, 0.5, -1.0]), frequency_penalty=rng.choice([0.0, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.2, 0.8]),
            logit_bias=tuple((t, rng.uniform(-5, 5)) for t in rng.sample(range(V), rng.randint(0, 4))),
            top_logprobs=rng.choice([0, 0, 3, 20]))
        seen = [tuple((t, rng.randint(1, 4)) for t in rng.sample(range(V), rng.randint(0, 12)))]
        masks = [_mask(rng, V)] if kind < 0.4 else None
        rows += params.rows(100 + i, 1, seen=seen, masks=masks)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_static_sampling_equals_the_processed_path(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 5, 8])
    rows = _rows(rng, n)
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(seed)) * 3
    buffers = StaticRows(8, V, "cpu", max_seen=16, max_bias=8)
    buffers.fill(rows)
    got = sample_static(logits, buffers)
    want = sample_processed(logits[:n], rows)
    assert got.tokens[:n].tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs[:n], want.logprobs, rtol=0, atol=0)
    if want.top_tokens is not None:
        k = want.top_tokens.shape[1]
        assert torch.equal(got.top_tokens[:n, :k], want.top_tokens)
        torch.testing.assert_close(got.top_logprobs[:n, :k], want.top_logprobs, rtol=0, atol=0)


def test_a_grammar_row_only_takes_allowed_ids_and_padding_rows_are_greedy():
    rng = random.Random(9)
    mask = _mask(rng, V)
    rows = SamplingParams(temperature=1.0, seed=3).rows(7, 1, masks=[mask])
    buffers = StaticRows(4, V, "cpu")
    buffers.fill(rows)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    out = sample_static(logits, buffers)
    token = int(out.tokens[0])
    assert (int(mask[token // 32]) >> (token % 32)) & 1
    assert out.tokens[1:].tolist() == logits[1:].argmax(-1).tolist()


def test_too_many_pairs_for_the_buffers_is_refused():
    rows = SamplingParams(presence_penalty=0.5).rows(3, 1, seen=[tuple((t, 1) for t in range(20))])
    with pytest.raises(TooManyPairs, match="20 seen"):
        StaticRows(2, V, "cpu", max_seen=16).fill(rows)


def test_refilled_buffers_hold_only_the_new_rows():
    """A fill after another (rows that asked more, in other places) answers as fresh buffers do: nothing of
    the earlier rows' pairs or masks stays."""
    rng = random.Random(4)
    first, second = _rows(rng, 8), _rows(rng, 8)
    second = [None, *second[1:5], None, None, second[7]]  # None: a row the pass does not sample here
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(5)) * 3
    reused = StaticRows(8, V, "cpu", max_seen=16, max_bias=8)
    reused.fill(first)
    reused.fill(second)
    fresh = StaticRows(8, V, "cpu", max_seen=16, max_bias=8)
    fresh.fill(second)
    for name in ("scalars", "seen_ids", "seen_counts", "bias_ids", "bias_values", "mask"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name)), name
    got = sample_static(logits, reused)
    kept = [i for i, r in enumerate(second) if r is not None]
    want = sample_processed(logits[kept], [second[i] for i in kept])
    assert got.tokens[kept].tolist() == want.tokens.tolist()
    assert got.tokens[0].item() == logits[0].argmax().item()  # a None row: greedy, unprocessed


@pytest.mark.parametrize("asked", [(), ("temperature",), ("top_k", "min_p"), ("seen",), ("bias", "top_logprobs"),
                                   ("mask",)])
def test_skipping_what_no_row_asks_changes_no_answer(asked):
    """``sample_static(..., need)`` skips work only where ``needs`` says no row asks it: the same answers."""
    from dataclasses import replace

    from runtime.static_sampling import needs

    rng = random.Random(11)
    neutral = {"temperature": 0.0, "top_k": 0, "min_p": 0.0, "seen": (), "bias": (), "top_logprobs": 0, "mask": None}
    rows = [replace(r, **{k: v for k, v in neutral.items() if k not in asked}) for r in _rows(rng, 8)]
    rows[0] = replace(rows[0], mask=_mask(rng, V)) if "mask" in asked else rows[0]
    need = needs(rows)
    assert sum(need) == len(asked) + ("top_k" in asked) * 0 and any(need) == bool(asked)
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(2)) * 3
    buffers = StaticRows(8, V, "cpu", max_seen=16, max_bias=8)
    buffers.fill(rows)
    full, skipped = sample_static(logits, buffers), sample_static(logits, buffers, need)
    assert torch.equal(full.tokens, skipped.tokens) and torch.equal(full.logprobs, skipped.logprobs)
    assert (skipped.top_tokens is None) == (not need.top)
