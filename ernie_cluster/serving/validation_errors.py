"""One OpenAI-style 400 for a request FastAPI could not read or validate: pydantic's error
list and FastAPI's bare body-parse error turned into a message and `param` a client can act on
(the JSON itself, the Content-Type, a non-text content part, unknown arguments, the first
remaining error)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernie_cluster.serving.errors import BadRequestError

CONTENT_PART_PARAM_HINT = "this model takes text only"
JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _body_path(error: dict, body: Any) -> list[str | int]:
    """Where a validation error sits in the request body. Pydantic's locations also name the
    union member that was tried ('str', 'list[TextPart]'...); only steps the body has are
    kept, plus the name of a missing field."""
    loc = tuple(error.get("loc", ()))
    steps = loc[1:] if loc[:1] == ("body",) else loc
    path: list[str | int] = []
    node = body
    for index, step in enumerate(steps):
        in_dict = isinstance(node, dict) and isinstance(step, str) and step in node
        in_list = isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        if in_dict or in_list:
            node = node[step]
        elif error.get("type") == "missing" and index == len(steps) - 1:
            node = None
        else:
            continue
        path.append(step)
    return path


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(step) for step in path)


def _non_text_part(body: Any, errors: list[dict]) -> tuple[str, str] | None:
    """(param, part type) of a non-text content part that failed validation, if any."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    for error in errors:
        path = _body_path(error, body)
        if len(path) < 3 or path[0] != "messages" or path[2] != "content":
            continue
        message = body["messages"][path[1]] if isinstance(path[1], int) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                return f"messages.{path[1]}.content.{index}", kind
    return None


def _content_type_problem(request: Request) -> str | None:
    value = request.headers.get("content-type")
    if not value:
        return "the request has no Content-Type header: send the JSON body with 'Content-Type: application/json'"
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        return f"Content-Type {value!r} is not JSON: send the body with 'Content-Type: application/json'"
    return None


def body_parse_problem(exc: StarletteHTTPException) -> str | None:
    """What FastAPI's bare "error parsing the body" (a 400 it raises from the exception that
    stopped the JSON decoder) was about, or None for any other HTTP error."""
    if exc.status_code != 400 or exc.__cause__ is None:
        return None
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not UTF-8 (byte {cause.start}): send JSON in UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to parse"
    return f"the request body could not be parsed as JSON ({type(cause).__name__})"


def validation_error(exc: RequestValidationError, request: Request) -> BadRequestError:
    """One OpenAI-style 400 for a request FastAPI could not validate, in the order a client
    fixes things: the JSON itself, the Content-Type, a non-text content part, unknown
    arguments, then the first remaining error."""
    errors = list(exc.errors())
    body = getattr(exc, "body", None)
    for error in errors:
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", None))[-1]
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            where = f" at character {position}" if isinstance(position, int) else ""
            return BadRequestError(f"the request body is not valid JSON: {reason}{where}")
    if any(tuple(error.get("loc", ())) == ("body",) for error in errors):
        problem = _content_type_problem(request)
        if problem is not None:
            return BadRequestError(problem)
        if body in (None, b"", ""):
            return BadRequestError("the request body is empty: send a JSON object")
        if not isinstance(body, dict):
            kind = JSON_KINDS.get(type(body), type(body).__name__)
            return BadRequestError(f"the request body must be a JSON object, not {kind}")
    part = _non_text_part(body, errors)
    if part is not None:
        param, kind = part
        return BadRequestError(
            f"{param}: {CONTENT_PART_PARAM_HINT}; content parts of type {kind!r} are not "
            "supported (send text, or text parts)",
            param=param,
        )
    unknown = [
        _dotted(_body_path(error, body))
        for error in errors
        if error.get("type") == "extra_forbidden"
    ]
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        return BadRequestError(
            f"Unrecognized request {noun} supplied: {', '.join(unknown)}", param=unknown[0]
        )
    first = errors[0] if errors else {}
    param = _dotted(_body_path(first, body))
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return BadRequestError(message, param=param or None)
