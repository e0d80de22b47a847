"""Streamed (SSE) answers that do not wait forever on a client that stops reading.

Starlette's ``StreamingResponse`` awaits each ``send``, and uvicorn's send
waits while the connection's write buffer is over its high-water mark, that
is while the client does not read. Each response is its own task, so other
sessions go on; but the stalled generation keeps its KV cache and its cloud
stream for as long as the client keeps the connection open. ``BoundedStream``
gives every send ``send_timeout_s``: a client that takes no event for that
long is dropped. The body iterator is closed, which closes the generation and
frees its session on every tier, and the connection is closed. uvicorn then
logs that the response was not completed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

log = logging.getLogger(__name__)


class BoundedStream(StreamingResponse):
    """A StreamingResponse whose client must take each message within ``send_timeout_s`` seconds."""

    def __init__(self, content, send_timeout_s: float, on_drop: Callable[[], None] = lambda: None,
                 on_end: Callable[[], Awaitable[None]] | None = None, **kwargs):
        super().__init__(content, **kwargs)
        self.send_timeout_s, self.on_drop, self.on_end = send_timeout_s, on_drop, on_end

    async def __call__(self, scope, receive, send) -> None:
        """Stream; then ``on_end``, however the response ended (also when its body was never iterated)."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_end is not None:
                await self.on_end()

    async def stream_response(self, send: Send) -> None:
        async def bounded(message: Message) -> None:
            with anyio.fail_after(self.send_timeout_s):
                await send(message)

        try:
            await super().stream_response(bounded)
        except TimeoutError:
            log.warning("dropping a streaming client that took no event for %g s", self.send_timeout_s)
            self.on_drop()
            await self.body_iterator.aclose()  # the generation closes: its session is freed
