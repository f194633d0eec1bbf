"""From OpenAI / vLLM request fields to one output constraint (an xgrammar format).

Sources, at most one per request: `response_format`, `structured_outputs`, and vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. Chat adds tool calls:
`tool_choice` "required" or a named function makes the answer one or more `<tool_call>`
blocks; with "auto", strict tools constrain any call the model opens. Every error names the
request field it came from.
"""

from __future__ import annotations

from typing import Any

from ernie_cluster.inputs.errors import InputError
from ernie_cluster.serving.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    SamplingFields,
)
from ernie_cluster.structured_output.formats import (
    choice_format,
    forced_tool_calls,
    grammar_format,
    in_response,
    json_schema_format,
    optional_tool_calls,
    regex_format,
    structural_tag_format,
    tool_call_tag,
)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def request_constraint(request: SamplingFields) -> dict[str, Any] | None:
    """The format asked for by the request's own fields (tools aside); None: unconstrained."""
    found: list[tuple[str, dict[str, Any]]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", json_schema_format(_ANY_OBJECT, "response_format")))
        else:
            spec = response_format.json_schema
            param = "response_format.json_schema.schema"
            if spec is None or spec.schema_ is None:
                raise InputError(
                    "response_format of type json_schema needs json_schema.schema", param=param
                )
            found.append(("response_format", json_schema_format(spec.schema_, param)))
    if request.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(request.structured_outputs)))
    guided = (
        ("guided_json", request.guided_json, json_schema_format),
        ("guided_regex", request.guided_regex, regex_format),
        ("guided_choice", request.guided_choice, choice_format),
        ("guided_grammar", request.guided_grammar, grammar_format),
    )
    for name, value, build in guided:
        if value is not None:
            found.append((name, build(value, name)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InputError(f"give one output constraint, not several ({names})", param=found[1][0])
    return found[0][1] if found else None


def _structured_outputs(field) -> dict[str, Any]:
    chosen = [
        (name, value)
        for name, value in (
            ("json", field.json_),
            ("regex", field.regex),
            ("choice", field.choice),
            ("grammar", field.grammar),
            ("json_object", field.json_object or None),
            ("structural_tag", field.structural_tag),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise InputError(
            "structured_outputs must set exactly one of json, regex, choice, grammar, "
            f"json_object, structural_tag; got {[name for name, _ in chosen] or 'none'}",
            param="structured_outputs",
        )
    name, value = chosen[0]
    param = f"structured_outputs.{name}"
    if name == "json":
        return json_schema_format(value, param)
    if name == "json_object":
        return json_schema_format(_ANY_OBJECT, param)
    if name == "regex":
        return regex_format(value, param)
    if name == "choice":
        return choice_format(value, param)
    if name == "grammar":
        return grammar_format(value, param)
    return structural_tag_format(value, param)


def chat_constraint(request: ChatCompletionRequest, after_reasoning: bool) -> dict[str, Any] | None:
    """The whole constraint of a chat request, laid out as an ERNIE answer when it starts
    after the reasoning (`after_reasoning`): inside `<response>` or as `<tool_call>` blocks."""
    answer = request_constraint(request)
    if answer is not None and after_reasoning:
        answer = in_response(answer)
    tools = request.tools or []
    choice = request.tool_choice or ("auto" if tools else "none")
    if choice == "none" or not tools:
        return answer
    parallel = request.parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        index = next(i for i, t in enumerate(tools) if t.function.name == choice.function.name)
        return forced_tool_calls([_tag(request, index, True)], after_reasoning, parallel)
    if choice == "required":
        tags = [_tag(request, i, True) for i in range(len(tools))]
        return forced_tool_calls(tags, after_reasoning, parallel)
    strict = any(t.function.strict for t in tools)
    if answer is None and not strict:
        return None
    tags = [_tag(request, i, bool(tools[i].function.strict)) for i in range(len(tools))]
    if answer is None:
        return optional_tool_calls(tags)
    calls = forced_tool_calls(tags, after_reasoning, parallel)
    return {"type": "or", "elements": [answer, calls]}


def _tag(request: ChatCompletionRequest, index: int, enforce_schema: bool) -> dict[str, Any]:
    function = request.tools[index].function  # type: ignore[index]
    schema = function.parameters if enforce_schema and function.parameters else _ANY_OBJECT
    return tool_call_tag(function.name, schema, f"tools[{index}].function.parameters")
