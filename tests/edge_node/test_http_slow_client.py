"""A streaming client that stops reading is dropped after ``stream_send_timeout_s``; others go on meanwhile.

A real uvicorn server over ``tests/local_chain.py``'s TestNode. On loopback the kernel takes megabytes
for a client that does not read, more than any answer; so the server's listening socket gets a small send
buffer (accepted connections inherit it), as a slow network would give, and the staller's socket a small
receive buffer. It is never read.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from edge_node.http_api import create_app
from tests.local_chain import TestNode, char_tokenizer


def staller(url: str, max_tokens: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"prompt": "ab", "max_tokens": max_tokens, "stream": True, "temperature": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


@contextmanager
def serve_small_buffers(app) -> Iterator[str]:
    """uvicorn on a loopback socket whose connections have a 4 KiB send buffer; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test HTTP server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def dropped(node: TestNode) -> float:
    value = node.metrics.registry.get_sample_value("splitglm_edge_http_refused_total", {"reason": "slow_client"})
    return value or 0.0


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped_and_its_session_freed(tiny_glm):
    node = TestNode(tiny_glm, char_tokenizer(), 1, 3, max_tokens_limit=2000, stream_send_timeout_s=1.0)
    with serve_small_buffers(create_app(node)) as url:
        sock = staller(url, 2000)
        try:
            deadline = time.monotonic() + 180
            while not node.generations:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # meanwhile another client is served in full
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "cd", "max_tokens": 8, "temperature": 0},
                           timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            while dropped(node) < 1:
                assert time.monotonic() < deadline, "the stalled client was never dropped"
                time.sleep(0.1)
            stalled = node.generations[0]
            while node.open_sessions():
                assert time.monotonic() < deadline, "the stalled client's session was not freed"
                time.sleep(0.1)
            assert 0 < len(stalled.tokens) < 2000  # cut short while the client did not read
            received = b""
            sock.settimeout(10)
            while chunk := sock.recv(1 << 16):  # the connection was closed: the read ends
                received += chunk
            assert b"data: [DONE]" not in received
        finally:
            sock.close()


def test_bounded_stream_drops_a_client_that_takes_no_event():
    """The ASGI level: a send that never completes is given up after the timeout, the body closed."""
    import anyio

    from edge_node.streaming import BoundedStream

    closed, drops, sent = [], [], []

    async def body():
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    async def send(message):
        sent.append(message)
        if len(sent) > 3:  # the client stops reading after the headers and two events
            await anyio.sleep_forever()

    async def receive():
        await anyio.sleep_forever()  # no disconnect either

    async def main():
        response = BoundedStream(body(), 0.2, on_drop=lambda: drops.append(1), media_type="text/event-stream")
        with anyio.fail_after(10):
            await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)

    anyio.run(main)
    assert drops == [1] and closed == [True] and len(sent) == 4
