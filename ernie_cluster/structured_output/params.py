"""GrammarSpec: the engine's resolved form of an output constraint.

What users set is `sampling_params.StructuredOutputsParams`; the input processor turns it into
a `GrammarSpec`: one xgrammar structural tag, canonical JSON so equal specs share one compiled
grammar (keys sorted, a schema's properties kept in their order), plus the token that switches
the constraint on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GrammarSpec:
    """A validated constraint, ready to compile (engine side; built by the input processor)."""

    structural_tag: str
    """Canonical JSON of an xgrammar structural tag; equal text means one compiled grammar."""
    start_token_id: int | None = None
    """The constraint starts after this token is generated (the reasoning end, `</think>`);
    None: from the first generated token."""

    @classmethod
    def from_format(cls, fmt: dict[str, Any], start_token_id: int | None = None) -> GrammarSpec:
        tag = {"format": _canonical(fmt), "type": "structural_tag"}
        return cls(json.dumps(tag, ensure_ascii=False), start_token_id)


def _canonical(node: Any, keep_order: bool = False) -> Any:
    """`node` with its object keys sorted, except a JSON schema's `properties`: their order is
    the order the grammar writes the keys in (xgrammar keeps the declared order)."""
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    if not isinstance(node, dict):
        return node
    items = node.items() if keep_order else sorted(node.items())
    return {k: _canonical(v, not keep_order and k == "properties") for k, v in items}
