"""bench cloud-gpu's reference step computes what the segment computes (so its ratio compares like with like)."""

from __future__ import annotations

import pytest
import torch

from runtime.checkpoint import GlmSpec
from runtime.cuda_weights import weights_of
from runtime.segment import Segment, SegmentInput
from splitglm.bench.gpu_reference import ReferenceStep

SPEC = GlmSpec(model_type="glm4", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
               num_kv_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True,
               tie_word_embeddings=False, eos_token_ids=())


@pytest.mark.parametrize("head", [False, True])
def test_reference_step_equals_the_segments_decode_steps(head):
    """Hidden rows of a segment without a head; with the head (as bench cloud-gpu's engine has it), its logits
    and their greedy tokens."""
    torch.manual_seed(0)
    segment = Segment(SPEC, 0, SPEC.num_layers, head=head).eval()
    with torch.no_grad():
        for name, p in segment.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref = ReferenceStep(SPEC, weights_of(segment, torch.float32, "cpu"), batch=2, context=8, device="cpu",
                        graph=False, compiled=False)
    for pos in range(3):  # each step attends to the cache the earlier ones wrote
        rows = torch.randn(2, SPEC.hidden_size)
        ref.x.copy_(rows)
        with torch.no_grad():
            got = ref() if not head else (ref(), ref.logits)[1]
            want = torch.cat([segment([SegmentInput(f"s{b}", pos, hidden=rows[b : b + 1])])[0] for b in range(2)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if head:
            assert torch.equal(ref.tokens, want.argmax(-1))
    assert int(ref.pos) == 3
