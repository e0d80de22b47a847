"""A TCP proxy that delays a link in user space (netem is not available here), for benchmarks and tests.

Put it between the edge and the cloud: every chunk of bytes is forwarded
``rtt_ms / 2`` after it arrived, in each direction, in order; with
``bandwidth_mbit_s`` a chunk also waits for the ones before it to have left
and takes ``bytes x 8 / bandwidth`` itself (a serialising link). The delay can be
changed while connections are open (``set_rtt``), so a benchmark can replay a
trace of link conditions; ``cut()`` drops every connection (a dead link). ``carried`` counts the bytes
that crossed it, "up" (towards the target) and "down", over all its connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

logger = logging.getLogger(__name__)


class DelayProxy:
    """``DelayProxy(target_host, target_port).start()`` -> listens on 127.0.0.1:``port``, runs in its own thread."""

    def __init__(self, target_host: str, target_port: int, rtt_ms: float = 0.0, host: str = "127.0.0.1",
                 bandwidth_mbit_s: float | None = None):
        self.target = (target_host, target_port)
        self.host, self.port = host, 0
        self.rtt_ms, self.bandwidth_mbit_s = rtt_ms, bandwidth_mbit_s
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.carried = {"up": 0, "down": 0}  # bytes received for forwarding, by direction, since start
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the round-trip delay for everything sent from now on."""
        self.rtt_ms = max(0.0, float(rtt_ms))

    def cut(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        def close_all():
            for writer in list(self._writers):
                writer.close()
        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            logger.warning("delay proxy: cannot reach %s:%d: %r", *self.target, e)
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer, "up"),
                                 self._pipe(up_reader, writer, "down"), return_exceptions=True)
        except asyncio.CancelledError:  # stop(): ends here (a cancelled accept task is reported as an error)
            pass
        self._writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Forward chunks in order, each released one-way delay after it arrived (and after its serialisation)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        free_at = 0.0  # when the link has sent the chunks queued so far (with a bandwidth limit)

        async def release():
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        try:
            while chunk := await reader.read(1 << 16):
                self.carried[direction] += len(chunk)
                due = time.monotonic() + self.rtt_ms / 2e3
                if self.bandwidth_mbit_s:
                    free_at = max(free_at, due) + len(chunk) * 8 / (self.bandwidth_mbit_s * 1e6)
                    due = free_at
                queue.put_nowait((due, chunk))
        finally:
            queue.put_nowait((0.0, b""))
            try:
                await sender
            finally:
                writer.close()
