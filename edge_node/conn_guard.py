"""Connection-level limits of the edge's HTTP server: read timeouts, a cap on open connections and on requests.

uvicorn (h11) times out only idle kept-alive connections: a client that sends
half a request head, or a head and then a trickle of body, holds its
connection (a descriptor and a protocol object) as long as it likes, and
uvicorn's ``limit_concurrency`` counts those connections too, so a flood of
them would refuse every honest request. ``GuardedH11Protocol``, a small
subclass of uvicorn's ``H11Protocol`` (the factory ``protocol_factory`` gives
to ``uvicorn.Config(http=...)``), adds:

- a header timeout: the request head must be whole ``header_timeout_s`` after
  the connection opened (on a kept-alive connection: after the next request's
  first byte); else a 408 and the connection closed;
- a body timeout: the body must be whole ``body_timeout_s`` after the head;
  else a 408 and the connection closed (the app reads a disconnect);
- a cap on open connections: a connection beyond ``max_connections`` evicts
  the oldest one that has no request in progress (one still waiting for its
  head, or idle between requests); only when every one has a request in
  progress is the new one answered 503 and closed. Half-sent requests are
  thus the first to go and never crowd out a client that sends its request;
- at most ``max_requests_per_connection`` requests a connection: the last
  one's response says ``Connection: close``.

``RequestCap`` is the ASGI side: at most ``max_requests`` requests in progress
on the whole server (the probes, ``health.PROBE_PATHS``, exempt), 503 with ``Retry-After`` beyond it.
Every refusal counts ``http_refused_total{reason}``: ``header_timeout``,
``body_timeout``, ``connection_evicted``, ``connection_refused``, ``server_busy``.
A TLS handshake precedes all of this (the protocol sees a connection once it
is encrypted): asyncio gives it 60 s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import Refusal
from .health import PROBE_PATHS
from .settings import setting

logger = logging.getLogger(__name__)

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
FULL_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
SPARE_DESCRIPTORS = 256  # beyond the HTTP connections: the cloud channels, MQTT, logs, the model's files


@dataclass(frozen=True)
class ConnLimits:
    """What the HTTP server enforces per connection and in all (see the module docstring); 0 = no limit."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512
    max_requests: int = 256
    max_requests_per_connection: int = 1000

    @classmethod
    def from_settings(cls, settings) -> ConnLimits:
        return cls(setting(settings, "http_header_timeout_s"), setting(settings, "http_body_timeout_s"),
                   setting(settings, "http_max_connections"), setting(settings, "http_max_requests"),
                   setting(settings, "http_max_requests_per_connection"))


class Connections:
    """The open connections of one server; those without a request in progress in the order they became so."""

    def __init__(self, limits: ConnLimits, on_refuse: Callable[[str], None]):
        self.limits, self.on_refuse = limits, on_refuse
        self.open: set[GuardedH11Protocol] = set()
        self.idle: dict[GuardedH11Protocol, None] = {}  # insertion-ordered: the oldest first

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Count a new connection, evicting the oldest idle one at the cap; False: every one is busy (refuse)."""
        if self.limits.max_connections and len(self.open) >= self.limits.max_connections:
            if not self.idle:
                self.on_refuse("connection_refused")
                return False
            oldest = next(iter(self.idle))
            self.on_refuse("connection_evicted")
            oldest.drop()
        self.open.add(conn)
        self.idle[conn] = None
        return True

    def busy(self, conn: GuardedH11Protocol) -> None:
        self.idle.pop(conn, None)

    def done(self, conn: GuardedH11Protocol) -> None:
        if conn in self.open:
            self.idle.pop(conn, None)
            self.idle[conn] = None  # now the newest idle one

    def forget(self, conn: GuardedH11Protocol) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read timeouts, the connection cap and a request count per connection."""

    def __init__(self, config, server_state, app_state, _loop=None, *, connections: Connections):
        super().__init__(config, server_state, app_state, _loop)
        self.table, self.limits = connections, connections.limits
        self.deadline: asyncio.TimerHandle | None = None  # the header or body timer running
        self.waiting = True  # for a request head (no request in progress)
        self.requests = 0  # heads received on this connection

    # ---- uvicorn's hooks ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.table.admit(self):
            self.transport.write(FULL_RESPONSE)
            self.transport.close()
            return
        self._arm("header_timeout", self.limits.header_timeout_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.table.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiting and self.deadline is None:  # the first byte of a kept-alive connection's next request
            self._arm("header_timeout", self.limits.header_timeout_s)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None and not self.transport.is_closing():
            self._head_received()
        if self.cycle is not None and not self.cycle.more_body and not self.waiting:
            self._disarm()  # the body is whole

    def on_response_complete(self) -> None:
        self._disarm()
        self.waiting = True
        if not self.transport.is_closing():
            self.table.done(self)
        super().on_response_complete()  # may handle a pipelined request (handle_events) at once

    def handle_websocket_upgrade(self, event) -> None:
        self._disarm()
        self.table.forget(self)
        super().handle_websocket_upgrade(event)

    # ---- ours ----------------------------------------------------------------------------------------

    def _head_received(self) -> None:
        self._disarm()
        self.waiting = False
        self.table.busy(self)
        self.requests += 1
        most = self.limits.max_requests_per_connection
        if most and self.requests >= most:  # the last one: the response says Connection: close (uvicorn adds it
            self.cycle.keep_alive = False  # when the request's headers carry it) and the connection then closes
            if CLOSE_HEADER not in self.headers:
                self.headers.append(CLOSE_HEADER)
        if self.cycle.more_body:
            self._arm("body_timeout", self.limits.body_timeout_s)

    def _arm(self, reason: str, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self.deadline = self.loop.call_later(seconds, self._expire, reason)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self, reason: str) -> None:
        """The head or the body did not arrive in time: 408 (unless a response has begun) and close."""
        self.deadline = None
        if self.transport.is_closing():
            return
        self.table.on_refuse(reason)
        cycle = self.cycle if not self.waiting else None
        if cycle is None or not cycle.response_started:
            self.transport.write(TIMEOUT_RESPONSE)
        if cycle is not None:  # the app reads a disconnect from now on, and its sends go nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def drop(self) -> None:
        """Close this idle connection at once (evicted for a newer one)."""
        self._disarm()
        self.table.forget(self)
        self.transport.close()  # connection_lost tells h11


def protocol_factory(limits: ConnLimits, on_refuse: Callable[[str], None]):
    """What ``uvicorn.Config(http=...)`` takes: builds a GuardedH11Protocol per connection, one table per server."""
    return functools.partial(GuardedH11Protocol, connections=Connections(limits, on_refuse))


class RequestCap:
    """ASGI middleware: at most ``most`` HTTP requests in progress at once (0 = no limit); 503 beyond it."""

    def __init__(self, app, most: int, on_refuse: Callable[[str], None]):
        self.app, self.most, self.on_refuse = app, most, on_refuse
        self.open = 0  # requests in progress (the event loop's thread only)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.most or scope.get("path") in PROBE_PATHS:
            return await self.app(scope, receive, send)
        if self.open >= self.most:
            self.on_refuse("server_busy")
            refusal = Refusal(503, "server_busy", f"The server has {self.most} requests in progress, its limit; "
                              "retry shortly.", "server_busy", {"Retry-After": "1"})
            return await refusal.response()(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


def ensure_descriptors(max_connections: int) -> None:
    """Raise the soft limit on open files to what ``max_connections`` needs (within the hard limit), else warn."""
    need = max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        logger.warning("the open-files limit (%d) is below what %d HTTP connections need (%d): lower "
                       "--http-max-connections or raise `ulimit -n`", target, max_connections, need)
