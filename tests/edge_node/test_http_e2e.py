"""End to end: the openai client -> real ``python -m edge_node`` (HTTP) -> real ``python -m cloud_service`` (gRPC).

The demo model's plan with lossless fp32 frames, so the split must give the
monolithic transformers model's greedy tokens on the chat-templated prompt.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from partitioner.plan.demo import demo_plan
from runtime.checkpoint import load_hf_model, load_tokenizer
from tests.procs import Proc

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]
MAX_TOKENS = 20


CLOUD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cuda: through the device tool


@pytest.fixture(scope="module", params=CLOUD_DEVICES)
def edge_url(request, demo_checkpoint):
    """The edge in front of a cloud on the CPU and, where there is one, on the GPU (fp32 weights either way)."""
    plan = str(demo_plan(demo_checkpoint, codecs=("fp32", "fp32")))
    procs: list[Proc] = []
    try:
        cloud = Proc.python("cloud", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", "0",
                            "--threads", "1", "--device", request.param, "--dtype", "float32")  # fmt: skip
        procs.append(cloud)
        address = cloud.ready(180).removeprefix("grpc://")
        edge = Proc.python("edge", "edge_node", "--plan", plan, "--cloud", address, "--broker", "",
                           "--http-host", "127.0.0.1", "--http-port", "0", "--threads", "1",
                           "--model-name", "smollm2")  # fmt: skip
        procs.append(edge)
        yield edge.ready(180)
    finally:
        codes = {p.name: p.stop() for p in reversed(procs)}
    assert codes == {p.name: 0 for p in procs}, "\n".join(p.output for p in procs)


@pytest.fixture(scope="module")
def monolithic_text(demo_checkpoint) -> tuple[list[int], str]:
    """The monolithic model's greedy tokens and text on the chat-templated prompt."""
    tokenizer = load_tokenizer(demo_checkpoint)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    model = load_hf_model(demo_checkpoint)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, len(ids) :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_chat_through_real_processes_equals_monolithic(edge_url, monolithic_text):
    tokens, text = monolithic_text
    client = openai.OpenAI(base_url=f"{edge_url}/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert text.strip() and r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(tokens)
    assert r.model_extra["splitglm"]["paths"] == ["accurate"] * len(tokens)
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_health_and_metrics_of_the_real_edge(edge_url):
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(f"{edge_url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    r = httpx.get(f"{edge_url}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["checks"]["cloud"] is True
    metrics = httpx.get(f"{edge_url}/metrics", timeout=10).text
    assert 'splitglm_edge_http_requests_total{api="chat",code="200"}' in metrics
    assert 'splitglm_edge_wire_bytes_total{direction="out",link="edge_cloud"}' in metrics
    r = httpx.post(f"{edge_url}/v1/chat/completions", json={"messages": [], "model": "smollm2"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
