"""Decoding the body of one `<tool_call>` block into a function name and a JSON arguments string.

Owns what counts as a well-formed call, what is left of a call cut off before its end, and how
call ids look. It never raises on model output: a body that does not decode is reported as
None and its caller keeps the raw text as content.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

# The start of a call as the ERNIE format writes it: its name, then the arguments' key.
_CALL_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.)*")')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*')


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


def find_call_end(body: str, close_tag: str, start: int = 0) -> int:
    """Where `close_tag` ends a call body (-1: not yet): its first occurrence from `start`
    that is not inside a JSON string of a body that is a JSON object.

    NOTE: a grammar lets a string argument hold the text `</tool_call>` (a random or weak
    model writes it); the call does not end there.
    """
    end = body.find(close_tag, start)
    if end < 0 or not body.lstrip().startswith("{"):
        return end
    in_string, escaped, checked = False, False, 0
    while end >= 0:
        for char in body[checked:end]:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = in_string
            elif char == '"':
                in_string = not in_string
        checked = end
        if not in_string:
            return end
        end = body.find(close_tag, end + 1)
    return -1


def decode_cut_tool_call(body: str) -> tuple[str | None, str] | None:
    """What a call cut off before `</tool_call>` (by max_tokens) holds, as OpenAI reports it:
    (name, arguments as far as generated); a body whose JSON is whole decodes as a call.

    A call cut before its `"arguments"` began has arguments ""; (None, "") when it was cut
    before its name was whole (nothing to report); None when the body is not the start of a
    call object at all (its caller keeps it as content).
    """
    whole = decode_tool_call(body)
    if whole is not None:
        return whole
    if not body.lstrip().startswith("{"):
        return None
    head = _CALL_NAME.match(body)
    if head is None:
        return None, ""
    name = _loads(head.group(1))
    if not isinstance(name, str) or not name:
        return None
    key = _ARGUMENTS_KEY.match(body, head.end())
    return name, body[key.end() :] if key is not None else ""
