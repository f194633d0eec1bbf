"""Constraint specs: what is refused (with the field named), what is rewritten, and that the
ERNIE layout and tool-call formats accept exactly the text the parsers read."""

from __future__ import annotations

import json

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from ernie_cluster.sampling_params import StructuredOutputsParams
from ernie_cluster.serving.parsers import ErnieX1Parser
from ernie_cluster.structured_output.formats import (
    MAX_SCHEMA_DEPTH,
    FormatError,
    choice_format,
    forced_tool_calls,
    grammar_format,
    in_response,
    json_schema_format,
    optional_tool_calls,
    params_format,
    regex_format,
    structural_tag_format,
    tool_call_tag,
)
from ernie_cluster.structured_output.params import GrammarSpec


def grammar(fmt) -> xgrammar.Grammar:
    return xgrammar.Grammar.from_structural_tag(GrammarSpec.from_format(fmt).structural_tag)


@pytest.mark.parametrize(
    ("build", "value", "message"),
    [
        (json_schema_format, {"type": "foo"}, "not a valid JSON schema"),
        (json_schema_format, "{not json", "not valid JSON"),
        (json_schema_format, {"not": {"type": "string"}}, "keyword 'not'"),
        (json_schema_format, {"type": "array", "uniqueItems": True}, "keyword 'uniqueItems'"),
        (json_schema_format, {"$ref": "#/$defs/missing"}, "not supported"),
        (json_schema_format, [1, 2], "must be a JSON schema object"),
        (regex_format, "[a-", "not supported: Regex parsing error"),
        (regex_format, "", "non-empty regular expression"),
        (choice_format, [], "non-empty list"),
        (choice_format, ["a", 3], "non-empty list of non-empty strings"),
        (grammar_format, 'root ::= "a" | ', "EBNF parser error"),
        (grammar_format, 'x ::= "a"', 'root rule with name "root" is not found'),
        (structural_tag_format, {"format": {"type": "nope"}}, "not supported"),
    ],
)
def test_bad_specs_name_the_field(build, value, message):
    with pytest.raises(FormatError, match=message) as info:
        build(value, "guided_thing")
    assert info.value.param == "guided_thing"
    assert "/project/cpp" not in str(info.value)  # xgrammar's source location is stripped


def test_deep_schema_is_refused_without_recursion_error():
    schema: dict = {"type": "integer"}
    for _ in range(900):
        schema = {"type": "array", "items": schema}
    with pytest.raises(FormatError, match=f"deeper than {MAX_SCHEMA_DEPTH}"):
        json_schema_format(schema, "response_format.json_schema.schema")


def test_length_bounded_strings_stay_valid_json():
    fmt = json_schema_format({"type": "string", "minLength": 2, "maxLength": 4}, "p")
    assert "maxLength" not in fmt["json_schema"]
    g = grammar(fmt)
    assert accepts(g, '"abc"') and not accepts(g, '"abcde"') and not accepts(g, '"a"')
    # Raw control characters (here a tab and 0x1c) are not valid inside JSON strings.
    assert not accepts(g, '"a\tb"') and not accepts(g, '"a\x1cb"')


def test_params_format_kinds():
    assert accepts(grammar(params_format(StructuredOutputsParams(choice=["yes", "no"]), "s")), "no")
    assert accepts(grammar(params_format(StructuredOutputsParams(regex=r"\d{3}"), "s")), "123")
    ebnf = 'root ::= "a" root | "b"'
    assert accepts(grammar(params_format(StructuredOutputsParams(grammar=ebnf), "s")), "aab")
    g = grammar(params_format(StructuredOutputsParams(json_object=True), "s"))
    assert accepts(g, '{"a": [1]}') and not accepts(g, "[1]")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])


def test_equal_specs_share_one_key():
    a = GrammarSpec.from_format(json_schema_format({"type": "integer", "minimum": 1}, "p"))
    b = GrammarSpec.from_format(json_schema_format({"minimum": 1, "type": "integer"}, "p"))
    assert a == b and hash(a) == hash(b)


WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["location"],
}


def test_ernie_layout_is_what_the_parser_reads():
    answer = '{"a": 1}'
    text = f"thinking\n</think>\n\n<response>\n{answer}\n</response>\n"
    g = grammar(in_response(json_schema_format({"type": "object"}, "p")))
    assert accepts(g, text.split("</think>", 1)[1])
    parsed = ErnieX1Parser().parse(text)
    assert json.loads(parsed.content) == {"a": 1}


def test_forced_tool_calls_accept_only_valid_calls():
    tag = tool_call_tag("get_weather", WEATHER, "tools[0].function.parameters")
    g = grammar(forced_tool_calls([tag], after_reasoning=True, parallel=True))
    call = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
    )
    assert accepts(g, "\n\n\n" + call) and accepts(g, "\n\n\n" + call + call)
    assert not accepts(g, "\n\n\n")  # at least one call
    assert not accepts(g, "\n\n\n" + call.replace('"location"', '"city"'))
    parsed = ErnieX1Parser().parse("r\n</think>\n\n\n" + call)
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    single = grammar(forced_tool_calls([tag], after_reasoning=False, parallel=False))
    assert accepts(single, call) and not accepts(single, call + call)


def test_optional_tool_calls_leave_text_free():
    tag = tool_call_tag("get_weather", WEATHER, "p")
    g = grammar(optional_tool_calls([tag]))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Rome"}}\n</tool_call>\n'
    assert accepts(g, "any text at all")
    assert accepts(g, "let me look " + call + "done")
    assert not accepts(g, '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>\n')


def test_unique_items_false_asks_for_nothing_and_is_accepted():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": False}
    assert json_schema_format(schema, "response_format")
