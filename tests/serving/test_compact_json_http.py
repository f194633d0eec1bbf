"""Constrained JSON is compact by default, through HTTP with the official openai client, on the
random tiny checkpoint (a model that writes whatever the grammar lets it): every answer is
the one compact spelling of its value (tool-call forms: tests/structured_output and
test_truncated_tool_calls); with `structured_outputs_any_whitespace` the same
requests come back with free whitespace (so the default is what keeps it out)."""

from __future__ import annotations

import json
import re

import pytest
from http_fixtures import serve_local

MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "maxItems": 3,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["unit", "days", "ok"],
    "additionalProperties": False,
}
# Whitespace outside strings that the compact spelling does not have (json.dumps: ", " ": ").
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def extra_whitespace(text: str) -> bool:
    bare = _STRING.sub('""', text).replace(", ", ",").replace(": ", ":")
    return any(c.isspace() for c in bare)


@pytest.fixture(scope="module", params=[False, True], ids=["default", "any-whitespace"])
def served(request, tiny_checkpoint):
    overrides = {"max_num_seqs": 16, "structured_outputs_any_whitespace": request.param}
    with serve_local(tiny_checkpoint, engine_overrides=overrides) as served:
        yield request.param, served


@pytest.mark.slow  # two engines on the tiny checkpoint, 8 constrained generations each
def test_structured_answers_are_compact_by_default(served):
    any_whitespace, server = served
    with server.openai() as client:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "The weather as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
            n=8,
            seed=1,
            temperature=1.0,
            max_tokens=300,
        )
    texts = [c.message.content for c in response.choices]
    assert [c.finish_reason for c in response.choices] == ["stop"] * 8
    values = [json.loads(text) for text in texts]  # valid JSON either way
    if not any_whitespace:
        for text, value in zip(texts, values, strict=True):
            assert text == json.dumps(value, ensure_ascii=False), text
    else:
        assert any(extra_whitespace(text) for text in texts), texts
