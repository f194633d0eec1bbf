"""Whitespace in constrained JSON: compact by default (one spelling, `{"a": 1, "b": [2]}`), free
but bounded with the engine setting `structured_outputs_any_whitespace`, for every JSON source
(response_format, strict and forced tool calls) and through the engine's compiler."""

from __future__ import annotations

import argparse
import json

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from ernie_cluster.cli.model_args import add_model_args, model_values
from ernie_cluster.config.engine_config import EngineConfig, EngineSettings
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.structured_output.compiler import CompileLimits, GrammarCompiler
from ernie_cluster.structured_output.formats import (
    forced_tool_calls,
    in_response,
    json_schema_format,
    optional_tool_calls,
    structural_tag_format,
    tool_call_tag,
)
from ernie_cluster.structured_output.json_whitespace import (
    MAX_JSON_WHITESPACE,
    with_json_whitespace,
)
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import load_tokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string"},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}
VALUE = {"location": "São Paulo", "unit": "c", "days": [1, 2]}
COMPACT = json.dumps(VALUE, ensure_ascii=False)  # {"location": "São Paulo", ..., "days": [1, 2]}
SPACED = [
    json.dumps(VALUE, ensure_ascii=False, indent=2),
    json.dumps(VALUE, ensure_ascii=False, separators=(",", ":")),
    "{          " + COMPACT[1:],
    COMPACT.replace(", ", " ,  "),
]


def grammar(fmt, any_whitespace: bool) -> xgrammar.Grammar:
    tag = with_json_whitespace(GrammarSpec.from_format(fmt).structural_tag, any_whitespace)
    return xgrammar.Grammar.from_structural_tag(tag)


def test_default_is_compact_and_the_option_allows_bounded_whitespace():
    fmt = json_schema_format(WEATHER, "response_format.json_schema.schema")
    compact, free = grammar(fmt, False), grammar(fmt, True)
    assert accepts(compact, COMPACT)
    assert accepts(free, COMPACT)
    for text in SPACED:
        assert not accepts(compact, text), text
        assert accepts(free, text), text
    run = " " * MAX_JSON_WHITESPACE
    assert accepts(free, "{" + run + COMPACT[1:])
    assert not accepts(free, "{" + run + " " + COMPACT[1:])


def test_json_object_and_every_tool_call_form_are_compact():
    objects = in_response(json_schema_format({"type": "object"}, "response_format"))
    assert accepts(
        grammar(objects, False), '\n\n<response>\n{"a": [1, {"b": null}]}\n</response>\n'
    )
    assert not accepts(grammar(objects, False), '\n\n<response>\n{ "a": 1}\n</response>\n')
    tag = tool_call_tag("get_weather", WEATHER, "tools[0].function.parameters")

    def call(arguments: str) -> str:
        return f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>\n'

    forms = {
        "required": forced_tool_calls([tag], after_reasoning=True, parallel=True),
        "strict auto": optional_tool_calls([tag]),
    }
    prefix = {"required": "\n\n\n", "strict auto": "Let me check.\n"}
    for name, fmt in forms.items():
        for any_whitespace, spaced_ok in ((False, False), (True, True)):
            g = grammar(fmt, any_whitespace)
            assert accepts(g, prefix[name] + call(COMPACT)), name
            assert accepts(g, prefix[name] + call(SPACED[0])) is spaced_ok, name


def test_a_users_own_structural_tag_settings_are_kept():
    fmt = structural_tag_format(
        {"format": {"type": "json_schema", "json_schema": WEATHER, "max_whitespace_cnt": 4}},
        "structured_outputs.structural_tag",
    )
    g = grammar(fmt, False)
    assert accepts(g, SPACED[2].replace("{          ", "{    "))
    assert not accepts(g, SPACED[2])


def test_the_setting_reaches_the_compiler(tiny_checkpoint):
    parser = argparse.ArgumentParser()
    add_model_args(parser, EngineSettings, "engine")
    flag = parser.parse_args(["--structured-outputs-any-whitespace"])
    assert model_values(flag, EngineSettings)["structured_outputs_any_whitespace"] is True
    assert EngineConfig(model="m").structured_outputs_any_whitespace is False
    spec = GrammarSpec.from_format(json_schema_format(WEATHER, "p"))
    tokenizer = load_tokenizer(tiny_checkpoint)
    vocab_size = ErnieMoeConfig.from_pretrained(tiny_checkpoint).vocab_size
    for any_whitespace in (False, True):
        config = EngineConfig(model="m", structured_outputs_any_whitespace=any_whitespace)
        limits = CompileLimits.from_config(config)
        assert limits.json_any_whitespace is any_whitespace
        compiler = GrammarCompiler(tokenizer, vocab_size, [2], limits)
        try:
            compiled = compiler.submit(spec).future.result(timeout=60)
        finally:
            compiler.shutdown()
        for text, expected in ((COMPACT, True), (SPACED[0], any_whitespace)):
            matcher = xgrammar.GrammarMatcher(compiled)
            assert (matcher.accept_string(text) and matcher.accept_token(2)) is expected


@pytest.mark.parametrize("schema", [True, {"type": "array", "items": {"type": "string"}}])
def test_schemas_other_than_objects_are_compact_too(schema):
    compact, free = (
        grammar(json_schema_format(schema, "p"), False),
        grammar(json_schema_format(schema, "p"), True),
    )
    assert accepts(compact, '["ab", "c"]') and accepts(free, '["ab", "c"]')
    assert not accepts(compact, '["ab",  "c"]') and accepts(free, '["ab",  "c"]')
