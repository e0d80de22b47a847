"""Sensor payload validation and prompt rendering (no processes)."""

from __future__ import annotations

import json

import pytest

from device_agent.readings import (
    Reading,
    ReadingError,
    chat_messages,
    parse_reading,
    prompt_token_ids,
    render_prompt,
)
from device_agent.settings import DEFAULT_PROMPT

TOPIC = "sensors/box-1/temperature"


def parse(payload, topic=TOPIC, max_bytes=4096) -> Reading:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_reading(topic, data, "box-1", max_bytes)


def test_json_object_reading():
    reading = parse({"value": 21.5, "unit": "C", "ts": 1732460000.0})
    assert reading.sensor == "temperature"
    assert reading.as_json() == {"sensor": "temperature", "value": 21.5, "unit": "C", "ts": 1732460000.0}
    assert reading.line() == "temperature: 21.5 C"


def test_bare_number_reading():
    reading = parse(b"42")
    assert reading.fields == {"value": 42} and reading.line() == "temperature: 42"
    assert parse(b" -0.25 ").as_json() == {"sensor": "temperature", "value": -0.25}


def test_nested_sensor_name_and_object_without_value():
    reading = parse({"x": 0.1, "y": -0.2, "ts": 5}, topic="sensors/box-1/imu/accel")
    assert reading.sensor == "imu/accel"
    assert reading.line() == 'imu/accel: {"x":0.1,"y":-0.2}'


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "not list"),
        (b'"hot"', "not str"),
        (b"true", "not bool"),
        (b"null", "not NoneType"),
        (b"{}", "non-empty"),
        (b'{"value": NaN}', "non-finite"),
        (b'{"value": 1e999}', "out of range"),
    ],
)
def test_invalid_payloads_are_refused(payload, message):
    with pytest.raises(ReadingError, match=message):
        parse(payload)


def test_too_large_payload_is_refused():
    payload = json.dumps({"value": 1, "note": "x" * 100}).encode()
    assert parse(payload, max_bytes=len(payload)).fields["value"] == 1
    with pytest.raises(ReadingError, match="exceeds the limit"):
        parse(payload, max_bytes=len(payload) - 1)


def test_wrong_device_topic_is_refused():
    with pytest.raises(ReadingError, match="is not sensors/box-1/"):
        parse(b"1", topic="sensors/box-2/temperature")
    with pytest.raises(ReadingError):
        parse(b"1", topic="sensors/box-1/")


def test_prompt_renders_one_reading_per_line():
    readings = [parse({"value": 21.5, "unit": "C"}), parse(b"0.31", topic="sensors/box-1/vibration")]
    prompt = render_prompt(DEFAULT_PROMPT, "box-1", readings)
    assert "device box-1" in prompt
    assert "Recent readings:\ntemperature: 21.5 C\nvibration: 0.31\nIn one short sentence" in prompt
    assert render_prompt("{readings}|{device_id}", "d", readings[:1]) == "temperature: 21.5 C|d"


class FakeTokenizer:
    """Records what it is asked to encode; one id per character."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template
        self.seen: list = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.seen.append(messages)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        self.seen.append((text, add_special_tokens))
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_goes_through_the_chat_template_with_the_system_prompt():
    tok = FakeTokenizer(chat_template="{{ messages }}")
    ids = prompt_token_ids(tok, "hello", "be brief")
    assert tok.seen[0] == chat_messages("hello", "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    assert "".join(map(chr, ids)) == "<system>be brief<user>hello<assistant>"
    assert tok.seen[1][1] is False  # the template already holds the special tokens
    assert chat_messages("hello", None) == [{"role": "user", "content": "hello"}]


def test_prompt_without_chat_template_is_plain_text():
    assert "".join(map(chr, prompt_token_ids(FakeTokenizer(), "hello", None))) == "hello"
