"""The edge's HTTP API under schemathesis: cases generated from the app's own OpenAPI schema, sent to a live server.

Every operation of ``/openapi.json`` (completions, chat, models, health,
metrics), with bodies, paths and headers that fit the schema (positive) and
that do not (negative). Properties: every request is answered within
``HANG_S``; no answer is a 5xx; a 4xx carries OpenAI's error body; a 200
completion has its choices. At the end a fixed greedy completion gives the
same text as before the run.
"""

from __future__ import annotations

import json

import requests
import schemathesis
from schemathesis import GenerationMode

from . import HANG_S, FuzzFailure, expect, no_hang

HEALTHY = {"prompt": "fuzz me", "max_tokens": 4, "temperature": 0, "seed": 1}


class HttpTarget:
    """Fuzzes the HTTP API served at ``base_url`` (``http://HOST:PORT``)."""

    name = "http"

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.schema = schemathesis.openapi.from_url(f"{self.base_url}/openapi.json")
        self.session = requests.Session()
        self.healthy_text = self.healthy()

    def strategy(self):
        return self.schema.as_strategy(GenerationMode.POSITIVE) | self.schema.as_strategy(GenerationMode.NEGATIVE)

    def check(self, case) -> None:
        what = f"{case.method} {case.formatted_path}"
        with no_hang(what):
            try:
                response = case.call(base_url=self.base_url, session=self.session, timeout=HANG_S)
            except requests.RequestException as e:
                raise FuzzFailure(f"{what}: no answer ({e!r}); reproduce: {case.as_curl_command()}") from e
        status = response.status_code
        text = response.content[:300]
        expect(status < 500, f"{what} answered {status} {text!r}; reproduce: {case.as_curl_command()}")
        if 400 <= status < 500:
            error = _json(response.content).get("error")
            expect(isinstance(error, dict) and error.get("message") and error.get("type"),
                   f"{what} answered {status} without OpenAI's error body: {text!r}")
        elif status == 200 and case.path.endswith("completions") and b"text/event-stream" not in _type(response):
            expect(bool(_json(response.content).get("choices")), f"{what} answered 200 without choices: {text!r}")

    def healthy(self) -> str:
        r = self.session.post(f"{self.base_url}/v1/completions", json=HEALTHY, timeout=HANG_S * 3)
        expect(r.status_code == 200, f"the healthy completion failed: {r.status_code} {r.text[:300]}")
        return r.json()["choices"][0]["text"]

    def finish(self) -> None:
        again = self.healthy()
        expect(again == self.healthy_text, f"the healthy completion changed: {self.healthy_text!r} -> {again!r}")

    def close(self) -> None:
        self.session.close()


def _json(content: bytes) -> dict:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _type(response) -> bytes:
    values = response.headers.get("content-type") or [""]
    return (values[0] if isinstance(values, list) else values).encode()
