"""The edge node: the plan's edge tier, the router (cloud client + fast tail), the MQTT relay and the HTTP API,
started and stopped together.

One edge segment holds layers [0, k2) with the embedding: HTTP sessions (the
edge owns them) run all of it; device sessions arriving over MQTT run its view
[k1, k2). Each has the runtime's scheduler, so concurrent sessions share
steps; both share one lock, so torch runs one step at a time. Every
session's tail is a ``router.RoutedTail``: the cloud (accurate) or the plan's
fast tail at the edge (``fast_tail.FastTail``, its own lock); ``router.LinkProbe``
keeps the router's link estimates current while no session steps the cloud.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from protos import splitglm_pb2 as pb
from runtime import tracing
from runtime.artifacts import load_plan, load_tier, verify_manifest
from runtime.build import build_segment
from runtime.checkpoint import load_tokenizer
from runtime.cpu_decode import CpuDecode
from runtime.owner import Downstream, Generation
from runtime.scheduler import FairLock, Scheduler

from .cloud import ChannelTls, CloudClient
from .conn_guard import ConnLimits, RequestCap, ensure_descriptors, protocol_factory
from .estimates import Estimates
from .fast_tail import FastTail
from .metrics import EdgeMetrics
from .policy import parse_policy
from .relay import FrameRelay
from .router import LinkProbe, Router
from .settings import EdgeSettings, setting

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HTTP_BACKSTOP_S = 5.0  # after the grace period and the cloud streams cancelled, uvicorn cancels what is left


def acceptance_prior(plan: dict) -> float:
    """The draft acceptance to assume before any is measured: the fast tail's greedy agreement with the
    cloud tier where the plan measured it, shrunk a little (a draft is judged after a prefix of them)."""
    quality = (plan.get("fast_tail") or {}).get("quality") or {}
    agreement = quality.get("token_agreement")
    return 0.8 if agreement is None else max(0.5, min(0.95, float(agreement) - 0.05))


def cloud_tls(settings: EdgeSettings) -> ChannelTls | None:
    """TLS to the cloud (mutual with a client certificate) when the settings name a CA; None: plaintext."""
    if settings.cloud_ca is None:
        return None
    return ChannelTls(settings.cloud_ca, settings.cloud_cert, settings.cloud_key, settings.cloud_server_name)


def security_note(settings: EdgeSettings) -> str:
    """How the HTTP API and the cloud link are secured, in words for the log."""
    http = "HTTPS" if settings.tls_cert else "plain HTTP"
    keys = "API keys" if settings.api_keys_file else "no API keys: anyone who reaches the port can use it"
    cloud = "plaintext gRPC"
    if settings.cloud_ca is not None:
        cloud = "gRPC over mutual TLS" if settings.cloud_cert else "gRPC over TLS"
    return f"{http} ({keys}), {cloud} to the cloud"


@dataclass
class EdgeGeneration(Generation):
    """A Generation owned by the edge, counted as an open HTTP session while it runs; its prompt positions
    and whether it forked another's prefill are counted when it ends."""

    metrics: EdgeMetrics | None = None

    def __iter__(self):
        if self.metrics is None:
            yield from super().__iter__()
            return
        self.metrics.session_opened("http")
        try:
            yield from super().__iter__()
        finally:
            self.metrics.session_closed("http")
            self.metrics.prefilled(self.prefilled, self.forked)


class HttpServer(uvicorn.Server):
    """uvicorn in a thread of ours: ``listening`` is set once the socket serves."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.listening = threading.Event()
        self.thread: threading.Thread | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.listening.set()

    def serve_in_thread(self, sock: socket.socket) -> None:
        """Serve on the bound ``sock`` in a thread; return once it serves (RuntimeError if it stopped instead)."""
        self.thread = threading.Thread(target=self.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self.thread.start()
        while not self.listening.wait(0.1):
            if not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start on {sock.getsockname()}")


def http_config(app, settings, metrics) -> uvicorn.Config:
    """uvicorn's configuration of the edge's HTTP API: TLS, the read timeouts and connection caps
    (``conn_guard``), keep-alive, X-Forwarded-For only from the proxies in ``forwarded_allow_ips``, and its
    records (warnings and worse) through the process's logging (``runtime.logs``)."""
    limits = ConnLimits.from_settings(settings)
    tls_cert = setting(settings, "tls_cert")
    tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(setting(settings, "tls_key"))} if tls_cert else {}
    proxies = setting(settings, "forwarded_allow_ips")
    config = uvicorn.Config(
        RequestCap(app, limits.max_requests, metrics.http_refused), log_level="warning",
        log_config=None, access_log=False,  # uvicorn's records go through our handler; RequestId logs the access
        http=protocol_factory(limits, metrics.http_refused),
        timeout_keep_alive=setting(settings, "http_keepalive_timeout_s"),
        proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
        timeout_graceful_shutdown=setting(settings, "shutdown_grace_s") + HTTP_BACKSTOP_S, **tls,
    )  # fmt: skip
    try:
        config.load()  # reads the certificate and key now: a bad pair fails the start-up with its reason
    except OSError as e:  # ssl.SSLError too
        raise OSError(f"HTTPS certificate {tls_cert} with key {setting(settings, 'tls_key')}: {e}") from e
    return config


def serve_http(app, settings, metrics) -> tuple[HttpServer, str]:
    """Bind ``http_host``:``http_port`` (port 0: a free one), serve ``app`` in a thread; the server and its URL."""
    host, port = setting(settings, "http_host"), setting(settings, "http_port")
    config = http_config(app, settings, metrics)
    ensure_descriptors(setting(settings, "http_max_connections"))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e}") from e
    server = HttpServer(config)
    server.serve_in_thread(sock)
    port = sock.getsockname()[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return server, f"{'https' if setting(settings, 'tls_cert') else 'http'}://{host}:{port}"


class EdgeNode:
    """Everything one edge process serves; ``run()`` until ``stop()``."""

    def __init__(self, settings: EdgeSettings):
        torch.set_num_threads(settings.threads)
        self.settings = settings
        self.model_name = settings.model_name
        self.plan = load_plan(settings.plan)
        self.codec = self.plan["codecs"]["edge_cloud"]
        self.segment = load_tier(settings.plan, "edge", cpu_decode=CpuDecode.of(settings))  # embedding + [0, k2)
        self.spec = self.segment.spec
        self.segment_lock = FairLock()  # the HTTP and the MQTT schedulers take turns on the CPU
        self.owner = Scheduler(self.segment, max_batch=settings.relay_max_batch, lock=self.segment_lock,
                               name="owner-scheduler").start()  # HTTP sessions' steps of [0, k2)
        self.device_segment = self._device_segment()  # [k1, k2) for device frames
        self.tokenizer = self._tokenizer(Path(settings.plan) / "edge")
        self.metrics = EdgeMetrics()
        self.cloud = CloudClient(settings.cloud, settings.step_timeout_s, settings.max_frame_bytes, self.metrics,
                                 tls=cloud_tls(settings))
        self.estimates = Estimates.from_plan(self.plan)
        self.estimates.register(self.metrics.registry)
        fast = FastTail.load(settings.plan, settings.grammar_limits(), cpu_decode=CpuDecode.of(settings))
        for segment in (self.segment, self.device_segment, fast.segment):
            if hasattr(segment, "configure_pool"):  # (ONNX Runtime tiers keep their own caches)
                segment.configure_pool(tokens=settings.kv_pool_tokens)
        self.router = Router(
            self.cloud, fast, self.estimates, self.spec.hidden_size, self.metrics,
            policy=parse_policy(settings.policy), margin=settings.policy_margin, step_timeout_s=settings.step_timeout_s,
            speculate=settings.speculate, max_draft=settings.max_draft, fixed_draft=settings.draft_tokens,
            alpha_prior=acceptance_prior(self.plan),
        )  # fmt: skip
        self.probe = LinkProbe(self.router, settings.probe_interval_s)
        self.relay = None
        if settings.broker:
            self.relay = FrameRelay(settings, self.device_segment, self.segment_lock, self.codec,
                                    lambda: self.tail("mqtt"), self.metrics)
        self.url = ""
        self._stop = threading.Event()
        self._closed = False
        self._http: HttpServer | None = None

    # ---- what the HTTP app uses ------------------------------------------------------------------

    def generation(self, prompt_ids: list[int], params: pb.GenerationParams, deadline_unix_ms: int = 0
                   ) -> Generation:
        """A Generation owned by the edge: segment [0, k2), the plan's edge_cloud codec, a new tail."""
        return EdgeGeneration(
            segment=self.owner,
            downstream=self.tail("http"),
            prompt_ids=list(prompt_ids),
            params=params,
            codec=self.codec,
            tokenizer=self.tokenizer,
            deadline_unix_ms=deadline_unix_ms,
            metrics=self.metrics,
        )

    def tail(self, kind: str) -> Downstream:
        """The tail of a new session of ``kind`` ('http' or 'mqtt'): the router's, on the path it chooses."""
        return self.router.tail(kind)

    def health(self) -> dict[str, bool]:
        """{"broker": every MQTT subscription of the relay acknowledged now (True without a broker), "cloud": the
        cloud's health service serves, "fast_path": the fast tail answers (until the edge shuts down)}
        (``health.readiness`` reads them)."""
        return {"broker": self.relay.subscribed() if self.relay else True, "cloud": self.cloud.healthy(),
                "fast_path": not self.router.closed.is_set()}

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> str:
        """Wait for the cloud, subscribe to MQTT, serve HTTP; log and return ``http://HOST:PORT``."""
        s = self.settings
        self.cloud.wait_ready(s.connect_timeout_s, abort=self._stop)
        self.probe.start()
        if self.relay is not None and not self._stop.is_set():
            self.relay.start(s.connect_timeout_s)
        if self._stop.is_set():
            return ""
        self.url = self._serve_http()
        logger.info("edge %s serving plan %s (splits %s, edge->cloud codec %s), %s; ready: %s",
                    s.edge_id, s.plan, self.plan["splits"], self.codec, security_note(s), self.url)
        return self.url

    def run(self) -> None:
        """Start, serve until ``stop()``, then shut down."""
        try:
            self.start()
            self._stop.wait()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask ``run()`` to return (from any thread)."""
        self._stop.set()

    def close(self) -> None:
        """Stop taking MQTT frames and HTTP requests, end the cloud streams, close the channel."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.relay is not None:
            self.relay.stop()
        if self._http is not None:
            self._http.should_exit = True  # no new requests; open responses get the grace period to finish
            self._http.thread.join(self.settings.shutdown_grace_s)
        self.probe.stop()
        self.router.close()  # from now on a failing cloud step fails its session instead of falling back
        self.cloud.close()  # the generations still running fail now (CANCELLED), so their responses end
        if self._http is not None:
            self._http.thread.join(HTTP_BACKSTOP_S + 1)
        self.owner.stop()
        logger.info("edge %s stopped", self.settings.edge_id)

    # ---- parts -------------------------------------------------------------------------------------

    def _device_segment(self):
        """Layers [k1, k2) of the edge tier: a view sharing the weights, or (ONNX tiers) a segment of its own."""
        k1, k2 = self.plan["splits"]
        if hasattr(self.segment, "view"):
            return self.segment.view(k1, k2)
        folder = Path(self.settings.plan) / "edge"
        manifest = verify_manifest(folder)
        return build_segment(folder, k1, k2, False, False, manifest["compression"], threads=self.settings.threads)

    @staticmethod
    def _tokenizer(folder: Path):
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            logger.warning("%s has no tokenizer: the HTTP completions API cannot serve text", folder)
            return None
        return load_tokenizer(folder)

    def _serve_http(self) -> str:
        """Serve the HTTP API in a thread (``serve_http``); its URL."""
        from .http_api import create_app

        app = create_app(self)
        if tracing.enabled:
            tracing.instrument_fastapi(app)
        self._http, url = serve_http(app, self.settings, self.metrics)
        return url
