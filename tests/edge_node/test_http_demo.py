"""The gateway's chat path on the real demo model (SmolLM2-135M as GLM) with its real tokenizer and chat template."""

from __future__ import annotations

import openai
import pytest

from edge_node.http_api import create_app
from runtime.checkpoint import load_tokenizer
from tests.local_chain import TestNode, greedy_tokens, serve

pytestmark = pytest.mark.slow
K1, K2 = 10, 20  # the demo plan's splits of the 30 layers


def test_chat_template_path_equals_chain_greedy(demo_checkpoint):
    tokenizer = load_tokenizer(demo_checkpoint)
    node = TestNode(demo_checkpoint, tokenizer, K1, K2, model_name="smollm2", max_tokens_limit=64)
    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(prompt).rstrip().endswith("assistant")  # the template added the generation prompt
    want = greedy_tokens(demo_checkpoint, K1, K2, prompt, 24, stop_ids=node.spec.eos_token_ids)
    with serve(create_app(node)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        assert node.generations[-1].prompt_ids == prompt
        assert node.generations[-1].tokens == want
        assert r.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
        assert "Paris" in r.choices[0].message.content
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want)
        assert r.choices[0].finish_reason == ("stop" if want[-1] in node.spec.eos_token_ids else "length")
        stream = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert node.generations[-1].tokens == want and text == r.choices[0].message.content
    assert node.open_sessions() == 0
