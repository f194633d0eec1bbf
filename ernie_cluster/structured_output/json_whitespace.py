"""How much whitespace constrained JSON may hold, applied where grammars compile (engine side).

Default: compact JSON, one spelling, `{"a": 1, "b": [2, 3]}` (json.dumps' separators, no
newline or indent; xgrammar's `any_whitespace=False`, vLLM's `disable_any_whitespace`), so a
weak model cannot fill max_tokens with `{     \\n\\n...`. With the engine setting
`structured_outputs_any_whitespace`, whitespace between JSON tokens is free, each run at most
MAX_JSON_WHITESPACE characters. Every source of JSON formats (response_format, guided_json,
strict and forced tool calls, `LLM` params, structural tags) gets the same rule.
"""

from __future__ import annotations

import json
from typing import Any

from ernie_cluster.structured_output.formats import dict_nodes

# NOTE: models pretty-print JSON when allowed to (a newline plus indentation), but a run of
# whitespace with no bound lets a weak model spin on spaces; 32 covers 7 levels of 4-space indent.
MAX_JSON_WHITESPACE = 32

# A json_schema format with any other key (style, excludes, any_order, max_whitespace_cnt) was
# configured by the user's own structural tag, and is compiled as written.
_PLAIN_JSON_SCHEMA_KEYS = frozenset({"type", "json_schema"})


def with_json_whitespace(structural_tag: str, any_whitespace: bool) -> str:
    """`structural_tag` (xgrammar JSON) with every plain json_schema format given the rule:
    compact (an EBNF grammar of the one spelling) or bounded free whitespace."""
    tag = json.loads(structural_tag)
    changed = False
    for node in dict_nodes(tag, _format_children):
        if _is_plain_json_schema(node):
            if any_whitespace:
                node["max_whitespace_cnt"] = MAX_JSON_WHITESPACE
            else:
                schema = node.pop("json_schema")
                node.update(type="grammar", grammar=compact_json_ebnf(schema))
            changed = True
    return json.dumps(tag, ensure_ascii=False) if changed else structural_tag


def _is_plain_json_schema(node: dict) -> bool:
    return node.get("type") == "json_schema" and set(node) == _PLAIN_JSON_SCHEMA_KEYS


def _format_children(node: dict) -> list[Any]:
    # A json_schema format's schema holds keywords, not formats (nor does a grammar): not walked.
    return [] if node.get("type") in ("json_schema", "grammar") else list(node.values())


def compact_json_ebnf(schema: Any) -> str:
    """EBNF of the JSON matching `schema` in its compact spelling (`", "` and `": "`, nothing
    else), strict as structural tags' json_schema formats are (no unlisted properties)."""
    import xgrammar  # NOTE: here, where grammars compile: it pulls in torch

    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(schema, ensure_ascii=False), any_whitespace=False, strict_mode=True
    )
    return str(grammar)
