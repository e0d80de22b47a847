"""The cornerstone: device -> edge -> cloud segments in sequence equal the monolithic model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from runtime.checkpoint import load_hf_model, load_spec
from runtime.local import Chain, split_segments

ATOL = 1e-4


def monolithic_step_logits(hf, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The monolithic model with its own KV cache: ``prefill`` positions at once, then one at a time."""
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = [hf(ids[None, :prefill], cache=cache, use_cache=True).logits[0]]
        for i in range(prefill, ids.shape[0]):
            out.append(hf(ids[None, i : i + 1], cache=cache, use_cache=True).logits[0])
    return torch.cat(out)  # (T, V)


def split_step_logits(chain: Chain, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = [chain.step("s", 0, ids[:prefill])]
    out += [chain.step("s", i, ids[i : i + 1]) for i in range(prefill, ids.shape[0])]
    chain.close("s")
    return torch.cat(out)


def check_model(path: str, ids: torch.Tensor, splits: tuple[int, int], new_tokens: int = 32) -> None:
    hf = load_hf_model(path)
    chain = Chain(split_segments(path, *splits))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0]  # (T, V)
    torch.testing.assert_close(chain.step("one", 0, ids), reference, atol=ATOL, rtol=0)
    prefill = ids.shape[0] // 3
    torch.testing.assert_close(
        split_step_logits(chain, ids, prefill), monolithic_step_logits(hf, ids, prefill), atol=ATOL, rtol=0
    )
    prompt = ids[:8]
    expected = hf.generate(
        prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )[0, 8:].tolist()
    got = [token for token, _ in chain.generate(prompt.tolist(), new_tokens)]
    assert len(got) == new_tokens
    assert got == expected


@pytest.mark.parametrize("splits", [(2, 4), (0, 3), (3, 6), (0, 0), (6, 6)])
def test_tiny_split_equals_monolithic(tiny_checkpoint, splits):
    ids = torch.randint(0, load_spec(tiny_checkpoint).vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    check_model(tiny_checkpoint, ids, splits)


@pytest.mark.slow
def test_demo_model_split_equals_monolithic(demo_checkpoint, gpl3_text):
    from runtime.checkpoint import load_tokenizer

    ids = load_tokenizer(demo_checkpoint)(gpl3_text[:4000], return_tensors="pt").input_ids[0, :96]
    check_model(demo_checkpoint, ids, (10, 20), new_tokens=40)
