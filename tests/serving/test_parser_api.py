"""ERNIE-4.5 output parser API around the state machine: tool-call bodies, call ids and the
parser registry the server's flags name.
"""

from __future__ import annotations

import re

import pytest
from test_parsers import WEATHER_CALL

from ernie_cluster.serving.parsers import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    ErnieX1Parser,
    make_parser,
)
from ernie_cluster.serving.parsers.tool_call import decode_tool_call


# ------------------------------------------------------------------------------ tool calls
def test_default_ids_are_unique_openai_style() -> None:
    text = f"Twice.\n</think>\n\n{WEATHER_CALL}{WEATHER_CALL}"
    calls = ErnieX1Parser().parse(text).tool_calls
    assert len(calls) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"name": "f", "arguments": {"a": [1, {"b": null}]}}', ("f", '{"a": [1, {"b": null}]}')),
        ('  \n{"name": "f", "arguments": {}}\n\n', ("f", "{}")),
        ('{"name": "f"}', ("f", "{}")),
        ('{"name": "f", "arguments": null}', ("f", "{}")),
        ('{"name": "f", "arguments": ""}', ("f", "{}")),
        ('{"name": "f", "arguments": "{\\"k\\": \\"\\u00e9\\"}"}', ("f", '{"k": "é"}')),
        ('{"name": "f", "arguments": "not json"}', None),
        ('{"name": "f", "arguments": "[1]"}', None),
        ('{"name": "f", "arguments": [1]}', None),
        ('{"name": "", "arguments": {}}', None),
        ('{"name": 3, "arguments": {}}', None),
        ('{"arguments": {}}', None),
        ('["f", {}]', None),
        ('{"name": "f", "arguments": {}} trailing', None),
        ("", None),
        ("[" * 100_000, None),
    ],
)
def test_decode_tool_call(body: str, expected: tuple[str, str] | None) -> None:
    assert decode_tool_call(body) == expected


# ------------------------------------------------------------------------------ registry
def test_registry_names() -> None:
    assert sorted(REASONING_PARSERS) == ["ernie45", "ernie_x1"]
    assert sorted(TOOL_PARSERS) == ["ernie45", "ernie_x1"]


def test_make_parser_switches() -> None:
    assert make_parser(None, None, tools_enabled=True) is None
    both = make_parser("ernie_x1", "ernie45", tools_enabled=True)
    assert both is not None and both.reasoning and both.tools
    no_tools = make_parser("ernie45", "ernie_x1", tools_enabled=False)
    assert no_tools is not None and no_tools.reasoning and not no_tools.tools
    reasoning_only = make_parser("ernie_x1", None, tools_enabled=True)
    assert reasoning_only is not None and not reasoning_only.tools
    tools_only = make_parser(None, "ernie_x1", tools_enabled=True)
    assert tools_only is not None and not tools_only.reasoning and tools_only.tools


def test_make_parser_passes_id_factory() -> None:
    parser = make_parser("ernie_x1", "ernie_x1", tools_enabled=True, id_factory=lambda: "call_x")
    assert parser is not None
    assert [c.id for c in parser.parse(f"T.\n</think>\n{WEATHER_CALL}").tool_calls] == ["call_x"]


@pytest.mark.parametrize(
    ("reasoning_parser", "tool_parser", "message"),
    [
        ("qwen3", None, "unknown reasoning parser 'qwen3'; valid names: ernie45, ernie_x1"),
        (None, "hermes", "unknown tool call parser 'hermes'; valid names: ernie45, ernie_x1"),
    ],
)
def test_make_parser_rejects_unknown_names(reasoning_parser, tool_parser, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_parser(reasoning_parser, tool_parser, tools_enabled=False)
