"""Constraints as xgrammar structural-tag formats, validated, and the ERNIE output layout.

Turns a `StructuredOutputsParams` into a format dict and checks it before anything reaches the
engine (an unsupported schema keyword or a bad regex is a `FormatError` naming the field).
Also owns how ERNIE-4.5 Thinking lays out an answer after `</think>`, so a constraint can start
there: `\\n\\n<response>\\n{answer}\\n</response>\\n`, or tool calls
`\\n\\n\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>\\n`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ernie_cluster.sampling_params import StructuredOutputsParams

RESPONSE_PREFIX = "\n\n<response>\n"
RESPONSE_SUFFIX = "\n</response>\n"
TOOL_CALLS_PREFIX = "\n\n\n"
TOOL_CALL_TRIGGER = "<tool_call>"

MAX_SCHEMA_DEPTH = 64
_SAFE_STRING = r'^[^\x00-\x1f"\\]{{{},{}}}$'
# xgrammar accepts these schema keywords without enforcing them, so an output could break the
# schema; they are refused instead (`uniqueItems` only when true: false asks for nothing).
_UNENFORCED_KEYWORDS = {"not": None, "uniqueItems": True}
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class FormatError(ValueError):
    """A constraint that cannot be used; `param` names the request field at fault (read into
    the OpenAI error body as an `inputs.errors.InputError`'s is)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _clean(exc: BaseException) -> str:
    """xgrammar's message without its time stamp and C++ source location."""
    return _XGRAMMAR_LOCATION.sub("", str(exc).strip()).strip()


def json_schema_format(schema: Any, param: str) -> dict[str, Any]:
    """A JSON-schema format; `schema` is a dict or its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, dict | bool):
        raise FormatError(
            f"{param} must be a JSON schema object, got {type(schema).__name__}", param=param
        )
    if isinstance(schema, dict):
        _check_depth(schema, param)
        _check_schema(schema, param)
        schema = _with_safe_string_lengths(schema)
    # NOTE: no whitespace setting here: the engine's compiler gives every plain json_schema
    # format its rule (compact by default; structured_output.json_whitespace).
    fmt = {"type": "json_schema", "json_schema": schema}
    _check_format(fmt, param)
    return fmt


def _check_schema(schema: dict[str, Any], param: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise FormatError(
            f"{param} is not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}",
            param=param,
        ) from exc
    for path, keyword, value in _keywords(schema, ""):
        if keyword == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise FormatError(
                f"{param} has a $ref to {value!r} at {path or '/'}: only references inside the "
                "schema ('#/$defs/...') are followed; inline the referenced schema",
                param=param,
            )
        if keyword in _UNENFORCED_KEYWORDS and _UNENFORCED_KEYWORDS[keyword] in (None, value):
            raise FormatError(
                f"{param} uses the keyword {keyword!r} at {path or '/'}, which structured "
                "outputs cannot enforce; rewrite the schema without it",
                param=param,
            )


def _check_depth(node: Any, param: str) -> None:
    """Refuse schemas nested deeper than MAX_SCHEMA_DEPTH (counted without recursion, so a
    hostile 1000-deep schema is a 400, not a RecursionError)."""
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise FormatError(
                f"{param} is nested deeper than {MAX_SCHEMA_DEPTH} levels", param=param
            )
        children = current.values() if isinstance(current, dict) else current
        if isinstance(current, dict | list):
            stack.extend((child, depth + 1) for child in children)


def _with_safe_string_lengths(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` whose length-bounded strings also exclude control characters.

    NOTE: xgrammar 0.2.9 turns minLength/maxLength into any-character runs that let raw
    control characters (a tab, a 0x1c byte token) into the string, which is not valid JSON;
    the same bounds as a pattern keep the string valid.
    """
    copy = json.loads(json.dumps(schema))
    for node in dict_nodes(copy, lambda n: [v for k, v in n.items() if k not in _VALUE_KEYS]):
        bounded = "minLength" in node or "maxLength" in node
        if bounded and node.get("type") == "string" and not {"pattern", "format"} & set(node):
            low = int(node.pop("minLength", 0))
            high = node.pop("maxLength", None)
            node["pattern"] = _SAFE_STRING.format(low, "" if high is None else int(high))
    return copy


_VALUE_KEYS = ("enum", "const", "default")


def dict_nodes(root: Any, children: Callable[[dict], Iterable[Any]]) -> Iterator[dict]:
    """Every dict in the JSON tree `root` (lists are walked through), descending into
    `children(node)`, computed after the caller has seen (and possibly changed) the node.
    Iterative: schemas and structural tags come from users and may nest deeply."""
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(children(node))


def _keywords(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path, keyword, value) of every schema keyword, nested schemas included (iterative:
    schemas come from users and may nest deeply)."""
    stack = [(node, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                if key in ("properties", "$defs", "definitions", "patternProperties"):
                    if isinstance(value, dict):
                        stack.extend((v, f"{where}/{key}/{k}") for k, v in value.items())
                    continue
                if key in ("enum", "const", "required", "examples", "default"):
                    continue
                yield where, key, value
                stack.append((value, f"{where}/{key}"))
        elif isinstance(current, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(current))


def regex_format(pattern: Any, param: str) -> dict[str, Any]:
    if not isinstance(pattern, str) or not pattern:
        raise FormatError(f"{param} must be a non-empty regular expression string", param=param)
    fmt = {"type": "regex", "pattern": pattern}
    _check_format(fmt, param)
    return fmt


def choice_format(choices: Any, param: str) -> dict[str, Any]:
    if (
        not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise FormatError(f"{param} must be a non-empty list of non-empty strings", param=param)
    return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in choices]}


def grammar_format(ebnf: Any, param: str) -> dict[str, Any]:
    if not isinstance(ebnf, str) or not ebnf.strip():
        raise FormatError(f"{param} must be a non-empty EBNF grammar string", param=param)
    fmt = {"type": "grammar", "grammar": ebnf}
    _check_format(fmt, param)
    return fmt


def structural_tag_format(tag: Any, param: str) -> dict[str, Any]:
    """A user's structural tag: xgrammar's `{"type": "structural_tag", "format": ...}`, or the
    older `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(tag, dict):
        raise FormatError(f"{param} must be a JSON object", param=param)
    if "structures" in tag:
        fmt = {
            "type": "triggered_tags",
            "triggers": list(tag.get("triggers") or []),
            "tags": [
                {
                    "type": "tag",
                    "begin": s.get("begin", ""),
                    "content": {"type": "json_schema", "json_schema": s.get("schema", {})},
                    "end": s.get("end", ""),
                }
                for s in tag["structures"]
                if isinstance(s, dict)
            ],
        }
    elif isinstance(tag.get("format"), dict):
        fmt = tag["format"]
    else:
        raise FormatError(f"{param} needs a 'format' (or 'structures') entry", param=param)
    _check_format(fmt, param)
    return fmt


def params_format(params: StructuredOutputsParams, param: str) -> dict[str, Any]:
    """The format of one `StructuredOutputsParams`; `param` names its field in errors."""
    kind = params.kind
    where = f"{param}.{kind}"
    if kind == "json":
        return json_schema_format(params.json, where)
    if kind == "json_object":
        return json_schema_format({"type": "object"}, where)
    if kind == "regex":
        return regex_format(params.regex, where)
    if kind == "choice":
        return choice_format(params.choice, where)
    if kind == "grammar":
        return grammar_format(params.grammar, where)
    return structural_tag_format(params.structural_tag, where)


def _check_format(fmt: dict[str, Any], param: str) -> None:
    """Parse the format as xgrammar will (no tokenizer needed), so errors surface as 400s."""
    # NOTE: imported here, not at the top: xgrammar pulls in torch and transformers, which the
    # HTTP ingress (importing this module for the layout helpers) must not load until a request
    # actually carries a constraint.
    import xgrammar

    tag = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)
    try:
        xgrammar.Grammar.from_structural_tag(tag)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError/pydantic errors
        raise FormatError(f"{param} is not supported: {_clean(exc)}", param=param) from exc


# ---------------------------------------------------------------------------- ERNIE layout
def in_response(fmt: dict[str, Any]) -> dict[str, Any]:
    """`fmt` as the answer of an ERNIE turn after `</think>`: inside `<response>`."""
    return {
        "type": "sequence",
        "elements": [
            {"type": "const_string", "value": RESPONSE_PREFIX},
            fmt,
            {"type": "const_string", "value": RESPONSE_SUFFIX},
        ],
    }


def tool_call_tag(name: str, parameters: dict[str, Any] | None, param: str) -> dict[str, Any]:
    """One `<tool_call>` block calling `name` with arguments matching `parameters`."""
    schema = parameters if parameters else {"type": "object"}
    return {
        "type": "tag",
        "begin": f'{TOOL_CALL_TRIGGER}\n{{"name": {json.dumps(name, ensure_ascii=False)}, '
        '"arguments": ',
        "content": json_schema_format(schema, param),
        "end": "}\n</tool_call>\n",
    }


def forced_tool_calls(tags: list[dict[str, Any]], after_reasoning: bool, parallel: bool):
    """Only tool calls: one (or, with `parallel`, one or more) of `tags`."""
    calls: dict[str, Any] = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    if parallel:
        calls = {"type": "plus", "content": calls}
    if not after_reasoning:
        return calls
    return {
        "type": "sequence",
        "elements": [{"type": "const_string", "value": TOOL_CALLS_PREFIX}, calls],
    }


def optional_tool_calls(tags: list[dict[str, Any]]) -> dict[str, Any]:
    """Free text, but a `<tool_call>` the model opens must be one of `tags`."""
    return {"type": "triggered_tags", "triggers": [TOOL_CALL_TRIGGER], "tags": tags}
