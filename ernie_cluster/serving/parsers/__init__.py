"""Output parsers for chat completions: reasoning, content and tool calls out of generated text.

Owns the registry of parser names a server accepts (`--reasoning-parser`, `--tool-call-parser`)
and make_parser(), which builds the parser one request needs.
"""

from __future__ import annotations

from collections.abc import Callable

from ernie_cluster.serving.parsers.ernie_x1 import ErnieX1Parser
from ernie_cluster.serving.parsers.messages import (
    DeltaMessage,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
)

# NOTE: both names are the same ERNIE-4.5 format: `ernie_x1` is FastDeploy's name, `ernie45`
# vLLM's; users bring either from the command lines they know.
REASONING_PARSERS = frozenset({"ernie_x1", "ernie45"})
TOOL_PARSERS = frozenset({"ernie_x1", "ernie45"})

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "DeltaMessage",
    "ErnieX1Parser",
    "ParsedMessage",
    "ToolCall",
    "ToolCallDelta",
    "make_parser",
]


def make_parser(
    reasoning_parser: str | None,
    tool_parser: str | None,
    tools_enabled: bool,
    id_factory: Callable[[], str] | None = None,
) -> ErnieX1Parser | None:
    """The parser for one request, or None when the server runs without parsers.

    `tools_enabled` is False when the request has no tools or tool_choice is "none": tool
    blocks then stay in the content. Raises ValueError for a name not in the registry.
    """
    _check_name("reasoning parser", reasoning_parser, REASONING_PARSERS)
    _check_name("tool call parser", tool_parser, TOOL_PARSERS)
    if reasoning_parser is None and tool_parser is None:
        return None
    return ErnieX1Parser(
        reasoning=reasoning_parser is not None,
        tools=tool_parser is not None and tools_enabled,
        id_factory=id_factory,
    )


def _check_name(kind: str, name: str | None, valid: frozenset[str]) -> None:
    if name is not None and name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
