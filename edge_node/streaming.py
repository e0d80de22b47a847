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

The generations behind a response are blocking iterators (``runtime.owner.Generation``): ``next_event``
pulls one item in a worker thread, ``next_events`` one of each together, and ``merged`` interleaves
several (the ``n`` choices of one request) as their items come, one pull in flight per iterator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

log = logging.getLogger(__name__)
T = TypeVar("T")


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


async def next_event(it: Iterator[T]) -> T | None:
    """The next item of a blocking iterator, pulled in a worker thread (None at its end)."""
    return await anyio.to_thread.run_sync(next, it, None)


async def next_events(its: list[Iterator[T]]) -> list[T | None]:
    """The next item of each iterator, pulled together; the first exception is raised once every pull ended."""
    items: list[T | None] = [None] * len(its)
    errors: list[BaseException] = []

    async def pull(i: int) -> None:
        try:
            items[i] = await next_event(its[i])
        except Exception as e:  # noqa: BLE001 -- raised below, once the other pulls have ended
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for i in range(len(its)):
            tg.start_soon(pull, i)
    if errors:
        raise errors[0]
    return items


async def close_shielded(it: Iterator) -> None:
    """Close a generation's iterator in a worker thread, even while being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(it.close)


async def merged(its: list[Iterator[T]], firsts: list[T | None]) -> AsyncIterator[tuple[int, T | None]]:
    """(index, item) of several blocking iterators as their items come, starting with ``firsts`` (the first
    item of each, pulled already), and (index, None) when one ends. An iterator's exception is raised when
    its pull is taken; however this ends, the pulls in flight are waited for (a thread cannot be stopped), so
    the iterators can be closed afterwards."""
    pending: dict[asyncio.Task, int] = {}

    def pull(i: int) -> None:
        pending[asyncio.ensure_future(next_event(its[i]))] = i

    try:
        for i, item in enumerate(firsts):
            if item is not None:
                pull(i)
        for i, item in enumerate(firsts):
            yield i, item
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending[task]
                item = task.result()
                del pending[task]
                yield i, item
                if item is not None:
                    pull(i)
    finally:
        if pending:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(pending)
            for task in pending:
                if not task.cancelled():
                    task.exception()  # (taken: an error of a pull nobody reads is not logged as unretrieved)
