"""Every process's logging: one stderr handler, text or JSON lines, and the ids of the request a line is about.

``setup_logging(level, fmt)`` configures the root logger once per process (again: it replaces its own
handler). ``fmt`` is ``"text"`` (``2025-01-01 12:00:00,000 INFO edge_node.jobs: message``) or ``"json"``
(python-json-logger, one object a line: ``timestamp``, ``level``, ``logger``, ``message``, then the
context fields and any ``extra=`` of the call).

The context: the code that handles a request binds ``request_id`` (the edge's ``X-Request-ID``, a device
agent's answer id) and ``session_id`` (the session a generation runs under on every tier: the one id the
tiers share) for a block, ``with bound(request_id=..., session_id=...)``; ``ContextFilter`` adds both, and
the trace id of the current OpenTelemetry span (32 hex digits, "" without one), to every record. JSON lines
always carry the three fields; text lines append those that are set, ``[request_id=... session_id=...]``.
The values are ids, never prompt text. A contextvar follows ``asyncio`` tasks and anyio's worker threads
(``to_thread.run_sync`` copies the context); a thread of our own binds its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

from opentelemetry import trace

FORMATS = ("text", "json")
FORMAT_ENV = "SPLITGLM_LOG_FORMAT"  # every process's default format (an agent's own SPLITGLM_<AGENT>_LOG_FORMAT wins)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("request_id", "session_id", "trace_id")
JSON_FIELDS = ("levelname", "name", "message", *CONTEXT_FIELDS)
JSON_NAMES = {"levelname": "level", "name": "logger"}

request_id: ContextVar[str] = ContextVar("splitglm_request_id", default="")
session_id: ContextVar[str] = ContextVar("splitglm_session_id", default="")
_VARS = {"request_id": request_id, "session_id": session_id}


@contextmanager
def bound(**ids: str) -> Iterator[None]:
    """Bind ``request_id`` and / or ``session_id`` for the block (the previous values come back after)."""
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            try:
                var.reset(token)
            except ValueError:  # a generator closed from another context: that context never saw the value
                pass


def trace_id() -> str:
    """The current OpenTelemetry span's trace id, 32 hex digits; "" outside a (valid) span."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``session_id`` and ``trace_id`` to every record (a value given by ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id()
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, then the context fields that are set: ``[request_id=... session_id=...]``."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, "")))
        if not context:
            return line
        head, newline, rest = line.partition("\n")  # (after the message, before a traceback)
        return f"{head} [{context}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """python-json-logger's formatter: timestamp (ISO 8601, UTC), level, logger, message, the context fields."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(list(JSON_FIELDS), rename_fields=JSON_NAMES, timestamp=True)


def default_format() -> str:
    """``SPLITGLM_LOG_FORMAT``, else "text"."""
    return os.environ.get(FORMAT_ENV, "").strip().lower() or "text"


def setup_logging(level: int | str = logging.INFO, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` (a number or a name), one line a record in ``fmt`` ("text" or
    "json"), every record with its context; ValueError for another format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.splitglm = True  # ours: the next setup_logging replaces it
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "splitglm", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
