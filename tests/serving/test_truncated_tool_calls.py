"""A tool call cut off by max_tokens, through HTTP with the official openai client, as OpenAI
reports it: finish_reason "length", the call with its arguments as far as generated, no raw
`<tool_call>` text in content; for tool_choice "required", a named function, a strict tool
under "auto" and a free one, whole and streamed.

The real engine (scheduler, grammar matcher, detokenizer, max_tokens) replays a scripted ERNIE
output in place of the model; every forced or strict form constrains it with a grammar, so the
script is also checked against that grammar (compact JSON) token by token.
"""

from __future__ import annotations

import json

import pytest
from http_fixtures import serve_scripted_engine
from test_http_tools import collect_stream, reasoning_of

MODEL = "tiny"
REASONING = "Must call."
ARGUMENTS = '{"location": "Berlin", "unit": "c"}'
CALL = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>\n'
SCRIPT = f"{REASONING}\n</think>\n\n\n{CALL}"
PARAMETERS = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}


def tools(strict: bool) -> list[dict]:
    weather = {"name": "get_weather", "parameters": PARAMETERS, "strict": strict}
    time = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
    return [{"type": "function", "function": f} for f in (weather, time)]


CHOICES = {
    "required": ("required", False),
    "named": ({"type": "function", "function": {"name": "get_weather"}}, False),
    "strict-auto": ("auto", True),
    "free-auto": ("auto", False),
}


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    with serve_scripted_engine(
        tiny_checkpoint,
        {"SCRIPT": SCRIPT},
        reasoning_parser="ernie_x1",
        tool_call_parser="ernie_x1",
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with served.openai() as client:
        yield client


def cut_inside(served, marker: str) -> tuple[int, str]:
    """(max_tokens, generated text) for the shortest prefix of the script's tokens whose
    text reaches past `marker`."""
    tokenizer = served.tokenizer
    ids = tokenizer.encode(SCRIPT)
    for count in range(1, len(ids)):
        text = tokenizer.decode(ids[:count], skip_special_tokens=False)
        if marker in text:
            return count, text
    raise AssertionError(f"{marker!r} is not in the script")


def ask(**kwargs) -> dict:
    messages = [{"role": "user", "content": "SCRIPT What is the weather in Berlin?"}]
    return dict(model=MODEL, messages=messages, **kwargs)


def answer(client, stream: bool, **kwargs) -> tuple[str | None, str | None, list[dict], str]:
    """(content, reasoning, calls as dicts, finish_reason) of one choice, whole or streamed."""
    if stream:
        result = collect_stream(client.chat.completions.create(**ask(**kwargs), stream=True))
        assert len(result["finishes"]) == 1, result
        content = result["content"] or None
        return content, result["reasoning"], result["calls"], result["finishes"][0]
    choice = client.chat.completions.create(**ask(**kwargs)).choices[0]
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in choice.message.tool_calls or []
    ]
    return choice.message.content, reasoning_of(choice.message), calls, choice.finish_reason


@pytest.mark.parametrize("case", list(CHOICES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_cut_in_its_arguments_is_a_call_with_length(served, client, case, stream):
    tool_choice, strict = CHOICES[case]
    max_tokens, text = cut_inside(served, '"location": "Ber')
    generated = text.split('"arguments": ', 1)[1]
    assert not generated.endswith("}") and generated.startswith('{"location": ')
    content, reasoning, calls, finish = answer(
        client, stream, tools=tools(strict), tool_choice=tool_choice, max_tokens=max_tokens
    )
    assert finish == "length"
    assert content is None
    assert reasoning == REASONING
    assert len(calls) == 1, calls
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == generated  # as far as generated: not valid JSON yet
    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0]["arguments"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_cut_before_its_name_is_whole_reports_nothing(served, client, stream):
    max_tokens, text = cut_inside(served, '{"name": "get_')
    assert text.endswith("get_") or '"get_weather"' not in text
    content, reasoning, calls, finish = answer(
        client, stream, tools=tools(False), tool_choice="required", max_tokens=max_tokens
    )
    assert (finish, content, calls, reasoning) == ("length", None, [], REASONING)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_cut_only_in_its_closing_tag_is_whole(served, client, stream):
    max_tokens, _ = cut_inside(served, ARGUMENTS + "}")
    content, _, calls, finish = answer(
        client, stream, tools=tools(True), tool_choice="required", max_tokens=max_tokens
    )
    assert finish == "length" and content is None
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", json.loads(ARGUMENTS))
    ]


def test_an_uncut_forced_call_still_finishes_with_tool_calls(client):
    content, _, calls, finish = answer(client, False, tools=tools(True), tool_choice="required")
    assert finish == "tool_calls" and content is None
    assert [c["arguments"] for c in calls] == [ARGUMENTS]
