"""What the output parsers return: a whole message (ParsedMessage) or a streamed piece of one
(DeltaMessage, ToolCallDelta).

Plain dataclasses that the HTTP layer maps onto OpenAI's `message` and `delta` objects. They carry
text and tool calls only; request ids, roles and finish reasons belong to the protocol layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments object as a JSON string (non-ASCII kept as is), as OpenAI sends it."""


@dataclass
class ParsedMessage:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    index: int
    """Position of the call among this message's tool calls (OpenAI's `tool_calls[].index`)."""
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaMessage:
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to send to the client for this step."""
        return not self.reasoning_content and not self.content and not self.tool_calls
