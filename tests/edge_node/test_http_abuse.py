"""Abusive HTTP clients against the edge's own server set-up (``edge_node.node.serve_http``: uvicorn with
``conn_guard``'s protocol, the request cap and the proxy settings) over ``tests/local_chain.py``'s TestNode.

Half-sent requests are cut at the header and body timeouts and cannot crowd out a client that sends its
request; the caps on connections and requests refuse with 503 only when every slot is busy; a forged
X-Forwarded-For does not reset the limit on failed authentications, while a configured proxy's does name
the client.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from edge_node.conn_guard import TIMEOUT_RESPONSE
from edge_node.guard import AUTH_FAILURES_PER_MIN, client_address
from edge_node.http_api import create_app
from edge_node.node import HttpServer, serve_http
from tests.local_chain import TestNode, char_tokenizer

HALF_OPEN = 1000
PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: appli"


def refused(node: TestNode, reason: str) -> float:
    value = node.metrics.registry.get_sample_value("splitglm_edge_http_refused_total", {"reason": reason})
    return value or 0.0


@contextmanager
def edge_server(tiny_glm, **settings) -> Iterator[tuple[TestNode, HttpServer, str]]:
    """A TestNode's app served the way the edge serves it, on a free loopback port."""
    node = TestNode(tiny_glm, char_tokenizer(), 1, 3, http_host="127.0.0.1", http_port=0, shutdown_grace_s=0.0,
                    **settings)
    server, url = serve_http(create_app(node), node.settings, node.metrics)
    try:
        yield node, server, url
    finally:
        server.should_exit = True
        server.thread.join(10)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError past ``deadline``)."""
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError("the server did not close the connection in time") from None
        if not chunk:
            return received
        received += chunk


def wait_for(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture()
def descriptors():
    """Room for the half-open sockets and the server's ends of them in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * HALF_OPEN
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_open_connections_do_not_starve_a_request_and_are_cut_at_the_header_timeout(tiny_glm, descriptors):
    header_timeout_s = 4.0
    with edge_server(tiny_glm, http_header_timeout_s=header_timeout_s, http_max_connections=512) as (node, server, url):
        before = open_descriptors()
        started = time.monotonic()
        attackers = []
        try:
            for _ in range(HALF_OPEN):
                sock = connect(url)
                attackers.append(sock)
                sock.sendall(PARTIAL_HEAD)
            sent_s = time.monotonic() - started
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 4, "temperature": 0},
                           timeout=30)
            served_s = time.monotonic() - t0
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
            assert served_s < 2.0, f"a normal request took {served_s:.2f} s beside {HALF_OPEN} half-open ones"
            held = len(server.server_state.connections)
            assert 400 <= held <= 513, held  # the cap, full of half-open connections, while the request was served
            deadline = started + sent_s + header_timeout_s + 8
            answers = [read_until_closed(sock, deadline) for sock in attackers]
            closed_s = time.monotonic() - started
        finally:
            for sock in attackers:
                sock.close()
        timed_out = sum(a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert all(a in (b"", TIMEOUT_RESPONSE) for a in answers)  # a 408, or nothing (evicted)
        assert timed_out == refused(node, "header_timeout") and timed_out >= 400
        assert timed_out + refused(node, "connection_evicted") == HALF_OPEN
        assert header_timeout_s - 0.5 <= closed_s <= sent_s + header_timeout_s + 8
        assert node.generations and len(node.generations) == 1  # the half-sent requests reached no model work
        wait_for(lambda: not server.server_state.connections, "connections left open", 5)
        assert open_descriptors() <= before + 8
        print(f"{HALF_OPEN} half-open: opened in {sent_s:.2f} s; a request served in {served_s * 1000:.0f} ms "
              f"beside {held} held; {timed_out} cut at the header timeout, all closed by {closed_s:.1f} s")


def test_a_trickled_body_is_cut_at_the_body_timeout(tiny_glm):
    with edge_server(tiny_glm, http_body_timeout_s=1.0) as (node, _, url):
        body = json.dumps({"prompt": "ab", "max_tokens": 2}).encode()
        sock = connect(url)
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body) + 1000, body))
            started, received = time.monotonic(), b""
            sock.settimeout(0.2)
            while time.monotonic() - started < 10:
                try:
                    sock.sendall(b" ")  # one byte of the body every 0.2 s: never whole
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not chunk:
                    break
                received += chunk
            cut_s = time.monotonic() - started
        finally:
            sock.close()
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert 0.9 <= cut_s <= 4.0, cut_s
        assert refused(node, "body_timeout") == 1 and not node.generations


def test_caps_on_connections_and_requests_refuse_only_when_every_slot_is_busy(tiny_glm):
    busy_head = b"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n"  # body never sent
    with edge_server(tiny_glm, http_max_connections=2, http_max_requests=2) as (node, server, url):
        busy = [connect(url), connect(url)]
        try:
            for sock in busy:
                sock.sendall(busy_head)
            wait_for(lambda: len(server.server_state.tasks) == 2, "the two heads were not read")
            third = connect(url)
            answer = read_until_closed(third, time.monotonic() + 5)
            third.close()
            assert answer.startswith(b"HTTP/1.1 503 ") and refused(node, "connection_refused") == 1
        finally:
            busy[0].close()
        wait_for(lambda: len(server.server_state.connections) == 1, "the closed connection's slot did not come back")
        assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
        busy[1].close()

    with edge_server(tiny_glm, http_max_connections=4, http_max_requests=1, http_max_requests_per_connection=2,
                     http_keepalive_timeout_s=0.5) as (node, server, url):
        sock = connect(url)
        try:
            sock.sendall(busy_head)  # the one request in progress
            wait_for(lambda: len(server.server_state.tasks) == 1, "the head was not read")
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 1}, timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy" and r.headers["Retry-After"]
            assert refused(node, "server_busy") == 1
            with httpx.Client(base_url=url, timeout=5) as http:  # the probes are exempt; 2 requests a connection
                first, second = http.get("/livez"), http.get("/readyz")
            assert first.status_code == second.status_code == 200
            assert "close" not in first.headers.get("connection", "") and second.headers["connection"] == "close"
        finally:
            sock.close()
        idle = connect(url)  # a kept-alive connection that says nothing more is closed after the keep-alive timeout
        try:
            idle.sendall(b"GET /livez HTTP/1.1\r\nHost: edge\r\n\r\n")
            started = time.monotonic()
            answer = read_until_closed(idle, started + 5)
            assert answer.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 3
        finally:
            idle.close()


def test_a_forged_forwarded_for_does_not_reset_the_failed_login_limit(tiny_glm, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("good-key\n")
    wrong = {"Authorization": "Bearer wrong"}
    n = AUTH_FAILURES_PER_MIN
    with edge_server(tiny_glm, api_keys_file=keys) as (node, _, url), httpx.Client(base_url=url, timeout=10) as http:
        codes = [http.get("/v1/models", headers={**wrong, "X-Forwarded-For": f"198.51.100.{i}"}).status_code
                 for i in range(n + 5)]
        assert codes[:n] == [401] * n and codes[n:] == [429] * 5  # one client, whatever it claims to be
        assert http.get("/v1/models", headers={"Authorization": "Bearer good-key"}).status_code == 200

    with edge_server(tiny_glm, api_keys_file=keys, forwarded_allow_ips="127.0.0.1") as (node, _, url), \
            httpx.Client(base_url=url, timeout=10) as http:  # this client is the proxy: its header names the client
        def attempt(forwarded_for: str) -> int:
            return http.get("/v1/models", headers={**wrong, "X-Forwarded-For": forwarded_for}).status_code

        codes = [attempt("203.0.113.7") for _ in range(n + 2)]
        assert codes[:n] == [401] * n and codes[n:] == [429] * 2
        assert attempt("203.0.113.8, 203.0.113.7") == 429  # what the client itself put in front does not count
        assert attempt("203.0.113.8") == 401  # another client behind the proxy is not limited by the first
        assert refused(node, "auth_rate") == 3


def test_client_address_counts_ipv6_by_its_64_and_ignores_ports():
    assert client_address({"client": ("192.0.2.1", 5000)}) == "192.0.2.1"
    assert client_address({"client": ("2001:db8:1:2:aaaa::1", 1)}) == client_address(
        {"client": ("2001:db8:1:2:bbbb::9", 2)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("::ffff:192.0.2.1", 1)}) == "192.0.2.1"
    assert client_address({}) == "?"
