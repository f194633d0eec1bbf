"""Decoding the body of one `<tool_call>` block into a function name and a JSON arguments string.

Owns what counts as a well-formed call and how call ids look. It never raises on model output:
a body that does not decode is reported as None and its caller keeps the raw text as content.
"""

from __future__ import annotations

import json
import secrets
from typing import Any


def new_tool_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 random hex characters."""
    return f"call_{secrets.token_hex(12)}"


def decode_tool_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) for a body `{"name": ..., "arguments": {...}}`, or None.

    `arguments` may also be a JSON string holding the object; a missing or null one means no
    arguments. The string is re-serialized so every call has the same JSON spelling.
    """
    call = _loads(body)
    if not isinstance(call, dict):
        return None
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = call.get("arguments")
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _loads(text: str) -> Any:
    # NOTE: RecursionError is what json raises on absurdly deep nesting; model output can be
    # anything, so it is treated like any other undecodable body.
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
