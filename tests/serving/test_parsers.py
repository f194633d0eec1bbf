"""ERNIE-4.5 output parser: recorded outputs parsed whole and streamed at every split.

Each fixture is asserted exactly for parse(); streaming it in any chunking (every character
boundary, one character at a time, fixed-seed random chunks) must add up to the same message.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from ernie_cluster.serving.parsers import (
    DeltaMessage,
    ErnieX1Parser,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
)


# ------------------------------------------------------------------------------ helpers
def counting_ids() -> Callable[[], str]:
    """call_000...0, call_000...1, ...: the same sequence for every parser that gets one."""
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def parse(text: str, **switches: bool) -> ParsedMessage:
    return ErnieX1Parser(id_factory=counting_ids(), **switches).parse(text)


def stream(chunks: Iterable[str], **switches: bool) -> tuple[ParsedMessage, bool]:
    """Feed `chunks`, then finish; the deltas joined into one message, and has_tool_calls."""
    parser = ErnieX1Parser(id_factory=counting_ids(), **switches)
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    calls = []
    for delta in deltas:
        for call in delta.tool_calls:
            # Each call arrives whole, in order: one delta with every field set.
            assert call.index == len(calls)
            assert call.id is not None and call.name is not None and call.arguments is not None
            calls.append(ToolCall(id=call.id, name=call.name, arguments=call.arguments))
    message = ParsedMessage(
        reasoning_content="".join(d.reasoning_content or "" for d in deltas),
        content="".join(d.content or "" for d in deltas),
        tool_calls=calls,
    )
    return message, parser.has_tool_calls


def random_chunks(text: str, rng: random.Random, max_len: int = 8) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        size = rng.randint(1, max_len)
        chunks.append(text[start : start + size])
        start += size
    return chunks


def assert_stream_matches(text: str, expected: ParsedMessage, splits: Iterable[list[str]], **kw):
    """Streaming any of `splits` adds up to `expected` (None read as '' for the text fields)."""
    want = (expected.reasoning_content or "", expected.content or "", expected.tool_calls)
    for chunks in splits:
        assert "".join(chunks) == text
        got, has_tool_calls = stream(chunks, **kw)
        assert (got.reasoning_content, got.content, got.tool_calls) == want, chunks
        assert has_tool_calls == bool(expected.tool_calls), chunks


def every_split(text: str) -> Iterable[list[str]]:
    """Two chunks at every character boundary, one character at a time, and seeded random."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(1234)
    for max_len in (2, 3, 5, 8, 13):
        yield random_chunks(text, rng, max_len)


def call(index: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{index:024x}", name=name, arguments=arguments)


# ------------------------------------------------------------------------------ fixtures
@dataclass
class Case:
    text: str
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    switches: dict[str, bool] = field(default_factory=dict)


WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
THINK_WEATHER = "用户想知道北京的天气，我需要调用 get_weather 工具。"
ANSWER = (
    "The user asks what 1+1 is. That is basic arithmetic.\n</think>\n\n"
    "<response>\n**1 + 1 = 2**\n\nAdding one to one gives two.\n</response>\n"
)

CASES = {
    "answer": Case(
        ANSWER,
        "The user asks what 1+1 is. That is basic arithmetic.",
        "**1 + 1 = 2**\n\nAdding one to one gives two.",
    ),
    "reasoning_cut_off": Case(
        "The user wants a poem about the sea.\nLet me think about rhythm and",
        "The user wants a poem about the sea.\nLet me think about rhythm and",
        None,
    ),
    "reasoning_cut_off_in_think_close": Case(
        "Almost done thinking.\n</thi", "Almost done thinking.\n</thi", None
    ),
    "one_tool_call": Case(
        f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}",
        THINK_WEATHER,
        None,
        [call(0, "get_weather", '{"city": "北京"}')],
    ),
    "two_tool_calls": Case(
        "Two lookups are needed.\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>\n',
        "Two lookups are needed.",
        None,
        [
            call(0, "get_weather", '{"city": "Paris", "unit": "celsius"}'),
            call(1, "get_time", '{"timezone": "Europe/Paris"}'),
        ],
    ),
    "unicode_arguments": Case(
        "搜索一下 🌤️\n</think>\n\n\n<tool_call>\n"
        '{"name": "search", "arguments": {"query": "北京天气 🌤️", "note": "\\u4e0a\\u6d77 😀"}}'
        "\n</tool_call>\n",
        "搜索一下 🌤️",
        None,
        [call(0, "search", '{"query": "北京天气 🌤️", "note": "上海 😀"}')],
    ),
    "malformed_json": Case(
        "Call the tool.\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}\n</tool_call>\n',
        "Call the tool.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}\n</tool_call>',
    ),
    "missing_name_beside_good_call": Case(
        "Two blocks.\n</think>\n\n\n"
        '<tool_call>\n{"arguments": {"city": "北京"}}\n</tool_call>\n' + WEATHER_CALL,
        "Two blocks.",
        '<tool_call>\n{"arguments": {"city": "北京"}}\n</tool_call>',
        [call(0, "get_weather", '{"city": "北京"}')],
    ),
    "arguments_as_json_string": Case(
        "Weather in Shanghai.\n</think>\n\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"上海\\", \\"days\\": 3}"}'
        "\n</tool_call>\n",
        "Weather in Shanghai.",
        None,
        [call(0, "get_weather", '{"city": "上海", "days": 3}')],
    ),
    "no_response_tag": Case(
        "Short question.\n</think>\n\nThe answer is 42.\n\nNothing more.\n",
        "Short question.",
        "The answer is 42.\n\nNothing more.",
    ),
    "text_before_tool_call": Case(
        f"Need data.\n</think>\n\nLet me check the weather.\n\n{WEATHER_CALL}",
        "Need data.",
        "Let me check the weather.",
        [call(0, "get_weather", '{"city": "北京"}')],
    ),
    "tools_disabled": Case(
        f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}",
        THINK_WEATHER,
        WEATHER_CALL.strip(),
        switches={"tools": False},
    ),
    "reasoning_disabled": Case(
        ANSWER,
        None,
        "The user asks what 1+1 is. That is basic arithmetic.\n</think>\n\n"
        "**1 + 1 = 2**\n\nAdding one to one gives two.",
        switches={"reasoning": False},
    ),
    "reasoning_disabled_tool_call": Case(
        f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}",
        None,
        f"{THINK_WEATHER}\n</think>",
        [call(0, "get_weather", '{"city": "北京"}')],
        switches={"reasoning": False},
    ),
    "both_disabled": Case(
        f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}",
        None,
        f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL.strip()}",
        switches={"reasoning": False, "tools": False},
    ),
    "leading_think": Case(
        "<think>\nI should greet back.\n</think>\n\n<response>\nHello! 👋\n</response>\n",
        "I should greet back.",
        "Hello! 👋",
    ),
    "extra_whitespace_no_trailing_newline": Case(
        "  <think>\n\nThinking.\n\n</think>\n\n\n  <response>\nLine one\n\n  indented\n\n</response>",
        "Thinking.\n",
        "Line one\n\n  indented\n",
    ),
    "text_after_response": Case(  # FastDeploy's own vector: only the response body counts
        "Think.\n</think>\n\n<response>\nThe answer.\n</response>\nAnd some trailing words.",
        "Think.",
        "The answer.",
    ),
    "empty_answer": Case(
        "Nothing to say.\n</think>\n\n<response>\n\n</response>\n", "Nothing to say.", None
    ),
    "cut_off_in_response": Case(
        "Easy.\n</think>\n\n<response>\nThe capital of France is\n",
        "Easy.",
        "The capital of France is\n",
    ),
    "cut_off_in_response_close": Case(
        "Easy.\n</think>\n\n<response>\nParis.\n</respo", "Easy.", "Paris.\n</respo"
    ),
    # A call cut off (max_tokens) is reported as OpenAI does: the call, arguments so far.
    "cut_off_in_tool_call": Case(
        f'{THINK_WEATHER}\n</think>\n\n\n<tool_call>\n{{"name": "get_weather", "argu',
        THINK_WEATHER,
        None,
        [call(0, "get_weather", "")],
    ),
    "cut_off_in_arguments": Case(
        f'{THINK_WEATHER}\n</think>\n\n\n<tool_call>\n{{"name": "get_weather", '
        '"arguments": {"city": "北',
        THINK_WEATHER,
        None,
        [call(0, "get_weather", '{"city": "北')],
    ),
    "cut_off_after_first_call": Case(
        f'{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}<tool_call>\n{{"name": ',
        THINK_WEATHER,
        None,
        [call(0, "get_weather", '{"city": "北京"}')],
    ),
    "close_tag_inside_a_string_argument": Case(
        'x\n</think>\n\n\n<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>"}}\n'
        "</tool_call>\n",
        "x",
        None,
        [call(0, "f", '{"s": "a</tool_call>"}')],
    ),
    "cut_off_in_text_after_tool_call_tag": Case(
        "x\n</think>\n\n<tool_call>\nnot a call", "x", "<tool_call>\nnot a call"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parse(name: str) -> None:
    case = CASES[name]
    parser = ErnieX1Parser(id_factory=counting_ids(), **case.switches)
    assert parser.parse(case.text) == ParsedMessage(
        reasoning_content=case.reasoning, content=case.content, tool_calls=case.tool_calls
    )
    assert parser.has_tool_calls == bool(case.tool_calls)


@pytest.mark.parametrize("name", list(CASES))
def test_stream_adds_up_to_parse_at_every_split(name: str) -> None:
    case = CASES[name]
    expected = parse(case.text, **case.switches)
    assert_stream_matches(case.text, expected, every_split(case.text), **case.switches)


# ------------------------------------------------------------------------------ streaming
def test_possible_tag_start_is_held_back_until_decided() -> None:
    parser = ErnieX1Parser()
    assert parser.feed("<thi") == DeltaMessage()
    assert parser.feed("nk>\n\nStep one.\n") == DeltaMessage(reasoning_content="Step one.")
    assert parser.feed("</thi") == DeltaMessage()
    # "</thi" then "s" is not a tag: the held text is reasoning after all.
    assert parser.feed("s") == DeltaMessage(reasoning_content="\n</this")
    assert parser.feed("\n</think>\n\n<resp") == DeltaMessage()
    assert parser.feed("onse>\nHi") == DeltaMessage(content="Hi")
    assert parser.feed("\n</response>\n") == DeltaMessage()
    assert parser.finish().is_empty


def test_tool_call_is_emitted_whole_when_closed() -> None:
    parser = ErnieX1Parser(id_factory=counting_ids())
    text = f"{THINK_WEATHER}\n</think>\n\n\n{WEATHER_CALL}"
    close = text.index("</tool_call>")
    before = parser.feed(text[: close + len("</tool_call")])
    assert before == DeltaMessage(reasoning_content=THINK_WEATHER)
    assert not parser.has_tool_calls
    closed = parser.feed(">\n")
    assert closed == DeltaMessage(
        tool_calls=[
            ToolCallDelta(
                index=0, id=f"call_{0:024x}", name="get_weather", arguments='{"city": "北京"}'
            )
        ]
    )
    assert parser.has_tool_calls
    assert parser.finish().is_empty


def test_malformed_block_becomes_content_when_closed() -> None:
    parser = ErnieX1Parser()
    parser.feed("Go.\n</think>\n\n<tool_call>\n{oops}\n")
    assert parser.feed("</tool_call>") == DeltaMessage(content="<tool_call>\n{oops}\n</tool_call>")
    assert not parser.has_tool_calls


def test_one_chunk_can_carry_reasoning_content_and_calls() -> None:
    text = f"Think.\n</think>\n\nChecking.\n{WEATHER_CALL}"
    delta = ErnieX1Parser(id_factory=counting_ids()).feed(text)
    assert delta.reasoning_content == "Think."
    assert delta.content == "Checking."
    assert [c.name for c in delta.tool_calls] == ["get_weather"]


def test_finish_is_final() -> None:
    parser = ErnieX1Parser()
    assert parser.feed("Cut off\n") == DeltaMessage(reasoning_content="Cut off")
    assert parser.finish() == DeltaMessage(reasoning_content="\n")
    assert parser.finish().is_empty
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("more")


def test_parse_starts_over() -> None:
    parser = ErnieX1Parser()
    parser.feed(f"Half a stream.\n</think>\n\n{WEATHER_CALL}")
    assert parser.has_tool_calls
    assert parser.parse(ANSWER).tool_calls == []
    assert not parser.has_tool_calls


def test_delta_is_empty() -> None:
    assert DeltaMessage().is_empty
    assert DeltaMessage(reasoning_content="", content="").is_empty
    assert not DeltaMessage(content="x").is_empty
    assert not DeltaMessage(reasoning_content="x").is_empty
    assert not DeltaMessage(tool_calls=[ToolCallDelta(index=0)]).is_empty
