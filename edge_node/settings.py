"""Runtime settings of the edge node: one pydantic-settings class, from a YAML file, env vars and CLI flags.

Precedence, highest first: command-line flags (``--http-port 8001``), environment
variables (``SPLITGLM_EDGE_HTTP_PORT=8001``), the YAML file given with
``--config``, the defaults below. Every field states its unit.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from protos import topics
from protos.mqtt import broker_address
from runtime.settings import (  # noqa: F401 -- re-exported
    CpuDecodeSettings,
    GrammarSettings,
    LogSettings,
    MqttClientSettings,
    SettingsError,
    existing_file,
    load_settings,
)

from .cloud import parse_targets

DESCRIPTION = "splitglm edge node: MQTT frames from devices, gRPC to the cloud, an OpenAI-compatible HTTP API"


def default_edge_id() -> str:
    """``edge-<hostname>``, with characters that cannot appear in a topic level replaced by '-'."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "localhost"
    return f"edge-{host}"[:64]


class EdgeSettings(MqttClientSettings, GrammarSettings, CpuDecodeSettings, LogSettings):
    """Settings of ``python -m edge_node`` (with the fast tail's grammar limits, ``GrammarSettings``)."""

    model_config = SettingsConfigDict(env_prefix="SPLITGLM_EDGE_", extra="forbid")

    plan: Path = Field(description="plan folder (from `splitglm partition`); the edge serves its edge tier")
    edge_id: str = Field(default_factory=default_edge_id, description="this edge's id: an MQTT topic level")
    pool: str = Field(default=topics.DEFAULT_POOL, description="edge pool whose new sessions this edge takes")
    share_group: str = Field(default=topics.SHARE_GROUP, description="shared-subscription group of the pool (MQTT v5)")
    broker: str = Field(default="mqtt://127.0.0.1:1883", description="MQTT broker URL; empty = no MQTT (HTTP only)")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(default="auto", description="MQTT protocol version")
    cloud: str = Field(default="127.0.0.1:50051", description="the cloud_service replicas: HOST:PORT[,HOST:PORT...]; "
                       "an entry may be dns:///NAME:PORT (round_robin over its addresses, e.g. a headless service)")
    cloud_ca: Path | None = Field(default=None, description="CA certificate (PEM) the cloud's certificate must "
                                  "chain to; set: gRPC over TLS")
    cloud_cert: Path | None = Field(default=None, description="client certificate (PEM) for mutual TLS with the "
                                    "cloud, with cloud_key")
    cloud_key: Path | None = Field(default=None, description="private key (PEM) of cloud_cert")
    cloud_server_name: str = Field(default="", description="name the cloud's certificate must carry; empty = the "
                                   "host of `cloud`")
    http_host: str = Field(default="0.0.0.0", description="interface the HTTP API listens on")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port; 0 = a free port")
    tls_cert: Path | None = Field(default=None, description="server certificate (PEM), with tls_key: HTTPS")
    tls_key: Path | None = Field(default=None, description="private key (PEM) of tls_cert")
    api_keys_file: Path | None = Field(default=None, description="file of API keys, one a line; set: /v1/* and "
                                       "/metrics need `Authorization: Bearer KEY`")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest HTTP request body, bytes (413)")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="longest prompt before tokenising, "
                                  "characters (of all messages of a chat)")
    max_prompt_tokens: int = Field(default=4096, ge=1, description="longest prompt, tokens")
    max_positions: int = Field(default=8192, ge=1, description="most positions (prompt + max_tokens) a request or a "
                               "device session may take: the cloud's --max-positions; larger HTTP requests get a 400 "
                               "up front, device frames beyond it RESOURCE_EXHAUSTED")
    max_concurrent_per_key: int = Field(default=16, ge=0, description="open requests per API key (per client "
                                        "address without keys), requests; 0 = no limit (429)")
    rate_per_key_per_min: int = Field(default=600, ge=0, description="requests per API key (per client address "
                                      "without keys) per minute, bursts up to as many; 0 = no limit (429)")
    http_header_timeout_s: float = Field(default=10.0, ge=0, description="longest time a request head may take to "
                                         "arrive (from the connection's opening, or from a kept-alive connection's "
                                         "next byte), seconds; then 408 and closed; 0 = no limit")
    http_body_timeout_s: float = Field(default=30.0, ge=0, description="longest time a request body may take to "
                                       "arrive after its head, seconds; then 408 and closed; 0 = no limit")
    http_max_connections: int = Field(default=512, ge=0, description="open HTTP connections, connections; one "
                                      "more evicts the oldest without a request in progress, or gets a 503 when "
                                      "every one has one; 0 = no limit")
    http_max_requests: int = Field(default=256, ge=0, description="HTTP requests in progress on the whole server, "
                                   "requests (/livez, /readyz, /healthz exempt); more get 503; 0 = no limit")
    http_keepalive_timeout_s: float = Field(default=5.0, gt=0, description="an idle kept-alive HTTP connection is "
                                            "closed after, seconds")
    http_max_requests_per_connection: int = Field(default=1000, ge=0, description="requests on one HTTP "
                                                  "connection before it is closed, requests; 0 = no limit")
    forwarded_allow_ips: str = Field(default="", description="proxies whose X-Forwarded-For names the client: "
                                     "addresses or networks, comma-separated; empty = none (the header is ignored "
                                     "and every limit counts the peer's address)")
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads")
    relay_workers: int = Field(default=16, ge=1, le=1024, description="threads serving MQTT frames (sessions)")
    relay_max_batch: int = Field(default=32, ge=1, le=1024, description="most device frames in one forward pass "
                                 "of the edge's layers, frames")
    relay_max_sessions: int = Field(default=1024, ge=1, description="device sessions held at once, sessions; "
                                    "more get RESOURCE_EXHAUSTED")
    max_frame_positions: int = Field(default=2048, ge=1, description="most positions one device frame may carry "
                                     "(its hidden states' rows); the cap on what one frame can make the edge compute")
    relay_queue: int = Field(default=64, ge=1, description="frames waiting per device session, frames; more get "
                             "RESOURCE_EXHAUSTED")
    device_max_sessions: int = Field(default=4, ge=0, description="fair share: sessions one device holds at once "
                                     "at this edge, sessions; more get RESOURCE_EXHAUSTED; 0 = no limit")
    device_max_kv_positions: int = Field(default=8192, ge=0, description="fair share: KV positions one device's "
                                         "sessions reserve at once (prompt + max_tokens each), positions; more get "
                                         "RESOURCE_EXHAUSTED; 0 = no limit")
    device_max_queued_frames: int = Field(default=64, ge=0, description="fair share: frames of one device waiting "
                                          "or running at the relay, frames; more get RESOURCE_EXHAUSTED; 0 = no "
                                          "limit")
    device_max_queued_bytes: int = Field(default=64 << 20, ge=0, description="fair share: bytes of one device's "
                                         "frames waiting or running at the relay, bytes (at least max_frame_bytes); "
                                         "more get RESOURCE_EXHAUSTED; 0 = no limit")
    device_frames_per_s: int = Field(default=1000, ge=0, description="fair share: frames one device may send, "
                                     "frames per second, bursts up to as many; more get RESOURCE_EXHAUSTED; 0 = no "
                                     "limit")
    key_max_sessions: int = Field(default=16, ge=0, description="fair share: HTTP sessions (generations) one API "
                                  "key (one client address without keys) holds at once, sessions; more get 429; "
                                  "0 = no limit")
    key_max_kv_positions: int = Field(default=16384, ge=0, description="fair share: KV positions one API key's (one "
                                      "client address's) sessions reserve at once (prompt + max_tokens each), "
                                      "positions; more get 429; 0 = no limit")
    step_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for one cloud step, seconds")
    connect_timeout_s: float = Field(default=60.0, gt=0, description="longest wait for the cloud at start-up, seconds")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="on SIGTERM, time open HTTP responses get "
                                    "before their cloud streams are cancelled, seconds")
    session_ttl_s: float = Field(default=300.0, gt=0, description="idle MQTT sessions are freed after, seconds")
    stream_send_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for a streaming HTTP client to "
                                         "take one event, seconds; one that takes longer is dropped, its session freed")
    max_frame_bytes: int = Field(default=64 << 20, ge=1024, description="largest accepted frame, bytes")
    default_max_tokens: int = Field(default=128, ge=1, description="max_tokens of HTTP requests that set none, tokens")
    max_tokens_limit: int = Field(default=2048, ge=1, description="largest max_tokens an HTTP request (400) "
                                  "or a device session (RESOURCE_EXHAUSTED) may ask, tokens")
    max_n: int = Field(default=16, ge=1, description="most completions (n) one HTTP request may ask for (400 "
                       "beyond), completions")
    model_name: str = Field(default="splitglm", min_length=1, description="model id the HTTP API serves")
    policy: Literal["adaptive", "accurate", "fast"] = Field(
        default="adaptive", description="router policy of requests that name none (adaptive: by latency budget)"
    )
    policy_margin: float = Field(default=0.2, ge=0, le=10, description="adaptive: the cloud path is chosen only if "
                                 "its p95 prediction times (1 + this) fits the budget, a fraction")
    kv_pool_tokens: int = Field(default=32768, ge=16, description="KV pool of each of the edge's segments (its "
                                "[0, k2), the device frames' [k1, k2), the fast tail), positions; a full pool refuses "
                                "new sessions with RESOURCE_EXHAUSTED")
    speculate: bool = Field(default=True, description="speculative split decoding on the accurate path where it "
                            "pays: the fast tail drafts, the cloud verifies several tokens per round trip (a request's "
                            "\"speculate\" overrides it)")
    max_draft: int = Field(default=8, ge=1, le=15, description="most tokens drafted per round trip, tokens (at most "
                           "the cloud's --max-draft)")
    draft_tokens: int = Field(default=0, ge=0, le=15, description="drafts per round trip when speculating, tokens; "
                              "0 = chosen per round from the measured acceptance, round trip and step costs")
    probe_interval_s: float = Field(default=0.05, ge=0, description="while no session steps the cloud, time its "
                                    "health check this often to keep the router's link estimates current, seconds; "
                                    "0 = never")

    @field_validator("plan")
    @classmethod
    def _plan_folder(cls, value: Path) -> Path:
        if not (value / "plan.json").is_file():
            raise ValueError(f"{str(value)!r} is not a plan folder (no plan.json; see `splitglm partition`)")
        return value

    @field_validator("edge_id", "pool", "share_group")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        topics.frames_subscription(value)  # raises ValueError unless a valid topic level
        return value

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value:
            broker_address(value)
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if item != "*":
                ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("cloud")
    @classmethod
    def _cloud_address(cls, value: str) -> str:
        parse_targets(value)
        return value

    _existing_files = field_validator("cloud_ca", "cloud_cert", "cloud_key", "tls_cert", "tls_key",
                                      "api_keys_file")(existing_file)

    @model_validator(mode="after")
    def _tls_pairs(self) -> EdgeSettings:
        for cert, key in (("cloud_cert", "cloud_key"), ("tls_cert", "tls_key")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"{cert} and {key} go together: give both or neither")
        if self.cloud_ca is None and (self.cloud_cert is not None or self.cloud_server_name):
            raise ValueError("cloud_cert and cloud_server_name are for TLS to the cloud: give cloud_ca too")
        if self.max_prompt_tokens >= self.max_positions:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} leaves no room for new tokens within "
                             f"max_positions {self.max_positions}")
        return self

    @model_validator(mode="after")
    def _http_limits(self) -> EdgeSettings:
        if self.http_max_connections and self.http_max_requests > self.http_max_connections:
            raise ValueError(f"http_max_requests {self.http_max_requests} must be within http_max_connections "
                             f"{self.http_max_connections}: each request in progress holds a connection")
        return self

    @model_validator(mode="after")
    def _shares(self) -> EdgeSettings:
        if self.device_max_queued_bytes and self.device_max_queued_bytes < self.max_frame_bytes:
            raise ValueError(f"device_max_queued_bytes {self.device_max_queued_bytes} must hold one frame of "
                             f"max_frame_bytes {self.max_frame_bytes}")
        return self

    @model_validator(mode="after")
    def _token_limits(self) -> EdgeSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_limit {self.max_tokens_limit}"
            )
        if self.edge_id == self.pool:
            raise ValueError(f"edge_id {self.edge_id!r} must differ from the pool name (both name a frames topic)")
        return self

    @classmethod
    def load(cls, argv: list[str] | None = None) -> EdgeSettings:
        """Settings from ``argv`` (flags override env vars, which override ``--config FILE.yaml``)."""
        return load_settings(cls, argv, "python -m edge_node", DESCRIPTION)


def setting(settings, name: str):
    """``settings.name``, or EdgeSettings' default where a stand-in settings object (tests) lacks it."""
    return getattr(settings, name, EdgeSettings.model_fields[name].default)
