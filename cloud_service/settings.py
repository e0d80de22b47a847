"""Runtime settings of the cloud service: one pydantic-settings class, from a YAML file, env vars and CLI flags.

Precedence, highest first: command-line flags (``--port 50052``), environment
variables (``SPLITGLM_CLOUD_PORT=50052``), the YAML file given with
``--config``, the defaults below. Every field states its unit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class SettingsError(ValueError):
    """The settings are invalid (the process exits with code 2)."""


class CloudSettings(BaseSettings):
    """Settings of ``python -m cloud_service``."""

    model_config = SettingsConfigDict(env_prefix="SPLITGLM_CLOUD_", extra="forbid", yaml_file=None)

    plan: Path = Field(description="plan folder (from `splitglm partition`); the service runs its cloud tier")
    host: str = Field(default="0.0.0.0", min_length=1, description="interface the gRPC server listens on")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 = a free port")
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the segment runs; auto = cuda when available"
    )
    max_sessions: int = Field(default=1024, ge=1, description="sessions held at once, sessions")
    max_batch: int = Field(default=32, ge=1, description="most sessions in one forward pass, sessions")
    max_frame_bytes: int = Field(default=64 << 20, ge=1024, description="largest accepted frame, bytes")
    max_tokens: int = Field(default=4096, ge=1, description="largest max_tokens a session may ask, tokens")
    max_positions: int = Field(default=8192, ge=1, description="most cached positions per session, positions")
    session_ttl_s: float = Field(default=300.0, gt=0, description="idle sessions are freed after, seconds")
    grace_s: float = Field(default=5.0, ge=0, description="on shutdown, time left to running streams, seconds")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @classmethod
    def load(cls, argv: list[str] | None = None) -> CloudSettings:
        """Settings from ``argv`` (flags override env vars, which override ``--config FILE.yaml``)."""
        args = vars(parser().parse_args(argv))
        config = args.pop("config", None)
        source = cls
        if config is not None:
            if not Path(config).is_file():
                raise SettingsError(f"--config {config!r}: no such file")
            source = type(cls.__name__, (cls,), {"model_config": {**cls.model_config, "yaml_file": config}})
        try:
            return source(**args)
        except ValidationError as e:
            raise SettingsError(_explain(e)) from None


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        lines.append(f"{name.replace('_', '-')}: {item['msg']}")
    return "invalid cloud settings:\n  " + "\n  ".join(lines)


def parser() -> argparse.ArgumentParser:
    """One ``--kebab-case`` flag per field (no defaults here: unset flags leave env/YAML/defaults alone)."""
    p = argparse.ArgumentParser(
        prog="python -m cloud_service",
        description="splitglm cloud service: a plan's cloud segment over gRPC, steps of many sessions batched",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of settings (keys are the field names, e.g. max_sessions)")
    for name, field in CloudSettings.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(), help=field.description)
    return p
