"""The edge's HTTP API fuzzed with schemathesis against its own OpenAPI schema, on a live server: no 5xx, no hang,
OpenAI's error body on every 4xx, and the same answer to a fixed request before and after.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from edge_node.http_api import create_app
from splitglm.fuzz import FuzzFailure
from splitglm.fuzz.gateway import HttpTarget
from tests.local_chain import TestNode, char_tokenizer, serve

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def node(tiny_glm):
    return TestNode(tiny_glm, char_tokenizer(), 1, 3, default_max_tokens=4, max_tokens_limit=8,
                    rate_per_key_per_min=0, max_concurrent_per_key=0)


@pytest.fixture(scope="module")
def target(node):
    with serve(create_app(node)) as url:
        target = HttpTarget(url)
        yield target
        target.close()


def test_schemathesis_cases_never_get_a_server_error(target, node):
    @settings(FUZZ, max_examples=400)
    @given(target.strategy())
    def fuzz(case):
        target.check(case)

    fuzz()
    target.finish()
    assert len(node.generations) >= 20  # valid requests were among the cases: the model really ran


def test_the_target_catches_a_server_error(target, node, monkeypatch):
    """The property has teeth: a node that raises inside a request makes a 500, which the target reports."""
    monkeypatch.setattr(node, "generation", lambda *a, **k: 1 / 0)
    with pytest.raises(FuzzFailure, match="answered 500"):
        case = target.schema["/v1/completions"]["POST"].Case(body={"prompt": "hi", "max_tokens": 2})
        target.check(case)
