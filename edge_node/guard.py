"""Who may use the edge's HTTP API, and how much: API keys, body size, open requests and request rate per client.

``Guard`` is a pure ASGI middleware in front of the FastAPI app. When API keys
are set, every ``/v1/*`` request, ``/tokenize``, ``/detokenize`` and ``/metrics`` need ``Authorization: Bearer KEY``
(compared in constant time). Such a request (but ``/metrics``) then passes, in order: its
declared body size, its client's request rate (a bucket of
``rate_per_key_per_min`` requests, refilled continuously), its client's open
requests, and its body, read whole (at most ``max_body_bytes``) before the
app sees it. A client address (``client_address``: the peer's, never a
forwarded header unless the peer is a configured proxy) that fails authentication more than
``AUTH_FAILURES_PER_MIN`` times a minute gets 429s (with ``Retry-After``)
instead of 401s, so guessing keys costs time. The client is the API key, or
its address when no keys are set. Every refusal answers with OpenAI's error body (429s with
``Retry-After``) and counts ``EdgeMetrics.http_refused(reason)``; a refused
request never reaches the app, so no model work is done for it. The probes
(``/livez``, ``/readyz`` and its old name ``/healthz``) stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import JSONResponse

from runtime.rates import RateBuckets

from .schemas import error_body
from .settings import setting

RETRY_CONCURRENT_S = 1  # Retry-After of a refusal for too many open requests, seconds
AUTH_FAILURES_PER_MIN = 30  # failed authentications per peer address a minute before 429s instead of 401s
CLIENT = "splitglm.client"  # the ASGI scope key that holds the request's client (``Guard.client``) for the app
EXTRA_PATHS = ("/tokenize", "/detokenize")  # guarded like /v1/* (vLLM serves them outside /v1)


def load_api_keys(path: Path) -> tuple[str, ...]:
    """The keys of a keys file: one a line, blank lines and ``#`` comments skipped; ValueError if it has none."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    keys = tuple(line for line in lines if line and not line.startswith("#"))
    if not keys:
        raise ValueError(f"api_keys_file {str(path)!r} holds no keys")
    return keys


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class ApiKeys:
    """The accepted keys; ``match`` compares a given key with every one in constant time (no length leak)."""

    def __init__(self, keys: tuple[str, ...]):
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, given: str) -> int | None:
        """The index of the key equal to ``given``, or None."""
        found, given_digest = None, _digest(given)
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(digest, given_digest):
                found = i
        return found


@dataclass(frozen=True)
class GuardLimits:
    """What the guard enforces (see the module docstring); 0 = no limit."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 16
    rate_per_min: int = 600

    @classmethod
    def from_settings(cls, settings) -> GuardLimits:
        keys_file = setting(settings, "api_keys_file")
        return cls(load_api_keys(keys_file) if keys_file else (), setting(settings, "max_body_bytes"),
                   setting(settings, "max_concurrent_per_key"), setting(settings, "rate_per_key_per_min"))


class Refusal(Exception):
    """A request the guard answers itself."""

    def __init__(self, status: int, reason: str, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.code, self.headers = status, reason, message, code, headers

    def response(self) -> JSONResponse:
        type_ = {429: "requests", 503: "service_unavailable"}.get(self.status, "invalid_request_error")
        return JSONResponse(error_body(self.message, type_, code=self.code), self.status, headers=self.headers)


def client_address(scope) -> str:
    """The address the per-address limits count: the peer's, or the client's that a configured proxy names
    (uvicorn's proxy_headers put it in the scope: see ``forwarded_allow_ips``); IPv6 by its /64 (one host's
    share: a host may take any address in it)."""
    peer = scope.get("client")
    host = peer[0] if peer else "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host


def bearer(scope) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class Guard:
    """The ASGI middleware: authenticate, then limit, then hand the request (its body read) to ``app``."""

    def __init__(self, app, limits: GuardLimits, metrics):
        self.app, self.limits, self.metrics = app, limits, metrics
        self.keys = ApiKeys(limits.api_keys)
        self.rates = RateBuckets(limits.rate_per_min)
        self.failures = RateBuckets(AUTH_FAILURES_PER_MIN)  # per peer address
        self.open: dict[str, int] = {}  # client -> requests in progress (the event loop's thread only)

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        guarded = path.startswith("/v1/") or path in EXTRA_PATHS or (path == "/metrics" and self.keys)
        if not guarded:
            return await self.app(scope, receive, send)
        try:
            client = self.client(scope)
            if path != "/metrics":
                self.check_declared_size(scope)
                self.check_rate(client)
                self.check_open(client)
        except Refusal as refusal:
            return await self.refuse(refusal, scope, receive, send)
        if path == "/metrics":
            return await self.app(scope, receive, send)
        scope[CLIENT] = client  # whom the app's quotas count it for (edge_node.shares)
        self.open[client] = self.open.get(client, 0) + 1
        try:
            try:
                body = await self.read_body(receive)
            except Refusal as refusal:
                return await self.refuse(refusal, scope, receive, send)
            if body is not None:  # None: the client went away
                await self.app(scope, replay(body, receive), send)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]

    def client(self, scope) -> str:
        """The client the limits count for: ``key:<index>``, or its address without keys; 401 without a good key."""
        if not self.keys:
            return f"addr:{client_address(scope)}"
        token = bearer(scope)
        if not token:
            self.check_failures(scope)
            raise Refusal(401, "missing_api_key", "You didn't provide an API key: send it in an Authorization "
                          "header, `Authorization: Bearer KEY`.", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        index = self.keys.match(token)
        if index is None:
            self.check_failures(scope)
            raise Refusal(401, "invalid_api_key", "Incorrect API key provided.", "invalid_api_key",
                          {"WWW-Authenticate": "Bearer"})
        return f"key:{index}"

    def check_failures(self, scope) -> None:
        """Count a failed authentication of the client's address; 429 once it has failed too often."""
        wait_s = self.failures.take(client_address(scope))
        if wait_s > 0:
            raise Refusal(429, "auth_rate", f"Too many failed authentications from this address; retry in "
                          f"{wait_s:.1f} s.", "rate_limit_exceeded", {"Retry-After": str(max(1, math.ceil(wait_s)))})

    def check_declared_size(self, scope) -> None:
        n = content_length(scope)
        if n is not None and n > self.limits.max_body_bytes:
            raise self.too_large(n)

    def check_rate(self, client: str) -> None:
        wait_s = self.rates.take(client)
        if wait_s > 0:
            raise Refusal(429, "rate_limit", f"Rate limit reached: {self.limits.rate_per_min} requests per minute; "
                          f"retry in {wait_s:.1f} s.", "rate_limit_exceeded",
                          {"Retry-After": str(max(1, math.ceil(wait_s)))})

    def check_open(self, client: str) -> None:
        most = self.limits.max_concurrent
        if most > 0 and self.open.get(client, 0) >= most:
            raise Refusal(429, "concurrency", f"Too many requests in progress: at most {most} at once per client.",
                          "too_many_concurrent_requests", {"Retry-After": str(RETRY_CONCURRENT_S)})

    def too_large(self, n: int | None) -> Refusal:
        size = f"{n} bytes" if n is not None else "more"
        return Refusal(413, "body_too_large", f"The request body is {size}; the limit is "
                       f"{self.limits.max_body_bytes} bytes.", "request_too_large")

    async def read_body(self, receive) -> bytes | None:
        """The whole body (413 past max_body_bytes), or None if the client disconnected first."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise self.too_large(None)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def refuse(self, refusal: Refusal, scope, receive, send) -> None:
        self.metrics.http_refused(refusal.reason)
        await refusal.response()(scope, receive, send)


def replay(body: bytes, receive):
    """A ``receive`` that gives the body read already, then whatever the client sends next (its disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
