"""Settings loading shared by the three agents (they share only ``protos`` and ``partitioner``).

Each agent has one ``AgentSettings`` subclass (its own env prefix, every field
with its unit). Values come, highest priority first, from command-line flags
(the field name in kebab-case: ``--max-tokens 8``), environment variables
(``SPLITGLM_<AGENT>_MAX_TOKENS``), an optional YAML file (``--config FILE``,
field names as keys) and the defaults. ``load_settings`` raises
``SettingsError`` naming each bad field and its flag (the agents exit 2).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .logs import default_format, setup_logging

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("splitglm_config_file", default=None)
S = TypeVar("S", bound=BaseSettings)


class SettingsError(ValueError):
    """Settings that cannot be used (the agent exits with status 2)."""


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SettingsError(f"config file {str(path)!r}: {e}") from None
    if not isinstance(values, dict):
        raise SettingsError(f"config file {str(path)!r} must hold a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


class YamlFile(PydanticBaseSettingsSource):
    """The YAML file named by ``--config`` (a mapping of field names to values), if any."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        path = _CONFIG_FILE.get()
        self.values = read_yaml(path) if path is not None else {}

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class AgentSettings(BaseSettings):
    """Flags > environment > YAML file > defaults."""

    model_config = SettingsConfigDict(extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **other_sources):
        return init_settings, env_settings, YamlFile(settings_cls)


class LogSettings(AgentSettings):
    """How an agent logs (``runtime.logs``): every agent's settings class has these fields."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="the least severe records "
                                                                  "logged: DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field(default_factory=default_format, validate_default=True,
                                                description="text (one line a record) or json (one object a line, "
                                                "with request_id, session_id and trace_id); default: "
                                                "SPLITGLM_LOG_FORMAT, else text")

    _upper_level = field_validator("log_level", mode="before")(lambda v: v.upper() if isinstance(v, str) else v)
    _lower_format = field_validator("log_format", mode="before")(lambda v: v.lower() if isinstance(v, str) else v)

    def setup_logging(self) -> None:
        """Log as these settings say (``runtime.logs.setup_logging``)."""
        setup_logging(self.log_level, self.log_format)


class CpuDecodeSettings(AgentSettings):
    """How a CPU tier runs its layers for steps of a few rows (``runtime.cpu_decode``)."""

    cpu_decode: Literal["plan", "eager", "compiled"] = Field(
        "plan", description="plan: the path the plan chose for this tier by its measured step time (plan.json's "
        "cpu_decode; eager where it names none); eager: PyTorch op by op; compiled: decode steps of up to "
        "cpu_decode_max_rows rows "
        "through an Inductor-compiled graph (1.7-1.8x faster int4 decode on the demo model; compiles at start: up to "
        "100 s a segment the first time, seconds from Inductor's cache; needs a C++ compiler, else stays eager)")
    cpu_decode_max_rows: int = Field(16, ge=1, le=1024, description="most rows a step may hold to take the "
                                     "compiled graph, rows (decode rows of the relay's batch, drafts); longer steps "
                                     "run eager")


class GrammarSettings(AgentSettings):
    """The limits of a tier that samples on its grammars (``runtime.grammar.GrammarLimits``)."""

    grammar_max_bytes: int = Field(default=64 * 1024, ge=1, description="largest grammar a request may send (a "
                                   "JSON schema, a Lark grammar, a regex), bytes; larger ones get INVALID_ARGUMENT")
    grammar_max_depth: int = Field(default=32, ge=1, description="deepest nesting of a JSON schema's objects and "
                                   "arrays, levels; deeper ones get INVALID_ARGUMENT")
    grammar_max_compile_ms: float = Field(default=5000.0, gt=0, description="longest a grammar may take to "
                                          "compile, milliseconds; slower ones get INVALID_ARGUMENT (and are not "
                                          "cached)")
    grammar_cache: int = Field(default=64, ge=1, description="compiled grammars kept for later requests, grammars")

    def grammar_limits(self):
        """These limits as ``runtime.grammar.GrammarLimits``."""
        from runtime.grammar import GrammarLimits  # (imports torch: only once the settings are good)

        return GrammarLimits(max_bytes=self.grammar_max_bytes, max_depth=self.grammar_max_depth,
                             max_compile_ms=self.grammar_max_compile_ms, cache=self.grammar_cache)


def existing_file(value: Path | None) -> Path | None:
    """A field validator: unset, or a file that exists."""
    if value is not None and not value.is_file():
        raise ValueError(f"no such file {str(value)!r}")
    return value


class MqttClientSettings(AgentSettings):
    """The MQTT login of an agent that talks to a broker (``protos.mqtt.MqttAuth.from_settings`` reads it)."""

    mqtt_username: str = Field("", description="MQTT login name (empty = anonymous); a device's is its device id, "
                               "an edge's its edge id")
    mqtt_password_file: Path | None = Field(None, description="file whose first line is the MQTT password")
    mqtt_ca_file: Path | None = Field(None, description="PEM CA that signed the broker's certificate (mqtts://; "
                                      "unset = the system CAs)")

    _check_login_files = field_validator("mqtt_password_file", "mqtt_ca_file")(existing_file)

    @model_validator(mode="after")
    def _login_complete(self):
        if self.mqtt_password_file is not None and not self.mqtt_username:
            raise ValueError("mqtt_password_file needs mqtt_username too")
        return self


def settings_parser(cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--kebab-case`` flag per field (no defaults: unset flags leave env / YAML / defaults alone)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML file of settings (field names as keys)")
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=field.description)
    return parser


def load_settings(cls: type[S], argv: list[str] | None, prog: str, description: str) -> S:
    """Parse flags and build the settings; SettingsError if they are invalid (bad flags: argparse exits 2)."""
    flags = vars(settings_parser(cls, prog, description).parse_args(argv))
    config = flags.pop("config", None)
    if config is not None and not config.is_file():
        raise SettingsError(f"--config {str(config)!r}: no such file")
    token = _CONFIG_FILE.set(config)
    try:
        return cls(**flags)
    except ValidationError as e:
        raise SettingsError(explain(e, cls, prog)) from None
    finally:
        _CONFIG_FILE.reset(token)


def explain(error: ValidationError, cls: type[BaseSettings], prog: str) -> str:
    """One line per problem, naming the field and its flag."""
    lines = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        if name in cls.model_fields:
            name = f"{name} (--{name.replace('_', '-')})"
        lines.append(f"{name}: {item['msg']}")
    return f"invalid {prog} settings:\n  " + "\n  ".join(lines)


@contextmanager
def stop_on_signals(on_stop: Callable[[int], None] | None = None) -> Iterator[threading.Event]:
    """An Event that SIGTERM / SIGINT set while inside the block; the previous handlers come back after.

    ``on_stop(signal_number)``, if given, runs (in the watcher thread) after each such signal.

    The Python-level handler does nothing: a handler runs between two bytecodes of
    the main thread, which may be inside ``Event.wait`` holding the very lock that
    ``Event.set`` takes, so setting the event there can deadlock (it did, once in a
    CI run). The interpreter's C-level handler writes the signal's number to a
    wakeup socket instead, and a watcher thread sets the event.
    """
    stop = threading.Event()
    wanted = (signal.SIGTERM, signal.SIGINT)
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    def watch() -> None:
        while data := reader.recv(64):
            for number in data:
                if number in wanted:
                    stop.set()
                    if on_stop is not None:
                        on_stop(number)

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in wanted}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="splitglm-signals", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        writer.shutdown(socket.SHUT_WR)
        watcher.join(1.0)
        reader.close()
        writer.close()
