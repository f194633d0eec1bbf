"""ERNIE-4.5 output parser against a whole-text reference on random tag soup.

The reference restates the format rules over the complete text (no buffering, no states), so
it checks the streaming state machine's rules, not only that its chunking is consistent.
"""

from __future__ import annotations

import random
import re

import pytest
from test_parsers import (
    WEATHER_CALL,
    assert_stream_matches,
    call,
    parse,
    random_chunks,
)

from ernie_cluster.serving.parsers import ParsedMessage, ToolCall
from ernie_cluster.serving.parsers.tool_call import decode_cut_tool_call, decode_tool_call

PIECES = [
    "<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>",
    "<thi", "</th", "<resp", "</respon", "<tool", "</tool_c", "<", ">",
    "\n", "\n", "\n\n", " ", "  ", "\t",
    "a", "Paris", "北京", "🌤️",
    '{"name": "f", "arguments": {"x": 1}}', '{"name": "g", "arguments": "{\\"y\\": \\"是\\"}"}',
    '{"name": "h"}', '{"arguments": {}}', '{"name": "f", "arguments": {"x": ', "{", "}",
    '{"name": "f", "arguments": {"s": "a</tool_call>b"}}', '"', '\\"',
    # Whole blocks, so that well-formed calls and responses are common too.
    "\n</think>\n\n", "\n</think>\n\n\n", WEATHER_CALL, WEATHER_CALL.strip(),
    '<tool_call>{"name": "k", "arguments": "{}"}</tool_call>', "<response>\nok\n</response>\n",
]  # fmt: skip


def reference(text: str, reasoning: bool, tools: bool) -> ParsedMessage:
    """The format rules applied to the whole text at once."""
    thought = None
    if reasoning:
        if text.lstrip().startswith("<think>"):
            text = text.lstrip()[len("<think>") :].lstrip("\n")
        end = text.find("</think>")
        if end < 0:
            return ParsedMessage(reasoning_content=text or None, content=None, tool_calls=[])
        thought = text[:end].removesuffix("\n") or None
        text = text[end + len("</think>") :]

    # Content as (character, is_verbatim) pairs: only loose text loses edge whitespace.
    chars: list[tuple[str, bool]] = []
    calls: list[ToolCall] = []
    opens = ["<response>", "<tool_call>"] if tools else ["<response>"]
    pos = 0
    closed = False  # after a closed response block, loose text is not content

    def loose(piece: str) -> list[tuple[str, bool]]:
        return [] if closed else [(c, False) for c in piece]

    while True:
        hits = [(text.find(tag, pos), tag) for tag in opens if text.find(tag, pos) >= 0]
        if not hits:
            chars += loose(text[pos:])
            break
        start, tag = min(hits)
        chars += loose(text[pos:start])
        close = "</response>" if tag == "<response>" else "</tool_call>"
        body_start = start + len(tag)
        end = text.find(close, body_start)
        if tag == "<tool_call>" and text[body_start:].lstrip().startswith("{"):
            while end >= 0 and in_json_string(text[body_start:end]):
                end = text.find(close, end + 1)  # a `</tool_call>` inside a string argument
        body = text[body_start:] if end < 0 else text[body_start:end]
        pos = len(text) if end < 0 else end + len(close)
        if tag == "<response>":
            body = body.removeprefix("\n")
            if end >= 0:
                body = body.removesuffix("\n")
            chars += [(c, True) for c in body]
            closed = closed or end >= 0
            continue
        if end < 0:  # cut off: the call so far; a body that is no call object stays content
            n = next((n for n in range(len(close) - 1, 0, -1) if body.endswith(close[:n])), 0)
            cut = decode_cut_tool_call(body[: len(body) - n])
            if cut is None:
                chars += loose(text[start:pos])
            elif cut[0] is not None:
                calls.append(call(len(calls), *cut))
            continue
        decoded = decode_tool_call(body)
        if decoded is None:
            chars += loose(text[start:pos])
        else:
            calls.append(call(len(calls), *decoded))
    while chars and not chars[0][1] and chars[0][0].isspace():
        chars.pop(0)
    while chars and not chars[-1][1] and chars[-1][0].isspace():
        chars.pop()
    content = "".join(c for c, _ in chars)
    return ParsedMessage(reasoning_content=thought, content=content or None, tool_calls=calls)


def in_json_string(prefix: str) -> bool:
    """Whether the JSON text `prefix` ends inside a string."""
    return '"' in re.sub(r'"(?:[^"\\]|\\.)*"', "", prefix)  # a quote left unclosed


def tag_soup(rng: random.Random) -> str:
    lead = rng.choice(["", "", "<think>\n", "  <think>", "\n"])
    return lead + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 24)))


@pytest.mark.parametrize("reasoning", [True, False])
@pytest.mark.parametrize("tools", [True, False])
def test_random_outputs_match_reference_whole_and_streamed(reasoning: bool, tools: bool) -> None:
    rng = random.Random(f"{reasoning}-{tools}")
    for _ in range(400):
        text = tag_soup(rng)
        expected = reference(text, reasoning, tools)
        assert parse(text, reasoning=reasoning, tools=tools) == expected, text
        splits = [random_chunks(text, rng, n) for n in (1, 2, 4, 9)]
        assert_stream_matches(text, expected, splits, reasoning=reasoning, tools=tools)


def test_reference_agrees_on_the_recorded_format() -> None:
    text = f"Think.\n</think>\n\n\n{WEATHER_CALL}"
    assert reference(text, reasoning=True, tools=True) == parse(text)
