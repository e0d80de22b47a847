"""``X-Request-ID`` on every HTTP response, the request id on every log line about the request, and the access log.

The id is the client's own ``X-Request-ID`` where it is a reasonable one (``VALID``), else a fresh one.
``RequestId`` is the outermost ASGI middleware, so the guard's refusals (401, 413, 429) carry the header
too; the app's handler of unexpected errors adds it itself (Starlette answers those outside every
middleware). The app reads the id with ``request_id(scope)`` and logs it beside the completion id and
the session ids (``http_api``). The id stays at the edge: the tiers behind it know the session id only.

While the request is handled its id is bound (``runtime.logs``: the ``request_id`` field of every record),
and when its response has ended the access log (logger ``edge_node.access``) has one line for it:
``method``, ``path``, ``status``, ``duration_ms`` (until the last byte of the body, a stream's included),
``client`` (the peer's address, or the one a configured proxy names). The probes and ``/metrics``
scrapes log at DEBUG, every other request at INFO.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from runtime.logs import bound

from .health import PROBE_PATHS

HEADER = b"x-request-id"
SCOPE_KEY = "splitglm.request_id"
VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's id we echo: short, printable, no spaces or quotes
QUIET_PATHS = (*PROBE_PATHS, "/metrics")  # polled every few seconds: their access lines at DEBUG
access_log = logging.getLogger("edge_node.access")


def chosen_id(scope) -> str:
    """The request's ``X-Request-ID`` if it is valid (``VALID``), else a fresh random one."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            given = value.decode("latin-1")
            if VALID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def request_id(scope) -> str:
    """The id ``RequestId`` gave this request ("" outside the middleware)."""
    return scope.get(SCOPE_KEY, "")


def log_access(scope, status: int, started: float) -> None:
    """The access log's line of a request that has ended."""
    path = scope.get("path", "")
    client = scope.get("client")
    fields = {"method": scope.get("method", ""), "path": path, "status": status,
              "duration_ms": round((time.perf_counter() - started) * 1e3, 1), "client": client[0] if client else ""}
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    access_log.log(level, "%(method)s %(path)s %(status)d %(duration_ms).1f ms client %(client)s", fields,
                   extra=fields)


class RequestId:
    """Pure ASGI middleware: give each HTTP request an id, bind it for the logs, echo it as ``X-Request-ID`` on
    its response, and log the access line when the response ends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope[SCOPE_KEY] = chosen_id(scope)
        started, status = time.perf_counter(), 500  # (500: the app raised before answering)

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("latin-1"))]}
            await send(message)

        with bound(request_id=rid, session_id=""):  # the app binds the session ids once it has them
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log_access(scope, status, started)
