"""Fixtures shared by the edge tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cloud(tiny_plan):
    """A real cloud process serving tiny_plan's cloud tier; its address (host:port)."""
    from tests.edge_node.test_cloud_client import start_cloud

    proc, address = start_cloud(tiny_plan)
    yield address
    assert proc.stop() == 0, proc.output


@pytest.fixture(scope="module")
def device_segment(tiny_plan):
    """tiny_plan's device tier (embedding + [0, k1)), for tests that play the device."""
    from runtime.artifacts import load_tier

    return load_tier(tiny_plan, "device")


@pytest.fixture(scope="module")
def spec_plan(tiny_glm, tmp_path_factory) -> str:
    """The tiny plan with lossless fp32 frames and the default fast tail (int8 weights): its drafts are mostly,
    not always, right."""
    from partitioner.plan.export import cached_plan, fixed_plan

    plan = fixed_plan((2, 4), ("fp32", "fp32"))
    return str(cached_plan(tiny_glm, plan, tmp_path_factory.mktemp("spec-plans")))


@pytest.fixture(scope="module")
def url(node):
    """The module's ``node`` served by the edge's HTTP app (a real uvicorn on a free loopback port): its URL."""
    from edge_node.http_api import create_app
    from tests.local_chain import serve

    with serve(create_app(node)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    """The official ``openai`` client of ``url``."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
