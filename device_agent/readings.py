"""Sensor readings: validated from MQTT payloads, rendered into the prompt.

A reading arrives on ``sensors/{device_id}/{sensor}`` as a JSON object such as
``{"value": 21.5, "unit": "C", "ts": 1732460000.0}`` or as a bare number.
Anything else (not UTF-8 JSON, too large, not an object or number,
non-finite numbers) is refused with a ``ReadingError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


class ReadingError(ValueError):
    """A sensor payload that is not a valid reading."""


@dataclass(frozen=True)
class Reading:
    sensor: str  # the topic levels after sensors/{device_id}/
    fields: dict[str, Any]  # the JSON object as published (a bare number becomes {"value": n})

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
    except json.JSONDecodeError as e:
        raise ReadingError(f"the payload is not JSON: {e}") from None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        data = {"value": data}
    if not isinstance(data, dict) or not data:
        raise ReadingError(f"a reading is a non-empty JSON object or a number, not {type(data).__name__}")
    return Reading(topic[len(prefix) :], data)


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
