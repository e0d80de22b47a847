"""Sensor readings: validated from MQTT payloads, rendered into the prompt.

A reading arrives on ``sensors/{device_id}/{sensor}`` as a JSON object such as
``{"value": 21.5, "unit": "C", "ts": 1732460000.0}`` or as a bare number.
Anything else (not UTF-8 JSON, too large, not an object or number,
non-finite numbers, nested deeper than ``MAX_DEPTH``, text that is not
Unicode scalar values, such as an escaped lone surrogate) is refused with a
``ReadingError``; ``dead_letter`` is what the agent publishes about it.
``ReadingRate`` drops the readings of a flood, over ``max_readings_per_s``,
before they are read.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.rates import RateBuckets

MAX_DEPTH = 8  # nesting of JSON objects and arrays a reading may have (deeper ones break the prompt and the answer)
HEAD_BYTES = 64  # bytes of a refused payload quoted in its dead letter


class ReadingError(ValueError):
    """A sensor payload that is not a valid reading."""


@dataclass(frozen=True)
class Reading:
    sensor: str  # the topic levels after sensors/{device_id}/
    fields: dict[str, Any]  # the JSON object as published (a bare number becomes {"value": n})
    received: float = field(default_factory=time.monotonic, compare=False)  # time.monotonic() when it arrived

    def as_json(self) -> dict[str, Any]:
        """The reading as it appears in an answer: its sensor name and its fields."""
        return {"sensor": self.sensor, **{k: v for k, v in self.fields.items() if k != "sensor"}}

    def line(self) -> str:
        """One line of the prompt, e.g. ``temperature: 21.5 C``."""
        if "value" not in self.fields:
            rest = {k: v for k, v in self.fields.items() if k != "ts"}
            return f"{self.sensor}: {json.dumps(rest, separators=(',', ':'))}"
        unit = self.fields.get("unit")
        return f"{self.sensor}: {self.fields['value']}" + (f" {unit}" if unit not in (None, "") else "")


def _no_constants(name: str):
    raise ReadingError(f"non-finite number {name} in the reading")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise ReadingError(f"number {text[:32]} is out of range")
    return value


def parse_reading(topic: str, payload: bytes, device_id: str, max_bytes: int) -> Reading:
    """Validate one sensor message; ReadingError explains a refusal."""
    prefix = f"sensors/{device_id}/"
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        raise ReadingError(f"topic {topic!r} is not {prefix}<sensor>")
    if len(payload) > max_bytes:
        raise ReadingError(f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        data = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constants, parse_float=_finite)
    except UnicodeDecodeError:
        raise ReadingError("the payload is not UTF-8 text") from None
    except RecursionError:
        raise ReadingError(f"the payload nests deeper than {MAX_DEPTH} levels") from None
    except ReadingError:  # a non-finite number, from the hooks above
        raise
    except json.JSONDecodeError as e:
        raise ReadingError(f"the payload is not JSON: {e}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ReadingError("the payload holds an integer of too many digits") from None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        data = {"value": data}
    if not isinstance(data, dict) or not data:
        raise ReadingError(f"a reading is a non-empty JSON object or a number, not {type(data).__name__}")
    _check_tree(data)
    return Reading(topic[len(prefix) :], data)


def _check_tree(data: Any) -> None:
    """ReadingError where the parsed JSON nests deeper than MAX_DEPTH or holds text that is not UTF-8 encodable."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise ReadingError(f"the payload nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key in node:
                _check_text(key)
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ReadingError(f"the payload's text holds {text[e.start:e.end]!r}, not a Unicode character") from None


class ReadingRate:
    """Readings per second (bursts of as many; 0 = no limit), on paho's thread. Over the rate a reading is dropped
    unread and counted (``dropped``); a dead letter tells how many at most once a second (``notice``), so a flood
    costs the broker no more than the rate does."""

    def __init__(self, per_s: int, clock=time.monotonic):
        self.per_s, self.clock = per_s, clock
        self.buckets = RateBuckets(per_s, clock, period_s=1.0)
        self.dropped = 0  # readings dropped over the rate since the start
        self._unreported, self._reported_at = 0, -math.inf

    def admit(self) -> bool:
        """Whether to take a reading now; False: it is dropped (counted)."""
        if self.buckets.take("readings") <= 0:
            return True
        self.dropped += 1
        self._unreported += 1
        return False

    def notice(self) -> str | None:
        """The error of a dead letter about the readings dropped since the last one, if one is due (once a second)."""
        now = self.clock()
        if now - self._reported_at < 1.0:
            return None
        n, self._unreported, self._reported_at = self._unreported, 0, now
        return (f"over max_readings_per_s, {self.per_s} readings per second: {n} reading(s) dropped since the last "
                f"notice, {self.dropped} in all")


def dead_letter(device_id: str, topic: str, payload: bytes, error: str) -> dict[str, Any]:
    """The JSON published on ``results/{device_id}/errors`` about a sensor message that was refused."""
    return {
        "device_id": device_id,
        "topic": topic,
        "error": error,
        "payload_bytes": len(payload),
        "payload_head": bytes(payload[:HEAD_BYTES]).decode("utf-8", "replace"),
        "ts": time.time(),
    }


def render_readings(readings: list[Reading]) -> str:
    """The readings one per line, oldest first."""
    return "\n".join(r.line() for r in readings)


def render_prompt(template: str, device_id: str, readings: list[Reading]) -> str:
    """The user prompt: ``template`` with {device_id} and {readings} filled in."""
    return template.format(device_id=device_id, readings=render_readings(readings))


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def prompt_token_ids(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            chat_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return list(tokenizer(text)["input_ids"])
