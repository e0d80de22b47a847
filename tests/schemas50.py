"""Fifty varied JSON schemas for the structured-output acceptance suite (``schemas()``).

They cover what clients send as ``response_format``: flat and nested objects, arrays with and without
``minItems``/``maxItems``, enums and consts, integers and numbers with bounds, booleans, required and
optional fields, strings bounded by ``maxLength``, ``enum`` or ``pattern``, ``anyOf`` and ``$ref``. A few
have unbounded strings or open objects (``UNBOUNDED``): a generation under them may run out of
``max_tokens`` (so may a ``number``, whose fraction digits are unbounded), which the suite counts apart
(finish "length"), never as valid.
"""

from __future__ import annotations

import copy


def _obj(properties: dict, required=None, closed: bool = True) -> dict:
    """An object schema: every property required unless ``required`` names some; no others unless open."""
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else list(required)}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _s(max_length: int = 12, **more) -> dict:
    return {"type": "string", "maxLength": max_length, **more}


def _int(lo: int | None = None, hi: int | None = None) -> dict:
    out: dict = {"type": "integer"}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def _num(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _enum(*values) -> dict:
    return {"enum": list(values)}


BOOL = {"type": "boolean"}
FREE = {"type": "string"}  # an unbounded string

_SCHEMAS: list[tuple[str, dict]] = [
    ("flag", _obj({"ok": BOOL})),
    ("count", _obj({"count": _int(0, 100)})),
    ("negative_range", _obj({"delta": _int(-50, -1)})),
    ("temperature", _obj({"celsius": _num(-40, 60)})),
    ("probability", _obj({"p": _num(0, 1)})),
    ("color_enum", _obj({"color": _enum("red", "green", "blue")})),
    ("mixed_enum", _obj({"level": _enum(1, 2, 3, "max", None)})),
    ("const", _obj({"version": {"const": "v1"}, "ok": BOOL})),
    ("short_name", _obj({"name": _s(10)})),
    ("person", _obj({"name": _s(16), "age": _int(0, 120), "student": BOOL})),
    ("optional_age", _obj({"name": _s(12), "age": _int(0, 120)}, required=["name"])),
    ("all_optional", _obj({"a": _int(0, 9), "b": BOOL}, required=[])),
    ("point", _obj({"x": _num(-10, 10), "y": _num(-10, 10)})),
    ("rgb", _obj({"r": _int(0, 255), "g": _int(0, 255), "b": _int(0, 255)})),
    ("zip_pattern", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("code_pattern", _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("hex_pattern", _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("date_pattern", _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
    ("tags", _obj({"tags": {"type": "array", "items": _s(8), "minItems": 1, "maxItems": 3}})),
    ("scores", _obj({"scores": {"type": "array", "items": _int(0, 10), "minItems": 2, "maxItems": 4}})),
    ("flags_array", _obj({"flags": {"type": "array", "items": BOOL, "maxItems": 5}})),
    ("enum_array", _obj({"days": {"type": "array", "items": _enum("mon", "tue", "wed"), "minItems": 1,
                                  "maxItems": 3}})),
    ("top_level_array", {"type": "array", "items": _int(0, 99), "minItems": 1, "maxItems": 4}),
    ("top_level_enum", _enum("yes", "no", "maybe")),
    ("top_level_int", _int(1, 1000)),
    ("nested_address", _obj({"name": _s(12), "address": _obj({"city": _s(12), "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("nested_three", _obj({"a": _obj({"b": _obj({"c": _int(0, 5)})})})),
    ("nested_optional", _obj({"id": _int(1, 999), "meta": _obj({"note": _s(10), "pinned": BOOL},
                                                               required=["pinned"])}, required=["id"])),
    ("array_of_objects", _obj({"items": {"type": "array", "minItems": 1, "maxItems": 2,
                                         "items": _obj({"sku": _s(6), "qty": _int(1, 9)})}})),
    ("matrix", _obj({"rows": {"type": "array", "minItems": 1, "maxItems": 2,
                              "items": {"type": "array", "items": _int(0, 9), "minItems": 2, "maxItems": 2}}})),
    ("order", _obj({"id": _int(1, 10000), "status": _enum("new", "paid", "shipped"),
                    "total": _num(0, 1000), "express": BOOL})),
    ("event", _obj({"title": _s(20), "day": _enum("sat", "sun"), "hour": _int(0, 23)})),
    ("weather", _obj({"city": _s(12), "sky": _enum("sunny", "cloudy", "rain"), "wind_kmh": _int(0, 150)})),
    ("sensor_reading", _obj({"sensor": _enum("temp", "humidity"), "value": _num(-100, 100),
                             "unit": _enum("C", "%")})),
    ("book", _obj({"title": _s(24), "year": _int(1800, 2025), "isbn": {"type": "string",
                                                                       "pattern": "^[0-9]{10}$"}})),
    ("any_of", _obj({"value": {"anyOf": [_int(0, 9), BOOL]}})),
    ("nullable", _obj({"nickname": {"anyOf": [_s(8), {"type": "null"}]}})),
    ("ref_defs", {"$defs": {"pt": _obj({"x": _int(0, 9), "y": _int(0, 9)})},
                  **_obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})}),
    ("open_object", _obj({"name": _s(8)}, closed=False)),
    ("exclusive_bounds", _obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}})),
    ("min_length", _obj({"word": {"type": "string", "minLength": 3, "maxLength": 6}})),
    ("triple_enum", _obj({"size": _enum("S", "M", "L"), "fit": _enum("slim", "regular"),
                          "sleeve": _enum("short", "long")})),
    ("inventory", _obj({"warehouse": _s(8), "bins": {"type": "array", "maxItems": 2, "items": _obj(
        {"bin": _int(1, 99), "empty": BOOL})}})),
    ("json_object_any", {"type": "object"}),
    # unbounded strings (UNBOUNDED): these may run out of max_tokens
    ("free_text", _obj({"answer": FREE})),
    ("free_optional", _obj({"title": FREE, "done": BOOL}, required=["done"])),
    ("free_nested", _obj({"user": _obj({"bio": FREE, "age": _int(0, 120)})})),
    ("free_array", _obj({"lines": {"type": "array", "items": FREE, "minItems": 1, "maxItems": 2}})),
    ("free_with_enum", _obj({"mood": _enum("happy", "sad"), "reason": FREE})),
    ("free_top_level", FREE),
]

UNBOUNDED = frozenset({"free_text", "free_optional", "free_nested", "free_array", "free_with_enum",
                       "free_top_level", "json_object_any", "open_object"})


def schemas() -> list[tuple[str, dict]]:
    """The fifty (name, schema) pairs, in a fixed order (fresh copies)."""
    return copy.deepcopy(_SCHEMAS)

