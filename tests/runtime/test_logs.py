"""``runtime.logs``: text and JSON lines, the ids bound for a block, the current span's trace id; every agent's
``--log-format`` / ``SPLITGLM_<AGENT>_LOG_FORMAT`` / ``SPLITGLM_LOG_FORMAT``, and the broker's flag."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry import trace

from cloud_service.settings import CloudSettings
from device_agent.settings import SensorSettings
from runtime import logs
from runtime.settings import SettingsError, load_settings


@pytest.fixture
def captured():
    """A stream for ``setup_logging``; the root logger as it was, after."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield stream
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_bound_ids_and_the_trace_id(captured):
    logs.setup_logging("INFO", "json", captured)
    log = logging.getLogger("splitglm.test")
    log.info("outside")
    span = trace.NonRecordingSpan(trace.SpanContext(trace_id=0xABC, span_id=0x12, is_remote=False))
    with logs.bound(request_id="r-1", session_id="s-1"), trace.use_span(span):
        log.warning("inside %d", 7, extra={"status": 200})
    log.debug("below the level")
    outside, inside = (json.loads(line) for line in captured.getvalue().splitlines())
    assert {k: outside[k] for k in ("level", "logger", "message", "request_id", "session_id", "trace_id")} == {
        "level": "INFO", "logger": "splitglm.test", "message": "outside", "request_id": "", "session_id": "",
        "trace_id": ""}
    assert (inside["message"], inside["request_id"], inside["session_id"]) == ("inside 7", "r-1", "s-1")
    assert inside["trace_id"] == f"{0xABC:032x}" and inside["status"] == 200 and inside["timestamp"]


def test_text_lines_append_the_ids_that_are_set(captured):
    logs.setup_logging(logging.INFO, "text", captured)
    logs.setup_logging(logging.INFO, "text", captured)  # again: it replaces its own handler (one line a record)
    log = logging.getLogger("splitglm.test")
    log.info("plain")
    with logs.bound(session_id="s-2"):
        log.info("about a session")
    plain, session = captured.getvalue().splitlines()
    assert plain.endswith(" INFO splitglm.test: plain")
    assert session.endswith(" INFO splitglm.test: about a session [session_id=s-2]")
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.setup_logging(logging.INFO, "xml")


def test_every_agent_takes_its_log_format_from_flags_then_its_env_then_the_common_env(tiny_plan, monkeypatch):
    monkeypatch.setenv("SPLITGLM_LOG_FORMAT", "json")
    assert SensorSettings(device_id="d1").log_format == "json"
    monkeypatch.setenv("SPLITGLM_CLOUD_LOG_FORMAT", "TEXT")
    monkeypatch.setenv("SPLITGLM_CLOUD_LOG_LEVEL", "debug")
    cloud = CloudSettings(plan=tiny_plan)
    assert (cloud.log_format, cloud.log_level) == ("text", "DEBUG")
    flags = load_settings(CloudSettings, ["--plan", tiny_plan, "--log-format", "json"], "cloud", "")
    assert flags.log_format == "json"
    with pytest.raises(SettingsError, match=r"log_format \(--log-format\)"):
        load_settings(CloudSettings, ["--plan", tiny_plan, "--log-format", "yaml"], "cloud", "")
    monkeypatch.setenv("SPLITGLM_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        SensorSettings(device_id="d1")


def test_the_broker_takes_a_log_format(monkeypatch):
    from splitglm.broker import build_parser

    assert build_parser().parse_args(["--log-format", "json"]).log_format == "json"
    monkeypatch.setenv("SPLITGLM_LOG_FORMAT", "json")
    assert build_parser().parse_args([]).log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "yaml"])
