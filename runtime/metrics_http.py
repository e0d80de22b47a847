"""The one way a tier makes and serves its Prometheus registry.

``new_registry()`` gives a registry of its own with prometheus_client's process, platform and garbage
collector collectors (``process_*``, ``python_info``, ``python_gc_*``), so every tier's ``/metrics``
carries them beside its ``splitglm_<tier>_*`` families. ``serve_metrics`` serves a registry over plain
HTTP (``GET /metrics``) from a daemon thread: the cloud and the device agent use it on their
``metrics_port``; the edge serves the same registry on its HTTPS API instead. Only the agents import this
module: the runtime's own code keeps plain counters (``Scheduler.stats``, ``KVPool``, ``CudaEngine.stats``)
that the agents' collectors read at scrape time.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server

logger = logging.getLogger(__name__)

# Buckets of latencies, seconds: 1 ms (a step over a LAN) .. 60 s (a long generation).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def new_registry() -> CollectorRegistry:
    """A registry of its own, with the process, platform and gc collectors registered."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)  # (registers nothing where the interpreter has no gc statistics)
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one) from a daemon thread; the server
    (``stop_metrics`` ends it) and the bound port. Raises OSError when the address cannot be bound."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"
    logger.info("metrics on %s (plain HTTP, no authentication: numbers only, never a prompt)", url)
    return server, bound


def stop_metrics(server: WSGIServer | None) -> None:
    """Stop a server of ``serve_metrics`` and close its socket (None: nothing to do)."""
    if server is not None:
        server.shutdown()
        server.server_close()


class TierMetrics:
    """A tier's registry (``new_registry``) and, once ``serve`` ran, its HTTP endpoint (``port``)."""

    def __init__(self):
        self.registry = new_registry()
        self.server: WSGIServer | None = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve the registry at ``http://host:port/metrics``; the bound port."""
        self.server, self.port = serve_metrics(self.registry, host, port)
        return self.port

    def stop(self) -> None:
        stop_metrics(self.server)
        self.server = None
