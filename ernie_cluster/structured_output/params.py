"""What a request asks its output to match (public API), and the engine's resolved form.

`StructuredOutputsParams` is what users set (`SamplingParams(structured_outputs=...)`, or the
HTTP fields `response_format`, `structured_outputs`, `guided_*`, strict tools). `GrammarSpec`
is what the engine compiles and enforces: one xgrammar structural tag, canonical JSON so equal
specs share one compiled grammar, plus the token that switches the constraint on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint on the generated text (names as in vLLM's `structured_outputs`)."""

    json: dict[str, Any] | str | None = None
    """A JSON schema (a dict or its JSON text): the output is one JSON value matching it."""
    regex: str | None = None
    """The output matches this regular expression as a whole."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar / GBNF syntax, with a `root` rule)."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    structural_tag: dict[str, Any] | str | None = None
    """An xgrammar structural tag (dict or JSON text), for callers that build their own."""

    def __post_init__(self) -> None:
        chosen = [kind for kind in _KINDS if self._is_set(kind)]
        if len(chosen) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(_KINDS)}; "
                f"got {chosen or 'none'}"
            )

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return value is not False and value is not None

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if self._is_set(kind))

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)


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
        tag = {"type": "structural_tag", "format": fmt}
        return cls(json.dumps(tag, sort_keys=True, ensure_ascii=False), start_token_id)
