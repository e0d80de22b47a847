"""Runtime settings of the cloud service: one pydantic-settings class, from a YAML file, env vars and CLI flags.

Precedence, highest first: command-line flags (``--port 50052``), environment
variables (``SPLITGLM_CLOUD_PORT=50052``), the YAML file given with
``--config``, the defaults below. Every field states its unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from runtime.settings import GrammarSettings, LogSettings, SettingsError, load_settings  # noqa: F401 -- re-exported

DESCRIPTION = "splitglm cloud service: a plan's cloud segment over gRPC, steps of many sessions batched"


class CloudSettings(GrammarSettings, LogSettings):
    """Settings of ``python -m cloud_service`` (with the grammars' limits, ``GrammarSettings``)."""

    model_config = SettingsConfigDict(env_prefix="SPLITGLM_CLOUD_", extra="forbid")

    plan: Path = Field(description="plan folder (from `splitglm partition`); the service runs its cloud tier")
    host: str = Field(default="0.0.0.0", min_length=1, description="interface the gRPC server listens on")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 = a free port")
    tls_cert: Path | None = Field(default=None, description="server certificate (PEM), with tls_key: gRPC over TLS")
    tls_key: Path | None = Field(default=None, description="private key (PEM) of tls_cert")
    tls_client_ca: Path | None = Field(default=None, description="CA certificate (PEM); set: mutual TLS, only "
                                       "clients with a certificate this CA signed are served")
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the segment runs; auto = cuda when available"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8"] = Field(
        default="auto", description="weights and KV cache precision; fp8 = the layers' products in E4M3 (per-channel "
        "scales), the rest bfloat16, on a GPU with FP8 (Ada, Hopper); auto = the plan's choice for the cloud tier, "
        "else bfloat16 on cuda and float32 on cpu"
    )
    kv_pool_mib: float | None = Field(
        default=None, gt=0, description="KV pool size, MiB (default 1024 on cpu, 8192 on cuda)"
    )
    kv_pool_tokens: int | None = Field(default=None, ge=1, description="KV pool size, positions (instead of MiB)")
    prefill_chunk: int = Field(
        default=256, ge=1, description="prompt positions per step: a long prompt delays decode steps by one chunk"
    )
    tensor_parallel: int = Field(default=1, ge=1, le=64, description="processes the cloud segment is split across "
                                 "by tensor parallelism, ranks (one per GPU on cuda, gloo on cpu); rank 0 serves gRPC")
    tp_timeout_s: float = Field(default=60.0, gt=0, description="with tensor_parallel > 1: longest wait of one "
                                "collective between ranks (a rank that hangs takes the replica down), seconds")
    cuda_graphs: bool = Field(default=True, description="on cuda, replay decode and verify steps as CUDA graphs")
    mixed_passes: bool = Field(default=False, description="on cuda, run a step's decode rows and its prompt chunk "
                               "in one pass: a shorter step while prompts arrive, but the decode rows then round as "
                               "cuBLAS does, not bit-identically whoever shares a step (false: separate passes)")
    max_draft: int = Field(default=8, ge=0, le=15, description="most drafted tokens a verification frame carries")
    max_sessions: int = Field(default=1024, ge=1, description="sessions held at once, sessions")
    max_batch: int = Field(default=32, ge=1, description="most sessions in one forward pass, sessions")
    max_frame_bytes: int = Field(default=64 << 20, ge=1024, description="largest accepted frame, bytes")
    max_tokens: int = Field(default=4096, ge=1, description="largest max_tokens a session may ask, tokens")
    max_positions: int = Field(default=8192, ge=1, description="most cached positions per session, positions")
    step_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for one step of a session "
                                  "(a long prompt's included), seconds; then DEADLINE_EXCEEDED on its stream")
    session_ttl_s: float = Field(default=300.0, gt=0, description="idle sessions are freed after, seconds")
    grace_s: float = Field(default=5.0, ge=0, description="on shutdown, time left to running streams, seconds")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="port of the Prometheus metrics "
                                     "(plain HTTP, GET /metrics); 0 = a free port; unset = no metrics")
    metrics_host: str = Field(default="127.0.0.1", min_length=1, description="interface the metrics port "
                              "listens on")

    @model_validator(mode="after")
    def _tls_files(self) -> CloudSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (TLS) or neither (plaintext)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key (the server's own certificate)")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {str(path)!r}")
        return self

    @classmethod
    def load(cls, argv: list[str] | None = None) -> CloudSettings:
        """Settings from ``argv`` (flags override env vars, which override ``--config FILE.yaml``)."""
        return load_settings(cls, argv, "python -m cloud_service", DESCRIPTION)
