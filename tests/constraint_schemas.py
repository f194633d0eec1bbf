"""Twenty-two varied JSON schemas for constrained-generation tests (each covers a feature the
acceptance names: nesting, array bounds, enums, required/optional, number bounds, patterns,
formats, anyOf, $defs/$ref). Strings are bounded where a random model would otherwise write
for hundreds of tokens."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 12}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": NAME, "id": {"type": "integer"}},
                "required": ["name", "id"],
            }
        },
        "required": ["user"],
    },
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "city": NAME,
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "note": NAME,
        },
        "required": ["city"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "score": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
        },
        "required": ["ratio", "score"],
    },
    "pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    "format_date": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
    },
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "any_of": {"anyOf": [{"type": "integer"}, {"type": "boolean"}, NAME]},
    "defs_ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "boolean": {"type": "boolean"},
    "nullable": {
        "type": "object",
        "properties": {"value": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["value"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "tag": NAME},
            "required": ["id"],
        },
        "maxItems": 3,
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "name": NAME},
        "required": ["version", "name"],
    },
    "one_of": {
        "oneOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
            {
                "type": "object",
                "properties": {"kind": {"const": "b"}, "n": {"type": "integer"}},
                "required": ["kind", "n"],
            },
        ]
    },
    "nested_arrays": {
        "type": "array",
        "maxItems": 3,
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "closed_object": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": NAME},
        "additionalProperties": False,
    },
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 8},
    "enum_items": {"type": "array", "items": {"enum": [1, 2, 3, 4]}, "maxItems": 4},
    "tool_arguments": {
        "type": "object",
        "properties": {"location": NAME, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["location"],
    },
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "array", "items": NAME, "maxItems": 2}},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
}
