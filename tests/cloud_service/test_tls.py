"""gRPC over TLS and mutual TLS between the edge and a real cloud server: who gets through, who does not.

The server is the real one (``serve``) on a TLS port; the clients are the
edge's own ``CloudClient`` / ``open_channel`` with test certificates
(``tests/tls.py``): the edge's client certificate is served, no certificate,
one from another CA, a plaintext channel and a wrong server name are refused
at the handshake (UNAVAILABLE), before any RPC runs.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.settings import CloudSettings, SettingsError
from edge_node.cloud import ChannelTls, CloudClient, open_channel
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from splitglm.cli import main as cli
from tests.cloud_service.conftest import reference, start_cloud
from tests.tls import make_test_secrets, other_ca

PROMPT = [3, 17, 5, 9, 11]


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    out = make_test_secrets(tmp_path_factory.mktemp("secrets"))
    other_ca(out)
    return out


@pytest.fixture(scope="module")
def mtls_cloud(tiny_plan, secrets):
    with start_cloud(tiny_plan, tls_cert=secrets / "cloud/server.crt", tls_key=secrets / "cloud/server.key",
                     tls_client_ca=secrets / "ca.crt") as server:
        yield server


def edge_tls(secrets, **kw) -> ChannelTls:
    return ChannelTls(secrets / "ca.crt", secrets / "edge/client.crt", secrets / "edge/client.key", **kw)


def health_error(target: str, tls: ChannelTls | None) -> grpc.RpcError | None:
    """The error of one health check over a fresh channel (None: it answered SERVING)."""
    with open_channel(target, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return None


def test_url_says_grpcs(mtls_cloud):
    assert mtls_cloud.url == f"grpcs://127.0.0.1:{mtls_cloud.port}"


def test_edge_client_certificate_is_served_health_and_a_step(mtls_cloud, secrets, edge, tiny_glm):
    client = CloudClient(f"127.0.0.1:{mtls_cloud.port}", step_timeout_s=30, tls=edge_tls(secrets))
    session = uuid.uuid4().hex
    try:
        assert client.healthy(timeout_s=5)
        hidden = edge.hidden(session, 0, PROMPT)
        result = client.tail().step(make_frame(session, 0, 0, hidden, codec="fp32",
                                               params=pb.GenerationParams(max_tokens=4)))
    finally:
        edge.close(session)
        client.close()
    assert not result.error, result.error
    assert list(result.tokens) == reference(tiny_glm, PROMPT, 1)[0]


@pytest.mark.parametrize("who", ["no client certificate", "a client certificate of another CA", "plaintext"])
def test_handshake_refuses(mtls_cloud, secrets, who):
    tls = {
        "no client certificate": ChannelTls(secrets / "ca.crt"),
        "a client certificate of another CA": ChannelTls(secrets / "ca.crt", secrets / "other/client.crt",
                                                         secrets / "other/client.key"),
        "plaintext": None,
    }[who]
    error = health_error(f"127.0.0.1:{mtls_cloud.port}", tls)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, who


def test_client_checks_the_server_certificate(mtls_cloud, secrets):
    target = f"127.0.0.1:{mtls_cloud.port}"
    assert health_error(target, edge_tls(secrets, server_name="cloud")) is None  # a SAN of the server's cert
    assert health_error(target, edge_tls(secrets, server_name="elsewhere")).code() == grpc.StatusCode.UNAVAILABLE
    untrusting = ChannelTls(secrets / "other/ca.crt", secrets / "edge/client.crt", secrets / "edge/client.key")
    assert health_error(target, untrusting).code() == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_ca_serves_clients_without_certificates(tiny_plan, secrets):
    with start_cloud(tiny_plan, tls_cert=secrets / "cloud/server.crt", tls_key=secrets / "cloud/server.key") as s:
        assert health_error(f"localhost:{s.port}", ChannelTls(secrets / "ca.crt")) is None
        assert health_error(f"localhost:{s.port}", None).code() == grpc.StatusCode.UNAVAILABLE


def test_splitglm_health_grpcs(mtls_cloud, secrets, capsys):
    url, ca = f"grpcs://127.0.0.1:{mtls_cloud.port}", str(secrets / "ca.crt")
    cert, key = str(secrets / "edge/client.crt"), str(secrets / "edge/client.key")
    assert cli(["health", url, "--ca", ca, "--cert", cert, "--key", key]) == 0
    assert capsys.readouterr().out.strip() == "healthy"
    assert cli(["health", url, "--ca", ca, "--timeout", "2"]) == 1  # no client certificate: refused
    assert cli(["health", url]) == 1 and "needs --ca" in capsys.readouterr().err
    assert cli(["health", url, "--ca", ca, "--cert", cert]) == 1  # a certificate without its key
    assert "go together" in capsys.readouterr().err


def test_tls_settings_are_checked(tiny_plan, secrets):
    cert, key, ca = (str(secrets / p) for p in ("cloud/server.crt", "cloud/server.key", "ca.crt"))
    plan = ["--plan", tiny_plan]
    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        CloudSettings.load([*plan, "--tls-cert", cert])
    with pytest.raises(SettingsError, match="tls_client_ca .*needs tls_cert"):
        CloudSettings.load([*plan, "--tls-client-ca", ca])
    with pytest.raises(SettingsError, match="no such file"):
        CloudSettings.load([*plan, "--tls-cert", cert, "--tls-key", str(secrets / "missing.key")])
    s = CloudSettings.load([*plan, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca])
    assert s.tls_client_ca is not None


def test_a_key_of_another_certificate_fails_the_start_clearly(tiny_plan, secrets):
    with pytest.raises(OSError, match="not a matching PEM pair"):
        with start_cloud(tiny_plan, tls_cert=secrets / "cloud/server.crt", tls_key=secrets / "edge/server.key"):
            pass
