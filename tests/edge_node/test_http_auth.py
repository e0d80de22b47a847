"""HTTPS and API keys on the edge, with mutual TLS to a real ``python -m cloud_service`` behind it.

The cloud process serves gRPC with mutual TLS (test certificates of
``tests/tls.py``); the edge, in this process, reaches it with its client
certificate and serves HTTPS with an API key file. httpx and the official
``openai`` client verify the test CA. Without a key, with a wrong one or
another scheme, ``/v1/*`` answers 401 with OpenAI's error body and
``WWW-Authenticate: Bearer`` before any tokenising or generation;
the probes (``/livez``, ``/readyz``) stay open and ``/metrics`` needs the key. A real edge process
does the same from its flags.
"""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings, SettingsError
from runtime.local import Chain, split_segments
from tests.local_chain import CHARS
from tests.procs import Proc
from tests.tls import api_key, make_test_secrets

PROMPT = [3, 17, 5, 9, 11, 40, 2]
UNAUTHORIZED = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    return make_test_secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="module")
def key(secrets) -> str:
    return api_key(secrets)


@pytest.fixture(scope="module")
def mtls_cloud(talking_plan, secrets):
    """A real cloud process on a mutual-TLS port; its HOST:PORT."""
    proc = Proc.python("cloud", "cloud_service", "--plan", talking_plan, "--host", "127.0.0.1", "--port", "0",
                       "--threads", "1", "--tls-cert", str(secrets / "cloud/server.crt"),
                       "--tls-key", str(secrets / "cloud/server.key"), "--tls-client-ca", str(secrets / "ca.crt"))
    try:
        url = proc.ready(120)
        assert url.startswith("grpcs://127.0.0.1:") and "mutual TLS" in proc.output
        yield url.removeprefix("grpcs://")
    finally:
        assert proc.stop() == 0, proc.output


def secure_flags(secrets) -> dict:
    return {
        "cloud_ca": secrets / "ca.crt", "cloud_cert": secrets / "edge/client.crt",
        "cloud_key": secrets / "edge/client.key", "tls_cert": secrets / "edge/server.crt",
        "tls_key": secrets / "edge/server.key", "api_keys_file": secrets / "api-key",
    }  # fmt: skip


@pytest.fixture(scope="module")
def node(talking_plan, mtls_cloud, secrets):
    """An edge node over HTTPS with API keys, reaching the cloud over mutual TLS (it waits for its health)."""
    edge = EdgeNode(EdgeSettings(plan=talking_plan, broker="", cloud=mtls_cloud, http_host="127.0.0.1",
                                 http_port=0, connect_timeout_s=30, speculate=False, **secure_flags(secrets)))
    try:
        edge.start()
        yield edge
    finally:
        edge.close()


def trusting(secrets) -> ssl.SSLContext:
    """A client TLS context that trusts the test CA (only)."""
    return ssl.create_default_context(cafile=str(secrets / "ca.crt"))


@pytest.fixture(scope="module")
def https(node, secrets):
    with httpx.Client(base_url=node.url, verify=trusting(secrets), timeout=60) as client:
        yield client


@pytest.fixture()
def model_work(node, monkeypatch):
    """Counts of tokenizer calls and generations the node starts during a test."""
    calls = {"tokenize": 0, "generation": 0}
    tokenizer, generation = node.tokenizer, node.generation

    class Counting:
        def __getattr__(self, name):
            if name in ("encode", "apply_chat_template"):
                calls["tokenize"] += 1
            return getattr(tokenizer, name)

    def counted(*args, **kw):
        calls["generation"] += 1
        return generation(*args, **kw)

    monkeypatch.setattr(node, "tokenizer", Counting())
    monkeypatch.setattr(node, "generation", counted)
    return calls


def refused(node, reason: str) -> float:
    return node.metrics.registry.get_sample_value("splitglm_edge_http_refused_total", {"reason": reason}) or 0.0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def expected(tiny_glm, n: int) -> str:
    return "".join(CHARS[t] for t, _ in Chain(split_segments(tiny_glm, 2, 4)).generate(PROMPT, n))


def test_https_with_the_key_serves_through_mutual_tls(node, https, tiny_glm, secrets, key):
    assert node.url.startswith("https://127.0.0.1:")
    r = https.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0},
                   headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(tiny_glm, 6)
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0, timeout=60,
                           http_client=httpx.Client(verify=trusting(secrets)))
    chat = client.chat.completions.create(model=node.model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0)
    assert chat.usage.completion_tokens == 3


@pytest.mark.parametrize("given, reason", [
    (lambda key: {}, "missing_api_key"),
    (lambda key: bearer("sk-wrong"), "invalid_api_key"),
    (lambda key: bearer(key[:-1]), "invalid_api_key"),
    (lambda key: bearer(key + "x"), "invalid_api_key"),
    (lambda key: {"Authorization": f"Basic {key}"}, "missing_api_key"),
])  # fmt: skip
def test_v1_without_a_good_key_is_401_before_model_work(node, https, model_work, key, given, reason):
    before, headers = refused(node, reason), given(key)
    for method, path, body in (("POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("GET", "/v1/models", None)):
        r = https.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert {k: error[k] for k in UNAUTHORIZED} == UNAUTHORIZED
    assert model_work == {"tokenize": 0, "generation": 0}
    assert refused(node, reason) == before + 3


def test_openai_client_with_a_wrong_key_gets_authentication_error(node, secrets):
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="sk-nope", max_retries=0, timeout=30,
                           http_client=httpx.Client(verify=trusting(secrets)))
    with pytest.raises(openai.AuthenticationError) as info:
        client.completions.create(model=node.model_name, prompt="hi", max_tokens=1)
    assert info.value.code == "invalid_api_key"


def test_probes_are_open_and_metrics_needs_the_key(node, https, key):
    assert https.get("/livez").json() == {"status": "alive"}
    for path in ("/readyz", "/healthz"):
        r = https.get(path)
        assert r.status_code == 200 and r.json()["status"] == "ready"
    r = https.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = https.get("/metrics", headers=bearer(key))
    assert r.status_code == 200 and 'splitglm_edge_http_refused_total{reason="missing_api_key"}' in r.text


def test_plain_http_and_an_untrusted_certificate_are_refused(node):
    with pytest.raises(httpx.HTTPError):
        httpx.get(node.url.replace("https://", "http://") + "/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{node.url}/healthz", timeout=10)  # the system's CAs do not know the test CA


def test_edge_tls_settings_are_checked(talking_plan, secrets):
    base = ["--plan", talking_plan, "--broker", ""]
    cert, key, ca = (str(secrets / p) for p in ("edge/client.crt", "edge/client.key", "ca.crt"))
    cases = [
        (["--cloud-ca", ca, "--cloud-cert", cert], "cloud_cert and cloud_key go together"),
        (["--cloud-cert", cert, "--cloud-key", key], "give cloud_ca too"),
        (["--cloud-server-name", "cloud"], "give cloud_ca too"),
        (["--tls-key", key], "tls_cert and tls_key go together"),
        (["--api-keys-file", str(secrets / "missing")], "no such file"),
        (["--mqtt-username", "edge-a", "--mqtt-password-file", str(secrets / "missing")], "no such file"),
        (["--mqtt-ca-file", str(secrets / "missing")], "no such file"),
        (["--max-prompt-tokens", "8192"], "leaves no room"),
    ]
    for flags, words in cases:
        with pytest.raises(SettingsError, match=words):
            EdgeSettings.load([*base, *flags])
    assert EdgeSettings.load([*base, "--cloud-ca", ca, "--cloud-cert", cert, "--cloud-key", key]).cloud_key


def test_edge_process_serves_https_with_keys(talking_plan, mtls_cloud, secrets, key):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in secure_flags(secrets).items()]
    edge = Proc.python("edge", "edge_node", "--plan", talking_plan, "--broker", "", "--cloud", mtls_cloud,
                       "--http-host", "127.0.0.1", "--http-port", "0", *flags)
    try:
        url = edge.ready(120)
        assert url.startswith("https://127.0.0.1:") and "HTTPS (API keys), gRPC over mutual TLS" in edge.output
        with httpx.Client(base_url=url, verify=trusting(secrets), timeout=60) as client:
            assert client.get("/v1/models").status_code == 401
            r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=bearer(key))
            assert r.status_code == 200, r.text
    finally:
        assert edge.stop() == 0, edge.output


def test_a_key_of_another_certificate_fails_the_edge_start(talking_plan, mtls_cloud, secrets):
    flags = {**secure_flags(secrets), "tls_key": secrets / "cloud/server.key"}
    edge = EdgeNode(EdgeSettings(plan=talking_plan, broker="", cloud=mtls_cloud, http_host="127.0.0.1",
                                 http_port=0, connect_timeout_s=30, **flags))
    try:
        with pytest.raises(OSError, match="HTTPS certificate .* with key"):
            edge.start()
    finally:
        edge.close()
