"""``X-Request-ID`` on every HTTP response: the client's own id where it is a reasonable one, else a fresh one.

``RequestId`` is the outermost ASGI middleware, so the guard's refusals (401,
413, 429) carry the header too; the app's handler of unexpected errors adds it
itself (Starlette answers those outside every middleware). The app reads the
id with ``request_id(scope)`` and logs it beside the completion id.
"""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
SCOPE_KEY = "splitglm.request_id"
VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's id we echo: short, printable, no spaces or quotes


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


class RequestId:
    """Pure ASGI middleware: give each HTTP request an id and echo it as ``X-Request-ID`` on its response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope[SCOPE_KEY] = chosen_id(scope)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, send_with_id)
