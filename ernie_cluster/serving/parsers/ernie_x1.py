"""The ERNIE-4.5 Thinking output parser (`ernie_x1` in FastDeploy, `ernie45` in vLLM): splits
generated text into reasoning, content and tool calls, whole or streamed.

One incremental state machine serves both: parse() feeds the whole text at once, so streamed
deltas always add up to the whole-output result. Model output never makes it raise; text it
cannot read as a tag or a tool call is kept as content.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ernie_cluster.serving.parsers.messages import (
    DeltaMessage,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
)
from ernie_cluster.serving.parsers.text_stream import ContentJoiner, held_suffix_len
from ernie_cluster.serving.parsers.tool_call import (
    decode_cut_tool_call,
    decode_tool_call,
    find_call_end,
    new_tool_call_id,
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RESPONSE_OPEN = "<response>"
RESPONSE_CLOSE = "</response>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class _Section(enum.Enum):
    START = "start"  # nothing decided yet: a leading <think> may still come
    THINK_NEWLINES = "think_newlines"  # just after <think>: newlines to drop
    REASONING = "reasoning"  # until </think>
    ANSWER = "answer"  # after </think>: loose text between blocks
    RESPONSE_START = "response_start"  # just after <response>: one newline to drop
    RESPONSE = "response"  # until </response>
    TOOL_CALL = "tool_call"  # until </tool_call>


class ErnieX1Parser:
    """Reasoning, content and tool calls of one generated output.

    Format: `{reasoning}\\n</think>\\n\\n<response>\\n{answer}\\n</response>\\n`, or
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks after `</think>`.
    With `reasoning` off the whole text is answer; with `tools` off tool blocks stay content.
    Once a `<response>` block has closed, loose text after it is not content (the answer is
    the block's body, as FastDeploy and vLLM return it); later blocks still count. A call the
    output ends inside (max_tokens) is still a call, its arguments as far as generated.
    A parser serves one output: stream it with feed() then finish(), or call parse().
    """

    def __init__(
        self,
        reasoning: bool = True,
        tools: bool = True,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self._id_factory = id_factory or new_tool_call_id
        self._answer_tags = (RESPONSE_OPEN, TOOL_CALL_OPEN) if tools else (RESPONSE_OPEN,)
        self._reset()

    def _reset(self) -> None:
        self._section = _Section.START if self.reasoning else _Section.ANSWER
        self._buffer = ""
        self._tool_scan_from = 0
        self._joiner = ContentJoiner()
        self._tool_calls: list[ToolCall] = []
        self._finished = False
        self._response_closed = False
        self._reasoning_out: list[str] = []
        self._content_out: list[str] = []
        self._tool_calls_out: list[ToolCallDelta] = []

    @property
    def has_tool_calls(self) -> bool:
        """True once at least one tool call was parsed (finish_reason becomes "tool_calls")."""
        return bool(self._tool_calls)

    def parse(self, text: str) -> ParsedMessage:
        """The whole output at once. Starts over, so it also resets any stream in progress."""
        self._reset()
        deltas = (self.feed(text), self.finish())
        reasoning = "".join(d.reasoning_content or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        return ParsedMessage(
            reasoning_content=reasoning or None,
            content=content or None,
            tool_calls=list(self._tool_calls),
        )

    def feed(self, delta_text: str) -> DeltaMessage:
        """What the next piece of text makes certain; a possible tag start is held back."""
        if self._finished:
            raise RuntimeError("feed() after finish(): a parser serves one output")
        self._buffer += delta_text
        while self._advance():
            pass
        return self._take()

    def finish(self) -> DeltaMessage:
        """End of the output: what was held back is released as text of its section."""
        if self._finished:
            return DeltaMessage()
        self._finished = True
        section, rest = self._section, self._buffer
        self._buffer = ""
        if section in (_Section.START, _Section.REASONING):
            self._emit_reasoning(rest)
        elif section is _Section.ANSWER:
            self._emit_loose(rest)
        elif section is _Section.RESPONSE:
            self._emit_verbatim(rest)
        elif section is _Section.TOOL_CALL:
            self._finish_cut_call(rest)
        return self._take()

    # ------------------------------------------------------------------ state machine
    def _advance(self) -> bool:
        """Consume what the buffer decides; True when the section changed (run again)."""
        if self._section is _Section.START:
            return self._advance_start()
        if self._section is _Section.THINK_NEWLINES:
            return self._advance_think_newlines()
        if self._section is _Section.REASONING:
            return self._advance_reasoning()
        if self._section is _Section.ANSWER:
            return self._advance_answer()
        if self._section is _Section.RESPONSE_START:
            return self._advance_response_start()
        if self._section is _Section.RESPONSE:
            return self._advance_response()
        return self._advance_tool_call()

    def _advance_think_newlines(self) -> bool:
        # Every newline after <think> goes; until another character arrives, more may come.
        self._buffer = self._buffer.lstrip("\n")
        if not self._buffer:
            return False
        self._section = _Section.REASONING
        return True

    def _advance_response_start(self) -> bool:
        # Only the one newline the format puts after <response> goes.
        if not self._buffer:
            return False
        if self._buffer.startswith("\n"):
            self._buffer = self._buffer[1:]
        self._section = _Section.RESPONSE
        return True

    def _advance_start(self) -> bool:
        stripped = self._buffer.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._buffer = stripped[len(THINK_OPEN) :]
            self._section = _Section.THINK_NEWLINES
            return True
        if THINK_OPEN.startswith(stripped):
            return False
        self._section = _Section.REASONING
        return True

    def _advance_reasoning(self) -> bool:
        end = self._buffer.find(THINK_CLOSE)
        if end < 0:
            self._emit_reasoning(self._release(THINK_CLOSE, "\n" + THINK_CLOSE))
            return False
        self._emit_reasoning(_drop_trailing_newline(self._buffer[:end]))
        self._buffer = self._buffer[end + len(THINK_CLOSE) :]
        self._section = _Section.ANSWER
        return True

    def _advance_answer(self) -> bool:
        found = [(i, tag) for tag in self._answer_tags if (i := self._buffer.find(tag)) >= 0]
        if not found:
            self._emit_loose(self._release(*self._answer_tags))
            return False
        start, tag = min(found)
        self._emit_loose(self._buffer[:start])
        self._buffer = self._buffer[start + len(tag) :]
        self._section = _Section.RESPONSE_START if tag == RESPONSE_OPEN else _Section.TOOL_CALL
        return True

    def _advance_response(self) -> bool:
        end = self._buffer.find(RESPONSE_CLOSE)
        if end < 0:
            self._emit_verbatim(self._release(RESPONSE_CLOSE, "\n" + RESPONSE_CLOSE))
            return False
        self._emit_verbatim(_drop_trailing_newline(self._buffer[:end]))
        self._buffer = self._buffer[end + len(RESPONSE_CLOSE) :]
        self._section = _Section.ANSWER
        self._response_closed = True
        return True

    def _advance_tool_call(self) -> bool:
        # The call's body stays buffered; only the new tail is searched for the closing tag.
        end = find_call_end(self._buffer, TOOL_CALL_CLOSE, self._tool_scan_from)
        if end < 0:
            self._tool_scan_from = max(0, len(self._buffer) - len(TOOL_CALL_CLOSE) + 1)
            return False
        body = self._buffer[:end]
        self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
        self._tool_scan_from = 0
        self._section = _Section.ANSWER
        decoded = decode_tool_call(body)
        if decoded is None:
            self._emit_loose(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            return True
        self._add_tool_call(*decoded)
        return True

    def _add_tool_call(self, name: str, arguments: str) -> None:
        call = ToolCall(id=self._id_factory(), name=name, arguments=arguments)
        self._tool_calls_out.append(
            ToolCallDelta(
                index=len(self._tool_calls), id=call.id, name=call.name, arguments=call.arguments
            )
        )
        self._tool_calls.append(call)

    def _finish_cut_call(self, body: str) -> None:
        """The output ended inside a call (max_tokens): reported as OpenAI does, a call with
        its arguments as far as generated (finish_reason stays "length").

        NOTE: the same for forced, strict and free calls: a grammar makes every forced or strict
        call start `{"name": ..., "arguments": `, and a free one that starts so is a call the
        model began as well. A call cut before its name is whole reports nothing; a body that
        is not a call object stays content, as a whole undecodable block does.
        """
        cut = decode_cut_tool_call(body[: len(body) - held_suffix_len(body, (TOOL_CALL_CLOSE,))])
        if cut is None:
            self._emit_loose(TOOL_CALL_OPEN + body)
        elif cut[0] is not None:
            self._add_tool_call(*cut)

    def _release(self, *tags: str) -> str:
        """Take the buffer except a tail that may still become one of `tags`."""
        keep = held_suffix_len(self._buffer, tags)
        cut = len(self._buffer) - keep
        released, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return released

    # ------------------------------------------------------------------ output
    def _emit_reasoning(self, text: str) -> None:
        if text:
            self._reasoning_out.append(text)

    def _emit_loose(self, text: str) -> None:
        if self._response_closed:
            return
        if out := self._joiner.loose(text):
            self._content_out.append(out)

    def _emit_verbatim(self, text: str) -> None:
        if out := self._joiner.verbatim(text):
            self._content_out.append(out)

    def _take(self) -> DeltaMessage:
        delta = DeltaMessage(
            reasoning_content="".join(self._reasoning_out) or None,
            content="".join(self._content_out) or None,
            tool_calls=self._tool_calls_out,
        )
        self._reasoning_out, self._content_out, self._tool_calls_out = [], [], []
        return delta


def _drop_trailing_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text
